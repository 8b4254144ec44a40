"""Search-key reward r_key: how well the emitted search queries match the reference keys of each sub-question.

Sub-question i has reference search keys k_i1, k_i2, … (alternative phrasings); F1 is the SQuAD token F1 of
`stepsearch.rewards.answer` (normalised text, so an empty query scores 0 against every key), and
f(q, i) = max_j F1(q, k_ij) is the best alternative of group i for query q. Over the M groups:

- "max" (paper): r_key = (1/M) * sum_i max_q f(q, i), the best emitted query for each sub-question.
- "released" (the released StepSearch code's `step_search_keys_match`): the queries are visited in emission
  order; each query is credited to the one group where f(q, i) is highest (ties to the first such group) and
  *overwrites* that group's slot with f(q, i), so a later, weaker query for the same group lowers it; a query
  with f = 0 for every group changes nothing. r_key = (sum of slots) / M, slots starting at 0.

M counts every sub-question, including one with no reference keys (which contributes 0). No queries, or no
sub-questions, give 0.0. Unlike the released code, F1 is not rounded to 4 decimals.
"""
from __future__ import annotations

from collections.abc import Sequence

from stepsearch.rewards.answer import f1_score

KEY_AGGREGATIONS = ("max", "released")


def _released_slots(queries: Sequence[str], search_keys: Sequence[Sequence[str]]) -> list[float]:
    slots = [0.0] * len(search_keys)
    for query in queries:
        scores = [f1_score(query, keys) for keys in search_keys]
        best = max(scores)
        if best > 0:
            slots[scores.index(best)] = best  # index() is the first group holding the maximum
    return slots


def search_key_reward(
    queries: Sequence[str], search_keys: Sequence[Sequence[str]], aggregation: str = "max"
) -> float:
    """r_key for the emitted `queries` (in emission order) against `search_keys` (one list per sub-question)."""
    if aggregation not in KEY_AGGREGATIONS:
        raise ValueError(f"search-key aggregation must be one of {KEY_AGGREGATIONS}, got {aggregation!r}")
    if not queries or not search_keys:
        return 0.0
    if aggregation == "released":
        return sum(_released_slots(queries, search_keys)) / len(search_keys)
    return sum(max(f1_score(query, keys) for query in queries) for keys in search_keys) / len(search_keys)
