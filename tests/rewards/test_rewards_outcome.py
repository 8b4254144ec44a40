"""Outcome reward = (F1 if valid format else format_penalty) + key_weight * r_key, the invalid-format rules
("penalty_plus_rewards": paper; "penalty_only": released code, exactly the penalty), and the config front end."""
from pathlib import Path

import pytest

from stepsearch.config import RewardConfig, load_config
from stepsearch.rewards.outcome import OutcomeScore, outcome_reward, outcome_reward_from_config

GOLDS = ["red dog barks"]
SEARCH_KEYS = [["Paris capital"]]
QUERIES = ["capital of France"]  # r_key = 0.4 (see test_rewards_search_key.py)
PARAMS = dict(format_penalty=-1.0, key_weight=0.5, key_aggregation="max")


def test_valid_response_earns_f1_plus_weighted_key_reward():
    score = outcome_reward("the big red dog", True, GOLDS, QUERIES, SEARCH_KEYS, **PARAMS)
    # F1 2/3 + 0.5 * 0.4
    assert score.reward == pytest.approx(2 / 3 + 0.2)
    assert (score.f1, score.em, score.key_reward) == (pytest.approx(2 / 3), 0.0, pytest.approx(0.4))
    assert score.valid_format is True and score.keeps_step_rewards is True


def test_invalid_format_paper_rule_keeps_the_key_term_and_the_step_rewards():
    score = outcome_reward("red dog barks", False, GOLDS, QUERIES, SEARCH_KEYS, **PARAMS)
    assert score.reward == pytest.approx(-1.0 + 0.2)
    assert (score.f1, score.em, score.valid_format, score.keeps_step_rewards) == (1.0, 1.0, False, True)


def test_invalid_format_released_rule_is_exactly_the_penalty_and_drops_step_rewards():
    score = outcome_reward("red dog barks", False, GOLDS, QUERIES, SEARCH_KEYS, **PARAMS, invalid_format="penalty_only")
    assert score.reward == -1.0
    assert score.keeps_step_rewards is False
    assert score.key_reward == pytest.approx(0.4)  # still reported as a metric
    valid = outcome_reward("red dog", True, GOLDS, QUERIES, SEARCH_KEYS, **PARAMS, invalid_format="penalty_only")
    assert valid.reward == pytest.approx(0.8 + 0.2) and valid.keeps_step_rewards  # F1 of [red, dog] is 0.8


def test_no_answer():
    score = outcome_reward(None, False, GOLDS, [], SEARCH_KEYS, **PARAMS)
    assert score == OutcomeScore(reward=-1.0, f1=0.0, em=0.0, key_reward=0.0, valid_format=False,
                                 keeps_step_rewards=True)


def test_paper_default_penalty_is_zero():
    score = outcome_reward(None, False, GOLDS, QUERIES, SEARCH_KEYS, format_penalty=0.0, key_weight=0.0,
                           key_aggregation="max")
    assert score.reward == 0.0


def test_unknown_invalid_format_rule_is_rejected():
    with pytest.raises(ValueError, match="invalid_format"):
        outcome_reward("a", False, GOLDS, QUERIES, SEARCH_KEYS, **PARAMS, invalid_format="ignore")


def test_from_config_uses_the_reward_section():
    config = RewardConfig(format_penalty=-1.0, key_weight=0.618, key_aggregation="released",
                          invalid_format="penalty_only")
    queries = ["capital of France", "unrelated"]
    expected = outcome_reward("red dog", True, GOLDS, queries, SEARCH_KEYS, format_penalty=-1.0, key_weight=0.618,
                              key_aggregation="released", invalid_format="penalty_only")
    assert outcome_reward_from_config("red dog", True, GOLDS, queries, SEARCH_KEYS, config) == expected
    assert expected.key_reward == pytest.approx(0.4)  # "unrelated" scores 0 everywhere and changes no slot
    assert expected.reward == pytest.approx(0.8 + 0.618 * 0.4)


def test_parity_preset_takes_the_released_rules():
    reward = load_config(Path(__file__).resolve().parents[2] / "configs" / "parity.yaml").reward
    assert (reward.format_penalty, reward.invalid_format, reward.key_aggregation) == (-1.0, "penalty_only", "released")
    assert (reward.step_weight, reward.redundancy_identity) == (1.6, "text")
    assert load_config(None).reward.invalid_format == "penalty_plus_rewards"
