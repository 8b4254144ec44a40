"""PPO loss twin: hand-computed tokens and aggregations, gradients, micro-batch invariance, explained variance."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import explained_variance_score

from stepsearch.algo.ppo_loss import (
    LOSS_AGG_MODES,
    explained_variance,
    loss_normalizers,
    policy_loss,
    ppo_loss,
    value_loss,
)

F64 = torch.float64
SETTINGS = dict(clip_ratio=0.2, value_clip=0.5, vf_coef=0.7, entropy_coef=0.01)


def _policy_tokens(advantages, ratios, dual_clip=None):
    """Per-token policy loss and d loss / d logp of single-token rows (token-mean over one token)."""
    losses, grads = [], []
    for advantage, ratio in zip(advantages, ratios):
        logp = torch.tensor([[math.log(ratio)]], dtype=F64, requires_grad=True)
        out = policy_loss(logp, torch.zeros(1, 1, dtype=F64), torch.tensor([[advantage]], dtype=F64),
                          torch.ones(1, 1), clip_ratio=0.2, dual_clip=dual_clip)
        out.loss.backward()
        losses.append(out.policy_loss.item())
        grads.append(logp.grad.item())
    return losses, grads


def test_policy_loss_hand_computed():
    losses, grads = _policy_tokens([1.0, 1.0, -1.0, -1.0], [1.1, 1.5, 0.5, 1.1])
    assert losses == pytest.approx([-1.1, -1.2, 0.8, 1.1])
    assert grads == pytest.approx([-1.1, 0.0, 0.0, 1.1])  # the clipped branch has no gradient


def test_dual_clip_bounds_negative_advantages():
    losses, grads = _policy_tokens([-1.0, -1.0, 2.0], [5.0, 2.0, 5.0], dual_clip=3.0)
    assert losses == pytest.approx([3.0, 2.0, -2.4])
    assert grads == pytest.approx([0.0, 2.0, 0.0])


def test_log_ratio_clamp_stops_the_gradient():
    logp = torch.tensor([[30.0]], dtype=F64, requires_grad=True)
    out = policy_loss(logp, torch.zeros(1, 1, dtype=F64), -torch.ones(1, 1, dtype=F64), torch.ones(1, 1),
                      clip_ratio=0.2)
    out.loss.backward()
    assert out.policy_loss.item() == pytest.approx(math.exp(20.0))
    assert logp.grad.item() == 0.0


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.2]], dtype=F64, requires_grad=True)
    out = value_loss(values, torch.zeros(1, 2, dtype=F64), torch.tensor([[2.0, 1.0]], dtype=F64), torch.ones(1, 2),
                     value_clip=0.5, vf_coef=2.0)
    # token 0: clipped to 0.5, max(1, 2.25) = 2.25 (clipped, no grad); token 1: inside the clip, 0.64
    assert out.value_loss.item() == pytest.approx(0.5 * (2.25 + 0.64) / 2)
    assert out.loss.item() == pytest.approx(2.0 * out.value_loss.item())
    assert out.value_clip_frac.item() == pytest.approx(0.5)
    out.loss.backward()
    assert values.grad[0].tolist() == pytest.approx([0.0, 2.0 * (0.2 - 1.0) / 2])


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 7 / 3), ("seq-mean-token-sum", 3.5), ("seq-mean-token-mean", 2.75)])
def test_aggregation_modes_hand_computed(mode, expected):
    entropy = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0], [9.0, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    zeros = torch.zeros(3, 3, dtype=F64)
    out = policy_loss(zeros, zeros, zeros, mask, entropy, clip_ratio=0.2, entropy_coef=0.5, loss_agg_mode=mode)
    assert out.entropy_loss.item() == pytest.approx(expected)
    assert out.loss.item() == pytest.approx(-0.5 * expected)


def _random_batch(seed, batch=6, length=9, dtype=F64):
    generator = torch.Generator().manual_seed(seed)

    def randn():
        return torch.randn(batch, length, generator=generator, dtype=dtype)

    logp = randn()
    mask = torch.rand(batch, length, generator=generator) < 0.6
    mask[2] = False  # an empty sequence
    return dict(logp=logp, old_logp=logp + 0.3 * randn(), advantages=randn(), values=randn(),
                old_values=randn(), returns=randn(), loss_mask=mask, entropy=randn().abs())


def _loss_and_grads(batch, **kwargs):
    leaves = {name: batch[name].clone().requires_grad_() for name in ("logp", "values", "entropy")}
    out = ppo_loss(**{**batch, **leaves}, **SETTINGS, dual_clip=3.0, **kwargs)
    out.loss.backward()
    return out, {name: leaf.grad for name, leaf in leaves.items()}


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_micro_batches_with_global_normalisers_sum_to_the_mini_batch(mode):
    batch = _random_batch(0)
    full, full_grads = _loss_and_grads(batch, loss_agg_mode=mode)
    splits = [slice(0, 2), slice(2, 3), slice(3, 6)]  # "ranks x micro-batches"; one holds only an empty row
    counts = [loss_normalizers(batch["loss_mask"][rows]) for rows in splits]
    global_tokens = sum(tokens for tokens, _ in counts)
    global_seqs = sum(seqs for _, seqs in counts)
    parts = [_loss_and_grads({k: v[rows] for k, v in batch.items()}, loss_agg_mode=mode,
                             global_token_count=global_tokens, global_seq_count=global_seqs) for rows in splits]
    for field in full._fields:
        total = sum(getattr(out, field) for out, _ in parts)
        assert total.item() == pytest.approx(getattr(full, field).item(), rel=1e-12, abs=1e-12), field
    for name, grad in full_grads.items():
        torch.testing.assert_close(torch.cat([grads[name] for _, grads in parts]), grad)


def test_gradients_match_finite_differences():
    batch = _random_batch(1, batch=3, length=5)

    def loss_of(logp, values, entropy):
        return ppo_loss(logp, batch["old_logp"], batch["advantages"], values, batch["old_values"], batch["returns"],
                        batch["loss_mask"], entropy, **SETTINGS, loss_agg_mode="seq-mean-token-mean").loss

    inputs = tuple(batch[name].clone().requires_grad_() for name in ("logp", "values", "entropy"))
    assert torch.autograd.gradcheck(loss_of, inputs)


def test_actor_and_critic_parts_add_up_to_the_combined_loss():
    batch = _random_batch(2)
    combined = ppo_loss(**batch, **SETTINGS)
    actor = policy_loss(batch["logp"], batch["old_logp"], batch["advantages"], batch["loss_mask"], batch["entropy"],
                        clip_ratio=0.2, entropy_coef=0.01)
    critic = value_loss(batch["values"], batch["old_values"], batch["returns"], batch["loss_mask"], value_clip=0.5,
                        vf_coef=0.7)
    assert (actor.loss + critic.loss).item() == pytest.approx(combined.loss.item())
    assert actor.value_loss.item() == 0 and critic.policy_loss.item() == 0
    assert actor.clip_frac.item() == pytest.approx(combined.clip_frac.item())
    assert critic.value_clip_frac.item() == pytest.approx(combined.value_clip_frac.item())
    assert all(x.dim() == 0 for x in combined)


def test_diagnostics_hand_computed():
    logp = torch.tensor([[math.log(1.5), math.log(1.1), 0.0]], dtype=F64)
    out = policy_loss(logp, torch.zeros(1, 3, dtype=F64), torch.ones(1, 3, dtype=F64),
                      torch.tensor([[1, 1, 0]]), clip_ratio=0.2)
    assert out.clip_frac.item() == pytest.approx(0.5)
    k3 = [(r - 1) - math.log(r) for r in (1.5, 1.1)]
    assert out.approx_kl.item() == pytest.approx(sum(k3) / 2)


def test_empty_batch_gives_zero_loss_and_bad_inputs_are_named():
    batch = _random_batch(3)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    out = ppo_loss(**batch, **SETTINGS)
    assert all(x.item() == 0 for x in out)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ppo_loss(**batch, **SETTINGS, loss_agg_mode="sum")
    with pytest.raises(ValueError, match="returns must be"):
        ppo_loss(**{**batch, "returns": batch["returns"][:, :2]}, **SETTINGS)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_loss(**batch, **SETTINGS, dual_clip=0.5)
    with pytest.raises(ValueError, match="old_values is required when values is given"):
        ppo_loss(**{**batch, "old_values": None}, **SETTINGS)
    with pytest.raises(ValueError, match="give logp"):
        ppo_loss(**{**batch, "logp": None, "values": None, "entropy": None}, **SETTINGS)


def test_explained_variance_matches_sklearn():
    batch = _random_batch(4)
    mask = batch["loss_mask"]
    returns, values = batch["returns"], batch["returns"] + 0.5 * batch["values"]
    ours = explained_variance(values, returns, mask).item()
    assert ours == pytest.approx(explained_variance_score(returns[mask].numpy(), values[mask].numpy()))
    constant = torch.ones(2, 3, dtype=F64)
    assert explained_variance(constant, constant, torch.ones(2, 3)).item() == 1.0
    assert explained_variance(constant + 1, constant, torch.ones(2, 3)).item() == 1.0  # Var(R - V) = 0 too
    varying = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    assert explained_variance(varying, constant[:1], torch.ones(1, 3)).item() == 0.0
    assert explained_variance_score(constant[0].numpy(), varying[0].numpy()) == 0.0
