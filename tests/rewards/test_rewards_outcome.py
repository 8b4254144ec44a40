"""Outcome reward = (F1 if valid format else format_penalty) + key_weight * r_key, and its config front end."""
import pytest

from stepsearch.config import RewardConfig
from stepsearch.rewards.outcome import OutcomeScore, outcome_reward, outcome_reward_from_config

GOLDS = ["red dog barks"]
SEARCH_KEYS = [["Paris capital"]]
QUERIES = ["capital of France"]  # r_key = 0.4 (see test_rewards_search_key.py)
PARAMS = dict(format_penalty=-1.0, key_weight=0.5, key_aggregation="max")


def test_valid_response_earns_f1_plus_weighted_key_reward():
    score = outcome_reward("<think>t</think><answer>the big red dog</answer>", GOLDS, QUERIES, SEARCH_KEYS, **PARAMS)
    # F1 2/3 + 0.5 * 0.4
    assert score.reward == pytest.approx(2 / 3 + 0.2)
    assert score.f1 == pytest.approx(2 / 3)
    assert score.em == 0.0
    assert score.key_reward == pytest.approx(0.4)
    assert score.valid_format is True


def test_invalid_format_replaces_f1_by_the_penalty_but_still_reports_f1():
    score = outcome_reward("<answer>red dog barks</answer> extra", GOLDS, QUERIES, SEARCH_KEYS, **PARAMS)
    assert score.reward == pytest.approx(-1.0 + 0.2)
    assert (score.f1, score.em, score.valid_format) == (1.0, 1.0, False)


def test_no_answer():
    score = outcome_reward("<think>I give up</think>", GOLDS, [], SEARCH_KEYS, **PARAMS)
    assert score == OutcomeScore(reward=-1.0, f1=0.0, em=0.0, key_reward=0.0, valid_format=False)


def test_paper_default_penalty_is_zero():
    score = outcome_reward("no tags", GOLDS, QUERIES, SEARCH_KEYS, format_penalty=0.0, key_weight=0.0,
                           key_aggregation="max")
    assert score.reward == 0.0


def test_from_config_uses_the_reward_section():
    config = RewardConfig(format_penalty=-1.0, key_weight=0.618, key_aggregation="last")
    response = "<answer>red dog</answer>"
    queries = ["capital of France", "unrelated"]
    expected = outcome_reward(response, GOLDS, queries, SEARCH_KEYS, format_penalty=-1.0, key_weight=0.618,
                              key_aggregation="last")
    assert outcome_reward_from_config(response, GOLDS, queries, SEARCH_KEYS, config) == expected
    assert expected.key_reward == 0.0  # "last" keeps only the unrelated final query
    assert expected.reward == pytest.approx(0.8)  # F1 of [red, dog] vs [red, dog, barks]
