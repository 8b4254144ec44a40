"""KL estimators: hand-computed values, clamps, and the estimator switch."""

from __future__ import annotations

import math

import pytest
import torch

from stepsearch.algo.kl import K3_CLAMP, LOG_RATIO_CLAMP, kl_k1, kl_k2, kl_k3, kl_penalty


def test_hand_computed_values():
    old = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    # log-ratios 0.5, -1.0, 0.0
    assert kl_k1(old, ref).tolist() == pytest.approx([0.5, -1.0, 0.0])
    assert kl_k2(old, ref).tolist() == pytest.approx([0.125, 0.5, 0.0])
    assert kl_k3(old, ref).tolist() == pytest.approx([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0])


def test_k3_is_non_negative_and_k2_matches_k3_to_second_order():
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    assert (kl_k3(x, torch.zeros_like(x)) >= 0).all()
    small = torch.tensor([1e-3], dtype=torch.float64)
    assert kl_k3(small, torch.zeros(1, dtype=torch.float64)).item() == pytest.approx(
        kl_k2(small, torch.zeros(1, dtype=torch.float64)).item(), rel=1e-3)


def test_clamps():
    old = torch.tensor([100.0, -100.0])
    ref = torch.zeros(2)
    assert kl_k1(old, ref).tolist() == [LOG_RATIO_CLAMP, -LOG_RATIO_CLAMP]
    assert kl_k2(old, ref).tolist() == [0.5 * LOG_RATIO_CLAMP**2] * 2
    # exp(20) would be huge; the k3 clamp bounds it, and it stays finite.
    k3 = kl_k3(old, ref)
    assert torch.isfinite(k3).all() and (k3 <= K3_CLAMP).all()
    assert k3[1].item() == K3_CLAMP  # x = -20: exp(20) - 21, clamped
    assert k3[0].item() == K3_CLAMP  # x = +20: 19 + exp(-20), clamped


def test_kl_penalty_dispatch_and_unknown_estimator():
    old, ref = torch.tensor([0.3]), torch.tensor([0.1])
    assert torch.equal(kl_penalty(old, ref, "k2"), kl_k2(old, ref))
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(old, ref, "abs")
