"""Generalised advantage estimation over generated tokens only (verl semantics), and advantage whitening.

For one sequence, with m_t = [loss_mask_t != 0] and n(t) the first masked-in position after t (none -> V = A = 0):

    delta_t = r_t + gamma * V_n(t) - V_t
    A_t     = delta_t + gamma * lam * A_n(t)            for masked-in t
    R_t     = A_t + V_t                                  (returns, the critic's target)

Masked-out positions (retrieved `<information>` text, prompt, padding) are skipped: the recurrence passes through
them unchanged, so a retrieved block between two generated tokens neither discounts nor adds anything. This is the
result of verl's loop (`gae_python_loop`). Outputs are un-whitened; `advantages` and `returns` are 0 at masked-out
positions (verl leaves the carried-through value there; no loss reads those positions, and zeros make that explicit).

The recurrence is a composition of affine maps, hence an associative scan. `compute_gae` writes it as two reverse
scans of the form x_t = a_t + c_t * x_(t+1):

    W_t = V_t if m_t else W_(t+1)             (c = 1 - m, a = m * V)  -> W_(t+1) = V_n(t), the next value
    A_t = delta_t if m_t ... + c_t A_(t+1)    (c = gamma*lam on masked-in tokens, 1 on masked-out; a = m * delta)

each evaluated with log2(T) doubling steps of whole-tensor torch ops (`reverse_linear_scan`) instead of T dependent
Python steps. That wins where launches are expensive and bandwidth is plentiful (GPU), but it does O(T log T) work
against the loop's O(T): on CPU it is faster than the loop only at small shapes. Measured with
`benchmarks/bench_gae.py --quick` on a shared 2-core x86 machine (`benchmarks/results/gae_quick.csv`): with one
thread 8.2x / 2.8x / 1.6x faster at B x T = 64x512 / 256x1024 / 512x4096; with two threads 3.6x faster at 64x512
but slower at 256x1024 (0.2x) and 512x4096 (0.7x). On CPU the trainer's scan is therefore no faster than the
peers' loop for long batches; it is the specification and the kernel's twin, not a CPU optimisation.
`gae_python_loop` is the straightforward loop the peers (verl, OpenRLHF, TRL, Search-R1) use: the readable
statement of the semantics, the referee in the tests and the baseline in `benchmarks/bench_gae.py`.
`scatter_rewards_and_gae` composes `scatter_rewards` and `compute_gae` (the fused Triton kernel computes the same
without writing the rewards to memory).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from stepsearch.algo.scatter import check_scatter_inputs, compute_dtype, scatter_rewards

__all__ = [
    "compute_gae",
    "gae_python_loop",
    "reverse_linear_scan",
    "masked_whiten",
    "scatter_rewards_and_gae",
    "RewardsAndGAE",
    "check_gae_inputs",
]


class RewardsAndGAE(NamedTuple):
    """Result of `scatter_rewards_and_gae`: (B, T) tensors; `token_rewards` is None unless asked for."""

    advantages: torch.Tensor
    returns: torch.Tensor
    token_rewards: torch.Tensor | None


def check_gae_inputs(values: torch.Tensor, loss_mask: torch.Tensor, gamma: float, lam: float,
                     token_rewards: torch.Tensor | None = None) -> None:
    """Raise ValueError naming the argument when shapes or settings disagree (no host sync)."""
    if loss_mask.dim() != 2:
        raise ValueError(f"compute_gae: loss_mask must be (B, T), got shape {tuple(loss_mask.shape)}")
    if values.shape != loss_mask.shape:
        raise ValueError(f"compute_gae: values must be (B, T) = {tuple(loss_mask.shape)}, "
                         f"got shape {tuple(values.shape)}")
    if token_rewards is not None and token_rewards.shape != loss_mask.shape:
        raise ValueError(f"compute_gae: token_rewards must be (B, T) = {tuple(loss_mask.shape)}, "
                         f"got shape {tuple(token_rewards.shape)}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"compute_gae: gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")


def reverse_linear_scan(coef: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """x (B, T) with x_t = offset_t + coef_t * x_(t+1) and x_T = 0, along the last dimension.

    Doubling (Hillis-Steele) scan on affine maps: after the step of span d, (c_t, a_t) is the composite map of
    positions t .. t+2d-1, so a_t = x_t once the span covers the row. log2(T) steps, each a few whole-tensor ops.
    """
    length = offset.shape[-1]
    span = 1
    while span < length:
        # Positions within `span` of the end already hold their complete maps (x_T = 0 beyond them).
        offset = torch.cat((offset[..., :-span] + coef[..., :-span] * offset[..., span:], offset[..., -span:]), -1)
        coef = torch.cat((coef[..., :-span] * coef[..., span:], coef[..., -span:]), -1)
        span *= 2
    return offset


def compute_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns (both (B, T), un-whitened, 0 at masked-out positions).

    Args:
        token_rewards: (B, T) per-token rewards (from `scatter_rewards`); ignored where loss_mask == 0.
        values: (B, T) critic values V_t of the response tokens; ignored where loss_mask == 0.
        loss_mask: (B, T) nonzero on generated tokens.
        gamma, lam: discount and GAE lambda in [0, 1].

    Computes in float64 when an input is float64, else float32.
    """
    check_gae_inputs(values, loss_mask, gamma, lam, token_rewards)
    dtype = compute_dtype(token_rewards, values)
    mask = loss_mask != 0  # (B, T)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    values = torch.where(mask, values.to(dtype), zero)  # (B, T) masked-out values may be garbage (padding)
    rewards = torch.where(mask, token_rewards.to(dtype), zero)  # (B, T)

    # W_t: value at the first masked-in position >= t (0 if none); V_n(t) = W_(t+1).
    first_value_from = reverse_linear_scan((~mask).to(dtype), values)  # (B, T)
    next_values = torch.cat([first_value_from[:, 1:], first_value_from[:, :0].new_zeros(len(mask), 1)], dim=1)
    deltas = torch.where(mask, rewards + gamma * next_values - values, zero)  # (B, T)
    decay = torch.where(mask, torch.full((), gamma * lam, dtype=dtype, device=values.device),
                        torch.ones((), dtype=dtype, device=values.device))  # (B, T)
    advantages = torch.where(mask, reverse_linear_scan(decay, deltas), zero)  # (B, T)
    returns = torch.where(mask, advantages + values, zero)  # (B, T)
    return advantages, returns


def gae_python_loop(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The peers' GAE: a Python loop over T as in verl's `compute_gae_advantage_return` (masked variant).

    Same results as `compute_gae` (masked-out outputs zeroed the same way); T dependent steps of small kernels.
    """
    check_gae_inputs(values, loss_mask, gamma, lam, token_rewards)
    dtype = compute_dtype(token_rewards, values)
    mask = (loss_mask != 0).to(dtype)  # (B, T)
    values = torch.where(mask != 0, values.to(dtype), 0.0)  # (B, T)
    rewards = torch.where(mask != 0, token_rewards.to(dtype), 0.0)  # (B, T)
    batch, length = mask.shape
    next_value = torch.zeros(batch, dtype=dtype, device=values.device)  # (B,)
    last_advantage = torch.zeros(batch, dtype=dtype, device=values.device)  # (B,)
    advantages_reversed = []
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * last_advantage
        next_value = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_value
        last_advantage = advantage * mask[:, t] + (1 - mask[:, t]) * last_advantage
        advantages_reversed.append(last_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) if length else torch.zeros_like(values)
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten `values` (B, T) over the positions where `mask` is nonzero; 0 elsewhere.

    (x - mean) / sqrt(var + 1e-8) with the unbiased variance (Bessel's correction, as verl); with
    `shift_mean=False` the mean is added back. Fewer than two masked-in positions give variance 0. No host sync.
    """
    selected = mask != 0  # (B, T)
    count = selected.sum().to(values.dtype)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    masked = torch.where(selected, values, zero)
    mean = masked.sum() / count.clamp(min=1)
    centred = torch.where(selected, values - mean, zero)
    variance = centred.square().sum() / (count - 1).clamp(min=1)
    whitened = centred * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(selected, whitened, zero)


def scatter_rewards_and_gae(
    outcome: torch.Tensor,
    step_scores: torch.Tensor,
    step_ends: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    kl_coef: float,
    gamma: float,
    lam: float,
    kl_estimator: str = "k1",
    return_rewards: bool = False,
) -> RewardsAndGAE:
    """`scatter_rewards` then `compute_gae`; see both for the arguments. token_rewards is returned on request."""
    check_scatter_inputs(outcome, step_scores, step_ends, old_logp, ref_logp, loss_mask, kl_coef, kl_estimator)
    check_gae_inputs(values, loss_mask, gamma, lam)
    rewards = scatter_rewards(outcome, step_scores, step_ends, old_logp, ref_logp, loss_mask, kl_coef, kl_estimator)
    advantages, returns = compute_gae(rewards, values.to(compute_dtype(rewards, values)), loss_mask, gamma, lam)
    return RewardsAndGAE(advantages, returns, rewards if return_rewards else None)
