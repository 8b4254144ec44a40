"""Reward placement: hand-computed rows, masks with holes, empty rows, and input checks."""

from __future__ import annotations

import pytest
import torch

from stepsearch.algo.kl import kl_k3
from stepsearch.algo.scatter import scatter_rewards


def _hand_case():
    loss_mask = torch.tensor([[0, 1, 1, 0, 1, 0],    # prompt-like 0, hole at 3, padding at 5
                              [1, 1, 1, 1, 0, 0],
                              [0, 0, 0, 0, 0, 0]], dtype=torch.bool)  # (B=3, T=6)
    outcome = torch.tensor([1.0, -1.0, 5.0], dtype=torch.float64)
    step_scores = torch.tensor([[0.3, 0.7], [0.2, 0.4], [0.9, 0.9]], dtype=torch.float64)  # (B, S=2)
    step_ends = torch.tensor([[2, -1], [1, 1], [3, -1]])  # row 1: two steps on one token
    old_logp = torch.tensor([[0.0, -1.0, -2.0, 0.0, -0.5, 0.0],
                             [-0.1, -0.2, -0.3, -0.4, 0.0, 0.0],
                             [0.0] * 6], dtype=torch.float64)
    ref_logp = torch.tensor([[0.0, -1.5, -1.0, 0.0, -0.5, 0.0],
                             [-0.1, -0.1, -0.3, -0.2, 0.0, 0.0],
                             [0.0] * 6], dtype=torch.float64)
    return outcome, step_scores, step_ends, old_logp, ref_logp, loss_mask


def test_hand_computed_k1():
    rewards = scatter_rewards(*_hand_case(), kl_coef=0.1)
    expected = torch.tensor([
        [0.0, -0.1 * 0.5, 0.3 - 0.1 * -1.0, 0.0, 1.0, 0.0],
        [0.0, 0.2 + 0.4 - 0.1 * -0.1, 0.0, -1.0 - 0.1 * -0.2, 0.0, 0.0],
        [0.0] * 6,
    ], dtype=torch.float64)
    torch.testing.assert_close(rewards, expected)
    assert rewards.dtype == torch.float64


def test_k3_penalty_and_masked_out_step_is_dropped():
    outcome, step_scores, step_ends, old_logp, ref_logp, loss_mask = _hand_case()
    step_ends[0, 1] = 3  # a step end on the masked-out hole is dropped
    rewards = scatter_rewards(outcome, step_scores, step_ends, old_logp, ref_logp, loss_mask, 0.5, "k3")
    penalty = 0.5 * kl_k3(old_logp, ref_logp)
    assert rewards[0, 3] == 0
    assert rewards[0, 1].item() == pytest.approx(-penalty[0, 1].item())
    assert rewards[0, 4].item() == pytest.approx(1.0 - penalty[0, 4].item())


def test_no_kl_without_logps_and_garbage_at_padding_does_not_leak():
    outcome, step_scores, step_ends, old_logp, ref_logp, loss_mask = _hand_case()
    no_kl = scatter_rewards(outcome, step_scores, step_ends, None, None, loss_mask, 0.0)
    assert no_kl[0].tolist() == [0.0, 0.0, 0.3, 0.0, 1.0, 0.0]
    old_logp[~loss_mask] = float("nan")
    with_nan = scatter_rewards(outcome, step_scores, step_ends, old_logp, ref_logp, loss_mask, 0.1)
    assert torch.isfinite(with_nan).all()


def test_float32_default_and_float_mask():
    outcome, step_scores, step_ends, old_logp, ref_logp, loss_mask = _hand_case()
    rewards = scatter_rewards(outcome.float(), step_scores.float(), step_ends, old_logp.float(), ref_logp.float(),
                              loss_mask.float(), 0.1)
    assert rewards.dtype == torch.float32
    torch.testing.assert_close(rewards.double(), scatter_rewards(*_hand_case(), kl_coef=0.1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad, message", [
    ({"step_ends": torch.tensor([[6, -1], [0, 0], [0, -1]])}, r"step_ends must lie in \[-1, 6\)"),
    ({"step_ends": torch.tensor([[-2, -1], [0, 0], [0, -1]])}, r"step_ends must lie"),
    ({"outcome": torch.zeros(2)}, "outcome must be"),
    ({"old_logp": None}, "required when kl_coef"),
    ({"step_ends": torch.zeros(3, 2)}, "int64 or int32"),
])
def test_bad_inputs_are_named(bad, message):
    names = ["outcome", "step_scores", "step_ends", "old_logp", "ref_logp", "loss_mask"]
    args = dict(zip(names, _hand_case()))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        scatter_rewards(**args, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        scatter_rewards(*_hand_case(), kl_coef=0.1, kl_estimator="k4")
