"""Answer metrics (docs/design.md, "Semantics": answer metrics): SQuAD normalisation, exact match and token F1.

Normalisation is SQuAD's: lower-case, delete ASCII punctuation (`string.punctuation`, without inserting a space:
"U.S." -> "us"), drop the words a/an/the, collapse whitespace. EM and token F1 are the SQuAD v1.1 definitions,
taking the maximum over gold aliases.

Edge cases, decided here:
- A gold alias that normalises to the empty string (e.g. "the", "?") is ignored: nothing can match it, so an
  empty prediction never earns EM from it. A question whose every alias normalises to empty scores EM = F1 = 0.
- An empty prediction ("" or whitespace) scores EM 0 and F1 0 against every non-empty alias; no prediction (None)
  scores 0 as well. The format rule treats an empty `<answer></answer>` as invalid (see
  `stepsearch.rollout.segmenter`), so it cannot dodge the format penalty either.
- F1 is not rounded (the released StepSearch code rounds it to 4 decimals; differences are below 5e-5).

Where the answer comes from: the segmenter (`stepsearch.rollout.segmenter`) extracts it from the generated tokens
of a trajectory only (never from a retrieved document), for training and evaluation alike.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, strip ASCII punctuation, drop a/an/the, collapse whitespace."""
    without_punctuation = s.lower().translate(_PUNCTUATION_TABLE)
    return " ".join(_ARTICLES.sub(" ", without_punctuation).split())


def _normalized_golds(golds: str | Sequence[str]) -> list[str]:
    # A bare string is one gold alias, not a sequence of one-character aliases; empty aliases are ignored.
    aliases = [golds] if isinstance(golds, str) else golds
    return [normalized for normalized in map(normalize_answer, aliases) if normalized]


def exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a non-empty normalised gold alias, else 0.0 (also for None)."""
    if pred is None:
        return 0.0
    normalized_pred = normalize_answer(pred)
    return float(any(normalized_pred == gold for gold in _normalized_golds(golds)))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str | None, golds: str | Sequence[str]) -> float:
    """SQuAD token F1 of the normalised prediction, max over non-empty gold aliases; 0.0 for None or no alias."""
    if pred is None:
        return 0.0
    pred_tokens = normalize_answer(pred).split()
    return max((_token_f1(pred_tokens, gold.split()) for gold in _normalized_golds(golds)), default=0.0)
