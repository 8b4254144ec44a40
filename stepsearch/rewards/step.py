"""Step reward of StePPO: information gain G^t and redundancy penalty P^t of each search round.

For search round t that received documents D_t, golden support docs g_1..g_n and memory m_i^0 = 0:

    c_i^t = max_{d in D_t} sim(d, g_i)
    G^t   = (1/n) * sum_i max(c_i^t - m_i^{t-1}, 0)
    m_i^t = max(m_i^{t-1}, c_i^t)
    P^t   = (number of entries of D_t whose identity was retrieved in an earlier round) / |D_t|

A round with no documents has c_i^t = 0, G^t = 0 and P^t = 0. |D_t| counts the entries as retrieved, duplicates
included; a document repeated inside one round is not redundant (only earlier rounds count), but every copy of a
document seen in an earlier round is. Identity is the document id (`redundancy_identity="doc_id"`, default) or the
normalised text (`"text"`: `normalize_answer(text)`, as the released code compares extracted passages). With no
golden docs there is no step reward: gains and penalties are all 0. The trainer forms s^t = step_weight *
(G^t - P^t).

`sim` is the TF-IDF cosine of scikit-learn's `TfidfVectorizer()` defaults (lower-case, token pattern
`(?u)\\b\\w\\w+\\b`, raw counts, smooth idf ln((1+N)/(1+df)) + 1, L2 norm) fitted on {d} ∪ {g_1..g_n}, where every
text is first normalised with `normalize_answer` (lower-case, ASCII punctuation deleted, a/an/the dropped,
whitespace collapsed). The text of a retrieved document is its body without the title: callers pass
`Document.text`, and golden docs as `SupportDoc.text`.

Because the IDF is refitted for each d, the cosines of many documents against the same golden docs are computed
together: the golden docs are tokenised once (`GoldenTfidf`), and each document only changes the document
frequency of the golden terms it contains, which turns the whole batch into two small matrix products.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from stepsearch.rewards.answer import normalize_answer

REDUNDANCY_IDENTITIES = ("doc_id", "text")
_TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")


def _tokens(text: str) -> list[str]:
    # TfidfVectorizer lower-cases its input before tokenising; normalize_answer already did, but a second lower()
    # keeps the equality with scikit-learn exact for any character whose lower case is not a fixed point.
    return _TOKEN_PATTERN.findall(normalize_answer(text).lower())


class GoldenTfidf:
    """The golden docs of one question, tokenised once, ready to score any number of documents against them."""

    def __init__(self, golden: Sequence[str]) -> None:
        self.num_golden = len(golden)
        golden_counts = [Counter(_tokens(text)) for text in golden]
        self.vocabulary: dict[str, int] = {}
        for counts in golden_counts:
            for token in counts:
                self.vocabulary.setdefault(token, len(self.vocabulary))
        self.counts = np.zeros((self.num_golden, len(self.vocabulary)))  # (n, Vg) raw term counts
        for row, counts in enumerate(golden_counts):
            for token, count in counts.items():
                self.counts[row, self.vocabulary[token]] = count
        self.squared_counts = self.counts**2  # (n, Vg)
        self.document_frequency = (self.counts > 0).sum(axis=0)  # (Vg,)

    def cosine(self, docs: Sequence[str]) -> np.ndarray:
        """(D, n) float64 TF-IDF cosines; row d uses the IDF fitted on {docs[d]} ∪ golden. 0 where a side is empty."""
        num_docs, vocab_size = len(docs), len(self.vocabulary)
        doc_counts = np.zeros((num_docs, vocab_size))  # (D, Vg) counts of the doc's terms that occur in golden
        doc_only_squared = np.zeros(num_docs)  # (D,) sum of squared counts of the doc's terms absent from golden
        for row, text in enumerate(docs):
            for token, count in Counter(_tokens(text)).items():
                column = self.vocabulary.get(token)
                if column is None:
                    doc_only_squared[row] += count * count
                else:
                    doc_counts[row, column] = count
        num_fitted = self.num_golden + 1
        document_frequency = self.document_frequency[None, :] + (doc_counts > 0)  # (D, Vg)
        idf = np.log((1 + num_fitted) / (1 + document_frequency)) + 1  # (D, Vg)
        doc_only_idf = math.log((1 + num_fitted) / 2) + 1  # a term only in the doc has df = 1
        idf_squared = idf**2  # (D, Vg)
        dot = (doc_counts * idf_squared) @ self.counts.T  # (D, n) unnormalised tf-idf inner products
        doc_norm = np.sqrt((doc_counts**2 * idf_squared).sum(axis=1) + doc_only_squared * doc_only_idf**2)  # (D,)
        golden_norm = np.sqrt(idf_squared @ self.squared_counts.T)  # (D, n)
        denominator = doc_norm[:, None] * golden_norm  # (D, n)
        return np.divide(dot, denominator, out=np.zeros_like(dot), where=denominator > 0)


def tfidf_cosine_batch(docs: Sequence[str], golden: Sequence[str]) -> np.ndarray:
    """(D, n) TF-IDF cosines of each of `docs` with each golden doc; equals `tfidf_cosine` row by row."""
    return GoldenTfidf(golden).cosine(docs)


def tfidf_cosine(doc: str, golden: list[str]) -> list[float]:
    """TF-IDF cosine of `doc` with each golden doc, IDF fitted on {doc} ∪ golden (scikit-learn defaults).

    Equals `cosine_similarity(v[:1], v[1:])` for `v = TfidfVectorizer().fit_transform([doc, *golden])` on
    normalised texts; where scikit-learn would reject an empty vocabulary, or a side has no tokens, the cosine is 0.
    """
    return GoldenTfidf(golden).cosine([doc])[0].tolist()


def _identity(doc_id: str, text: str, redundancy_identity: str) -> str:
    return doc_id if redundancy_identity == "doc_id" else normalize_answer(text)


def _gains_and_penalties(
    rounds: Sequence[Sequence[tuple[str, str]]],
    cosine_of_text: dict[str, np.ndarray],
    num_golden: int,
    redundancy_identity: str,
) -> tuple[list[float], list[float]]:
    memory = np.zeros(num_golden)  # (n,) best similarity to each golden doc so far
    seen_before: set[str] = set()
    gains: list[float] = []
    penalties: list[float] = []
    for round_docs in rounds:
        if not round_docs:
            gains.append(0.0)
            penalties.append(0.0)
            continue
        coverage = np.max([cosine_of_text[text] for _, text in round_docs], axis=0)  # (n,) c_i^t
        gains.append(float(np.maximum(coverage - memory, 0.0).mean()))
        memory = np.maximum(memory, coverage)
        identities = [_identity(doc_id, text, redundancy_identity) for doc_id, text in round_docs]
        penalties.append(sum(identity in seen_before for identity in identities) / len(identities))
        seen_before.update(identities)
    return gains, penalties


def step_rewards_group(
    trajectories: Sequence[Sequence[Sequence[tuple[str, str]]]],
    golden_docs: Sequence[str],
    redundancy_identity: str = "doc_id",
) -> list[tuple[list[float], list[float]]]:
    """`step_rewards` for several trajectories of the same question, scoring each distinct text once.

    `trajectories[b]` is one trajectory's `rounds`; returns one `(gains, penalties)` pair per trajectory.
    """
    if redundancy_identity not in REDUNDANCY_IDENTITIES:
        raise ValueError(f"redundancy_identity must be one of {REDUNDANCY_IDENTITIES}, got {redundancy_identity!r}")
    if not golden_docs:
        return [([0.0] * len(rounds), [0.0] * len(rounds)) for rounds in trajectories]
    distinct_texts = list(dict.fromkeys(text for rounds in trajectories for docs in rounds for _, text in docs))
    cosines = GoldenTfidf(golden_docs).cosine(distinct_texts)  # (D, n)
    cosine_of_text = dict(zip(distinct_texts, cosines))
    return [
        _gains_and_penalties(rounds, cosine_of_text, len(golden_docs), redundancy_identity) for rounds in trajectories
    ]


def step_rewards(
    rounds: Sequence[Sequence[tuple[str, str]]],
    golden_docs: Sequence[str],
    redundancy_identity: str = "doc_id",
) -> tuple[list[float], list[float]]:
    """Per-round information gain G^t and redundancy P^t (module docstring) for one trajectory.

    `rounds[t]` lists the `(doc_id, text)` of the documents search round t received, `text` being the body
    without the title (`Document.text`); `golden_docs` are the support-doc bodies. Returns `(gains, penalties)`,
    two lists with one float per round.
    """
    return step_rewards_group([rounds], golden_docs, redundancy_identity)[0]
