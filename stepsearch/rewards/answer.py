"""Answer metrics and answer-format checks (DESIGN.md, "Semantics": answer metrics and outcome reward).

Normalisation is SQuAD's: lower-case, delete ASCII punctuation (`string.punctuation`, without inserting a space:
"U.S." -> "us"), drop the words a/an/the, collapse whitespace. EM and token F1 are the SQuAD v1.1 definitions,
taking the maximum over gold aliases; as in SQuAD v1.1, two texts with no tokens in common score F1 0 (so an empty
prediction never earns F1, even against a gold alias that normalises to the empty string).

Tags: the answer is the content of the last `<answer>…</answer>` block, where a block is an `<answer>` followed by
its `</answer>` with no other `<answer>` or `</answer>` between them (so `<answer>a<answer>b</answer>` holds the
block `b`, and an `<answer>` never closed is not a block). The content is returned with surrounding whitespace
stripped. A response has a valid format when it has such a block and that block ends the response, ignoring
trailing whitespace; a caller whose text ends with an end-of-sequence string (`<|im_end|>`, `</s>`, ...) strips it
first. Text after the last block, an unclosed `<answer>`, or a stray `</answer>` after the block makes the format
invalid.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)
_ANSWER_BLOCK = re.compile(r"<answer>((?:(?!</?answer>).)*)</answer>", re.DOTALL)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, strip ASCII punctuation, drop a/an/the, collapse whitespace."""
    without_punctuation = s.lower().translate(_PUNCTUATION_TABLE)
    return " ".join(_ARTICLES.sub(" ", without_punctuation).split())


def _as_list(golds: str | Sequence[str]) -> Sequence[str]:
    # A bare string is one gold alias, not a sequence of one-character aliases.
    return [golds] if isinstance(golds, str) else golds


def exact_match(pred: str | None, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold alias, else 0.0 (also for no prediction)."""
    if pred is None:
        return 0.0
    normalized_pred = normalize_answer(pred)
    return float(any(normalized_pred == normalize_answer(gold) for gold in _as_list(golds)))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred: str | None, golds: str | Sequence[str]) -> float:
    """SQuAD token F1 of the normalised prediction, maximised over gold aliases; 0.0 for no prediction or golds."""
    if pred is None:
        return 0.0
    pred_tokens = normalize_answer(pred).split()
    return max((_token_f1(pred_tokens, normalize_answer(gold).split()) for gold in _as_list(golds)), default=0.0)


def _last_answer_block(text: str) -> re.Match[str] | None:
    last_block = None
    for block in _ANSWER_BLOCK.finditer(text):
        last_block = block
    return last_block


def extract_answer(text: str) -> str | None:
    """Stripped content of the last `<answer>…</answer>` block (see module docstring), or None if there is none."""
    last_block = _last_answer_block(text)
    return None if last_block is None else last_block.group(1).strip()


def is_valid_format(text: str) -> bool:
    """True when the last `<answer>…</answer>` block ends the response, ignoring trailing whitespace.

    The caller strips any end-of-sequence string before calling (see module docstring for the exact rule).
    """
    last_block = _last_answer_block(text)
    return last_block is not None and last_block.end() == len(text.rstrip())
