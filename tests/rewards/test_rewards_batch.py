"""`score_rollout`: the whole StePPO reward of a rollout batch (grouping by question, s^t = step_weight (G - P),
outcome, the invalid-format rule, details and metrics), with hand-computed values."""
from types import SimpleNamespace

import pytest
import torch

from stepsearch.config import RewardConfig
from stepsearch.rewards import score_rollout

GOLD_TEXT = "Brennick is a town founded by Mara Vell in 1802."
GOLD = SimpleNamespace(id="d1", text=GOLD_TEXT)  # cosine 1 with the golden doc
OTHER = SimpleNamespace(id="d9", text="Quartz sand glitters")  # no common term: cosine 0
RECORDS = [
    SimpleNamespace(question="Who founded Brennick?", answers=["Mara Vell"], search_keys=[["Brennick founded by"]],
                    support_docs=[SimpleNamespace(text=GOLD_TEXT)]),
    SimpleNamespace(question="Where is Tolland?", answers=["Tolland"], search_keys=[], support_docs=[]),
]


def _rollout():
    # Row 0: valid answer; rounds [gold], [gold] -> G = [1, 0], P = [0, 1].
    # Row 1: no answer (invalid); rounds [gold], notice -> G = [1, 0], P = [0, 0].
    # Row 2: the question without golden docs -> G = P = 0.
    return SimpleNamespace(
        record_indices=[0, 0, 1], answers=["Mara Vell", None, "Tolland"], valid_format=[True, False, True],
        queries=[["Brennick founded by", "Brennick founded by"], ["x", ""], ["Tolland"]],
        retrieved=[[[GOLD], [GOLD]], [[GOLD], []], [[GOLD]]], response_texts=["r0", "r1", "r2"],
        step_ends=torch.tensor([[3, 9], [4, 8], [2, -1]]))


def test_paper_rule_hand_computed():
    config = RewardConfig(format_penalty=-1.0, key_weight=0.5, step_weight=1.6)
    rewards = score_rollout(_rollout(), RECORDS, config)
    # Row 0: F1 1 + 0.5 * r_key 1; row 1: -1 + 0.5 * r_key("x") 0; row 2: F1 1 + 0.5 * 0 (no keys).
    assert rewards.outcome.tolist() == pytest.approx([1.5, -1.0, 1.0])
    torch.testing.assert_close(rewards.step_scores, torch.tensor([[1.6, -1.6], [1.6, 0.0], [0.0, 0.0]]))
    assert rewards.trajectories[0].gains == pytest.approx([1.0, 0.0])
    assert rewards.trajectories[0].penalties == [0.0, 1.0]
    assert rewards.trajectories[1].searched == [True, False]
    metrics = rewards.metrics
    # Rounds that retrieved documents, of the question with golden docs: gains 1, 0 (row 0) and 1 (row 1).
    assert metrics["reward/info_gain"] == pytest.approx((1 + 0 + 1) / 3)
    assert metrics["reward/redundancy"] == pytest.approx((0 + 1 + 0) / 3)
    assert metrics["reward/step_reward"] == pytest.approx((0.0 + 1.6 + 0.0) / 3)
    assert metrics["reward/f1"] == pytest.approx(2 / 3) and metrics["reward/valid_format"] == pytest.approx(2 / 3)
    assert metrics["reward/outcome"] == pytest.approx(0.5)
    assert rewards.details[1]["step_scores"] == pytest.approx([1.6, 0.0]) and rewards.details[1]["outcome"] == -1.0
    assert rewards.details[0]["queries"] == ["Brennick founded by", "Brennick founded by"]


def test_released_rule_gives_an_invalid_format_exactly_the_penalty_and_no_step_reward():
    config = RewardConfig(format_penalty=-1.0, key_weight=0.5, step_weight=1.6, invalid_format="penalty_only")
    rewards = score_rollout(_rollout(), RECORDS, config)
    assert rewards.outcome.tolist() == pytest.approx([1.5, -1.0, 1.0])
    torch.testing.assert_close(rewards.step_scores, torch.tensor([[1.6, -1.6], [0.0, 0.0], [0.0, 0.0]]))
    assert rewards.trajectories[1].gains == pytest.approx([1.0, 0.0])  # measured, not rewarded
    assert rewards.metrics["reward/step_reward"] == pytest.approx(0.0)


def test_redundancy_identity_is_the_configured_one():
    # The same text under two ids: redundant by text, not by id.
    twin = SimpleNamespace(id="d1-copy", text=GOLD_TEXT)
    rollout = _rollout()
    rollout.retrieved[0] = [[GOLD], [twin]]
    by_id = score_rollout(rollout, RECORDS, RewardConfig(redundancy_identity="doc_id"))
    by_text = score_rollout(rollout, RECORDS, RewardConfig(redundancy_identity="text"))
    assert by_id.trajectories[0].penalties == [0.0, 0.0]
    assert by_text.trajectories[0].penalties == [0.0, 1.0]
