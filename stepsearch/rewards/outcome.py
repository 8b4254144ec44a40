"""Outcome reward of a whole response: answer F1 (or the format penalty) plus the weighted search-key reward.

    valid format:    reward = F1(answer, golds) + key_weight * r_key
    invalid format:  reward = format_penalty + key_weight * r_key   (invalid_format="penalty_plus_rewards", paper)
                     reward = format_penalty                        (invalid_format="penalty_only", released code)

Under "penalty_only" a trajectory with an invalid format also gets no step rewards (`stepsearch.rewards.batch`
applies `OutcomeScore.keeps_step_rewards`). The answer and the format verdict come from the segmenter
(`stepsearch.rollout.segmenter`: the last `<answer>` block of the generated text, non-empty, ending the response);
r_key is `search_key_reward` (`stepsearch.rewards.search_key`). F1, EM and r_key are reported even when the format
is invalid (they are metrics then, not the reward); with no answer F1 and EM are 0.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from stepsearch.rewards.answer import exact_match, f1_score
from stepsearch.rewards.search_key import search_key_reward

if TYPE_CHECKING:
    from stepsearch.config import RewardConfig

INVALID_FORMAT_RULES = ("penalty_plus_rewards", "penalty_only")


class OutcomeScore(NamedTuple):
    """The outcome reward of one response and the parts it is made of."""

    reward: float
    """See the module docstring."""
    f1: float
    """Token F1 of the extracted answer, max over gold aliases."""
    em: float
    """Exact match of the extracted answer, max over gold aliases."""
    key_reward: float
    """Search-key reward r_key, before weighting (reported even when the reward leaves it out)."""
    valid_format: bool
    """The segmenter's verdict: a non-empty last `<answer>` block ends the generated response."""
    keeps_step_rewards: bool
    """False when `invalid_format="penalty_only"` and the format is invalid: no step reward is placed."""


def outcome_reward(
    answer: str | None,
    valid_format: bool,
    golds: str | Sequence[str],
    queries: Sequence[str],
    search_keys: Sequence[Sequence[str]],
    *,
    format_penalty: float,
    key_weight: float,
    key_aggregation: str,
    invalid_format: str = "penalty_plus_rewards",
) -> OutcomeScore:
    """Outcome reward of a response whose segmentation gave `answer` and `valid_format`, for the emitted queries."""
    if invalid_format not in INVALID_FORMAT_RULES:
        raise ValueError(f"invalid_format must be one of {INVALID_FORMAT_RULES}, got {invalid_format!r}")
    f1 = f1_score(answer, golds)
    key_reward = search_key_reward(queries, search_keys, key_aggregation)
    if valid_format:
        reward = f1 + key_weight * key_reward
    elif invalid_format == "penalty_only":
        reward = format_penalty
    else:
        reward = format_penalty + key_weight * key_reward
    keeps_step_rewards = valid_format or invalid_format == "penalty_plus_rewards"
    return OutcomeScore(reward, f1, exact_match(answer, golds), key_reward, valid_format, keeps_step_rewards)


def outcome_reward_from_config(
    answer: str | None,
    valid_format: bool,
    golds: str | Sequence[str],
    queries: Sequence[str],
    search_keys: Sequence[Sequence[str]],
    reward_cfg: RewardConfig,
) -> OutcomeScore:
    """`outcome_reward` with the penalty, key weight, key aggregation and invalid-format rule of the config."""
    return outcome_reward(
        answer,
        valid_format,
        golds,
        queries,
        search_keys,
        format_penalty=reward_cfg.format_penalty,
        key_weight=reward_cfg.key_weight,
        key_aggregation=reward_cfg.key_aggregation,
        invalid_format=reward_cfg.invalid_format,
    )
