"""GAE twin: a hand-computed row with a hole, the scan against the verl-style loop on random masks, whitening."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepsearch.algo.gae import (
    compute_gae,
    gae_python_loop,
    masked_whiten,
    reverse_linear_scan,
    scatter_rewards_and_gae,
)
from stepsearch.algo.scatter import scatter_rewards


def test_hand_computed_row_with_hole_and_padding():
    mask = torch.tensor([[1, 1, 0, 1, 0]])
    rewards = torch.tensor([[0.5, 0.0, 7.0, 1.0, 3.0]], dtype=torch.float64)  # 7 and 3 sit on masked positions
    values = torch.tensor([[0.2, 0.4, 9.0, 0.6, float("nan")]], dtype=torch.float64)
    advantages, returns = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # A3 = 1 - 0.6; A1 = 0.9*0.6 - 0.4 + 0.72*A3; A0 = 0.5 + 0.9*0.4 - 0.2 + 0.72*A1 (position 2 is skipped)
    a3 = 0.4
    a1 = 0.14 + 0.72 * a3
    a0 = 0.66 + 0.72 * a1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, 0.0, a3, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.2, a1 + 0.4, 0.0, a3 + 0.6, 0.0]], dtype=torch.float64))


def test_gamma_lam_one_sums_future_rewards():
    mask = torch.tensor([[1, 0, 1, 1]])
    rewards = torch.tensor([[1.0, 5.0, 2.0, 3.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0, 0.25, 0.125]], dtype=torch.float64)
    advantages, returns = compute_gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(returns, torch.tensor([[6.0, 0.0, 5.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(advantages, returns - values * mask)


def _random_case(generator, batch, length, density, dtype=torch.float64):
    mask = torch.rand(batch, length, generator=generator) < density  # (B, T)
    if batch > 1:
        mask[0] = False  # an empty row
    rewards = torch.randn(batch, length, generator=generator, dtype=dtype)
    values = torch.randn(batch, length, generator=generator, dtype=dtype)
    return rewards, values, mask


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 5), length=st.integers(0, 70), density=st.floats(0.0, 1.0),
       gamma=st.sampled_from([1.0, 0.99, 0.5, 0.0]), lam=st.sampled_from([1.0, 0.95, 0.0]), seed=st.integers(0, 99))
def test_scan_matches_python_loop(batch, length, density, gamma, lam, seed):
    rewards, values, mask = _random_case(torch.Generator().manual_seed(seed), batch, length, density)
    expected = gae_python_loop(rewards, values, mask, gamma, lam)
    actual = compute_gae(rewards, values, mask, gamma, lam)
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_float32_close_to_float64_at_long_length():
    rewards, values, mask = _random_case(torch.Generator().manual_seed(1), 4, 3000, 0.7)
    want_a, want_r = compute_gae(rewards, values, mask, 0.99, 0.95)
    got_a, got_r = compute_gae(rewards.float(), values.float(), mask, 0.99, 0.95)
    assert got_a.dtype == torch.float32
    for got, want in ((got_a, want_a), (got_r, want_r)):
        assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-5


def test_bf16_values_upcast_and_bad_settings():
    rewards, values, mask = _random_case(torch.Generator().manual_seed(2), 2, 9, 0.6)
    advantages, _ = compute_gae(rewards.float(), values.bfloat16(), mask, 1.0, 1.0)
    assert advantages.dtype == torch.float32
    with pytest.raises(ValueError, match="gamma and lam"):
        compute_gae(rewards, values, mask, 1.5, 1.0)
    with pytest.raises(ValueError, match="values must be"):
        compute_gae(rewards, values[:, :3], mask, 1.0, 1.0)


def test_reverse_linear_scan_matches_recurrence():
    generator = torch.Generator().manual_seed(3)
    coef = torch.rand(3, 19, generator=generator, dtype=torch.float64)
    offset = torch.randn(3, 19, generator=generator, dtype=torch.float64)
    expected = torch.zeros_like(offset)
    carry = torch.zeros(3, dtype=torch.float64)
    for t in reversed(range(19)):
        carry = offset[:, t] + coef[:, t] * carry
        expected[:, t] = carry
    torch.testing.assert_close(reverse_linear_scan(coef, offset), expected)


def test_masked_whiten():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    whitened = masked_whiten(values, mask)
    selected = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    expected = (selected - 2.0) / torch.sqrt(selected.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(whitened[mask.bool()], expected)
    assert whitened[~mask.bool()].eq(0).all()
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False)[mask.bool()], expected + 2.0)
    one = masked_whiten(values, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    assert torch.isfinite(one).all() and one[0, 0] == 0


def test_fused_twin_is_the_composition():
    generator = torch.Generator().manual_seed(4)
    batch, length = 3, 23
    _, values, mask = _random_case(generator, batch, length, 0.6)
    outcome = torch.randn(batch, dtype=torch.float64, generator=generator)
    step_scores = torch.randn(batch, 2, dtype=torch.float64, generator=generator)
    step_ends = torch.tensor([[-1, -1], [4, 10], [22, -1]])
    old_logp = -torch.rand(batch, length, dtype=torch.float64, generator=generator)
    ref_logp = -torch.rand(batch, length, dtype=torch.float64, generator=generator)
    fused = scatter_rewards_and_gae(outcome, step_scores, step_ends, old_logp, ref_logp, values, mask, 0.05, 0.99,
                                    0.95, "k2", return_rewards=True)
    rewards = scatter_rewards(outcome, step_scores, step_ends, old_logp, ref_logp, mask, 0.05, "k2")
    torch.testing.assert_close(fused.token_rewards, rewards)
    advantages, returns = compute_gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(fused.advantages, advantages)
    torch.testing.assert_close(fused.returns, returns)
    assert scatter_rewards_and_gae(outcome, step_scores, step_ends, old_logp, ref_logp, values, mask, 0.05, 0.99,
                                   0.95).token_rewards is None
