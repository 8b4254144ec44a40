"""Rewards of StePPO (DESIGN.md, "Semantics"): answer metrics, outcome reward, search-key reward, step reward.

Imports only the standard library and numpy.
"""
from stepsearch.rewards.answer import exact_match, extract_answer, f1_score, is_valid_format, normalize_answer
from stepsearch.rewards.outcome import OutcomeScore, outcome_reward, outcome_reward_from_config
from stepsearch.rewards.search_key import KEY_AGGREGATIONS, search_key_reward
from stepsearch.rewards.step import (
    REDUNDANCY_IDENTITIES,
    GoldenTfidf,
    step_rewards,
    step_rewards_group,
    tfidf_cosine,
    tfidf_cosine_batch,
)

__all__ = [
    "KEY_AGGREGATIONS",
    "REDUNDANCY_IDENTITIES",
    "GoldenTfidf",
    "OutcomeScore",
    "exact_match",
    "extract_answer",
    "f1_score",
    "is_valid_format",
    "normalize_answer",
    "outcome_reward",
    "outcome_reward_from_config",
    "search_key_reward",
    "step_rewards",
    "step_rewards_group",
    "tfidf_cosine",
    "tfidf_cosine_batch",
]
