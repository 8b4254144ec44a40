"""Search-key reward r_key: how well the emitted search queries match the reference keys of each sub-question.

    r_key = (1/M) * sum_i  agg_{q in queries}  max_j F1(q, k_ij)

over the M sub-questions, with k_ij the reference search keys of sub-question i and F1 the SQuAD token F1 of
`stepsearch.rewards.answer` (normalised text, so an empty query scores 0 against every key).

`agg` is chosen by `aggregation`:
- "max" (paper): the best emitted query for each sub-question.
- "last" (released code): the released code loops over the emitted queries and, for each sub-question (group),
  assigns that query's score, overwriting the previous one instead of keeping the best; the score that survives is
  the last emitted query's. So "last" scores every sub-question with the last emitted query only.

M counts every sub-question, including one with no reference keys (which contributes 0). No queries, or no
sub-questions, give 0.0.
"""
from __future__ import annotations

from collections.abc import Sequence

from stepsearch.rewards.answer import f1_score

KEY_AGGREGATIONS = ("max", "last")


def search_key_reward(
    queries: Sequence[str], search_keys: Sequence[Sequence[str]], aggregation: str = "max"
) -> float:
    """r_key for the emitted `queries` (in emission order) against `search_keys` (one list per sub-question)."""
    if aggregation not in KEY_AGGREGATIONS:
        raise ValueError(f"search-key aggregation must be one of {KEY_AGGREGATIONS}, got {aggregation!r}")
    if not queries or not search_keys:
        return 0.0
    scored_queries = queries if aggregation == "max" else queries[-1:]
    total = 0.0
    for keys in search_keys:
        total += max((f1_score(query, keys) for query in scored_queries), default=0.0)
    return total / len(search_keys)
