"""Outcome reward of a whole response: answer F1 (or the format penalty) plus the weighted search-key reward.

    reward = (F1(answer, golds) if is_valid_format(response) else format_penalty) + key_weight * r_key

The answer is the content of the last `<answer>` block and the format rule is `is_valid_format`'s
(`stepsearch.rewards.answer`); r_key is `search_key_reward` (`stepsearch.rewards.search_key`). F1 and EM are
reported for the extracted answer even when the format is invalid (they are metrics then, not the reward); with no
answer block both are 0.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from stepsearch.rewards.answer import exact_match, extract_answer, f1_score, is_valid_format
from stepsearch.rewards.search_key import search_key_reward

if TYPE_CHECKING:
    from stepsearch.config import RewardConfig


class OutcomeScore(NamedTuple):
    """The outcome reward of one response and the parts it is made of."""

    reward: float
    """(f1 if valid_format else format_penalty) + key_weight * key_reward."""
    f1: float
    """Token F1 of the extracted answer, max over gold aliases."""
    em: float
    """Exact match of the extracted answer, max over gold aliases."""
    key_reward: float
    """Search-key reward r_key, before weighting."""
    valid_format: bool
    """Whether the last `<answer>…</answer>` block ends the response."""


def outcome_reward(
    response_text: str,
    golds: str | Sequence[str],
    queries: Sequence[str],
    search_keys: Sequence[Sequence[str]],
    *,
    format_penalty: float,
    key_weight: float,
    key_aggregation: str,
) -> OutcomeScore:
    """Outcome reward of `response_text` (EOS string already stripped) given gold aliases and the emitted queries."""
    answer = extract_answer(response_text)
    valid_format = is_valid_format(response_text)
    f1 = f1_score(answer, golds)
    key_reward = search_key_reward(queries, search_keys, key_aggregation)
    reward = (f1 if valid_format else format_penalty) + key_weight * key_reward
    return OutcomeScore(reward, f1, exact_match(answer, golds), key_reward, valid_format)


def outcome_reward_from_config(
    response_text: str,
    golds: str | Sequence[str],
    queries: Sequence[str],
    search_keys: Sequence[Sequence[str]],
    reward_cfg: RewardConfig,
) -> OutcomeScore:
    """`outcome_reward` with format penalty, key weight and key aggregation taken from the reward config."""
    return outcome_reward(
        response_text,
        golds,
        queries,
        search_keys,
        format_penalty=reward_cfg.format_penalty,
        key_weight=reward_cfg.key_weight,
        key_aggregation=reward_cfg.key_aggregation,
    )
