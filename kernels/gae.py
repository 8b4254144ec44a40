"""Fused reward scatter + KL penalty + GAE (Triton): one associative scan over time, parallel over B and T.

Same signatures and semantics as the pure-torch twins `stepsearch.algo.gae.compute_gae` and
`stepsearch.algo.gae.scatter_rewards_and_gae` (read `stepsearch.algo.gae` and `stepsearch.algo.scatter` for the
maths). Structure (Liger style): private `@triton.jit` kernels, a launcher, the public functions. No autograd:
advantages and returns are data.

The scan. Walking a row backwards in time, the state (A, W, O) = (advantage of the next generated token, its value,
outcome not yet placed) goes through one affine map per token:

    masked-in t:  A <- gamma*lam*A + gamma*W + O + (r_t - V_t);  W <- V_t;  O <- 0
    masked-out t: identity (the skip-through of verl)

so the outcome lands on the last generated token and every generated token sees the value of the next one. Affine
maps compose associatively; a composite is (p, q, k, u, s, w) meaning A <- pA + qW + kO + u, W <- sW + w,
O <- sO. Each tile of BLOCK tokens is loaded in reversed order (index i holds t = tile_end - 1 - i) and scanned
FORWARD with `tl.associative_scan` (never `reverse=True`, unreliable for non-commutative combines: Triton issue
4362); the carried state enters each element as A_t = p_i A_in + q_i W_in + k_i O_in + u_i.

Parallel over T: a row is cut into chunks of whole tiles. When the rows alone fill the GPU (B >= 2 x SMs) there is
one chunk per row and a single kernel (`_gae_chunk_kernel`) walks its row's tiles right to left with the state in
registers. Otherwise `_gae_summary_kernel` first writes each chunk's composite map (6 floats) and then each chunk
program of `_gae_chunk_kernel` composes the summaries of the chunks to its right (a short scalar loop) to get its
carry-in: B x chunks programs, so few long rows still fill the device (the inputs are read twice in that case).

Rewards are formed in registers (KL from old/ref log-probs, step scores matched per tile against the row's
`step_ends`, loaded once per program as a vector, the outcome through O) and only written to global memory when
`return_rewards=True`. Everything is fp32 in registers; outputs are fp32; float64 inputs are delegated to the twin.
Step ends outside [0, T) are ignored (checking would need a host sync; the twin raises on them). Under
TRITON_INTERPRET=1 the same kernels run on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepsearch.algo.gae import RewardsAndGAE, check_gae_inputs
from stepsearch.algo.gae import compute_gae as _twin_compute_gae
from stepsearch.algo.gae import scatter_rewards_and_gae as _twin_scatter_rewards_and_gae
from stepsearch.algo.scatter import check_scatter_inputs
from stepsearch.kernels.launch import (
    K3_CLAMP,
    LOG_RATIO_CLAMP,
    ceil_div,
    launch_options,
    launch_plan,
    mask_for_kernel,
    next_power_of_two,
    row_major,
)

__all__ = ["compute_gae", "scatter_rewards_and_gae"]

_KL_CODES = {"k1": 1, "k2": 2, "k3": 3}
# 512-token tiles at 4 warps (offline sm_90 compile read with cuobjdump -res-usage, ints specialised as at 512 x 4096,
# 8 step slots): the fused chunk kernel needs 153 registers (3 programs per SM), the summary kernel 78-128; no spills.
_GPU_BLOCK = 512
# Left to itself ptxas keeps the plain-GAE summary kernel at 56 registers and spills 5 loop-invariant scalars around
# the scan (24-byte stack); a 128-register ceiling lets it keep them (no stack) at the same occupancy class.
_SUMMARY_MAX_REGISTERS = 128
# ~2 programs per SM: enough chunks for few long rows, while the summary pass (inputs read twice) stays rare.
_PROGRAMS_PER_SM = 2


@triton.jit
def _compose(p1, q1, k1, u1, s1, w1, p2, q2, k2, u2, s2, w2):
    """Composite of two affine state maps: first (p1, ...), then (p2, ...) (scan order = backwards in time)."""
    return (
        p2 * p1,
        p2 * q1 + q2 * s1,
        p2 * k1 + k2 * s1,
        p2 * u1 + q2 * w1 + u2,
        s2 * s1,
        s2 * w1 + w2,
    )


@triton.jit
def _last(x, BLOCK: tl.constexpr):
    """x[BLOCK - 1] as a scalar (the inclusive scan's total)."""
    return tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, x, 0.0), axis=0)


@triton.jit
def _row_steps(row, step_ends_ptr, step_scores_ptr, num_steps, length, FUSED: tl.constexpr, STEPS: tl.constexpr):
    """A row's step ends (int32, -1 where absent or outside [0, T)) and scores (fp32), once per program."""
    slots = tl.arange(0, STEPS)
    present = slots < num_steps
    if FUSED:
        offsets = row.to(tl.int64) * num_steps + slots
        ends = tl.load(step_ends_ptr + offsets, mask=present, other=-1)
        ends = tl.where((ends >= 0) & (ends < length), ends, -1).to(tl.int32)  # no int64 tiles, no wrap-around
        scores = tl.load(step_scores_ptr + offsets, mask=present, other=0.0).to(tl.float32)
    else:
        ends = tl.full([STEPS], -1, tl.int32)
        scores = tl.zeros([STEPS], dtype=tl.float32)
    return ends, scores


@triton.jit
def _tile_maps(
    row, tile_end, tile_start, length,
    rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr, step_ends_row, step_scores_row,
    stride_rewards, stride_values, stride_mask, stride_old, stride_ref,
    kl_coef, gamma, gamma_lam,
    FUSED: tl.constexpr, HAS_KL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per-token affine maps of one tile in reversed order, plus t, the mask, the values and the rewards."""
    t = tile_end - 1 - tl.arange(0, BLOCK)  # (BLOCK,) reversed time
    in_tile = (t >= tile_start) & (t < length)
    row64 = row.to(tl.int64)
    masked_in = tl.load(mask_ptr + row64 * stride_mask + t, mask=in_tile, other=0) != 0
    values = tl.load(values_ptr + row64 * stride_values + t, mask=masked_in, other=0.0).to(tl.float32)
    if FUSED:
        rewards = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_KL:
            old_logp = tl.load(old_logp_ptr + row64 * stride_old + t, mask=masked_in, other=0.0).to(tl.float32)
            ref_logp = tl.load(ref_logp_ptr + row64 * stride_ref + t, mask=masked_in, other=0.0).to(tl.float32)
            log_ratio = tl.minimum(tl.maximum(old_logp - ref_logp, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
            if KL_ESTIMATOR == 1:
                kl = log_ratio
            elif KL_ESTIMATOR == 2:
                kl = 0.5 * log_ratio * log_ratio
            else:
                kl = tl.minimum(tl.maximum(tl.exp(-log_ratio) - 1.0 + log_ratio, -K3_CLAMP), K3_CLAMP)
            rewards -= kl_coef * kl
        # (STEPS, BLOCK) match against the row's step ends, loaded once per program; two steps on one token add up.
        # Steps on axis 0: each thread holds every step of its own tokens, so the sum stays in registers.
        at_step_end = step_ends_row[:, None] == t[None, :]
        rewards += tl.sum(tl.where(at_step_end, step_scores_row[:, None], 0.0), axis=0)
        rewards = tl.where(masked_in, rewards, 0.0)
    else:
        rewards = tl.load(rewards_ptr + row64 * stride_rewards + t, mask=masked_in, other=0.0).to(tl.float32)
    one = tl.full([BLOCK], 1.0, tl.float32)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    p = tl.where(masked_in, gamma_lam, one)
    q = tl.where(masked_in, gamma, zero)
    k = tl.where(masked_in, one, zero)
    u = tl.where(masked_in, rewards - values, zero)
    s = tl.where(masked_in, zero, one)
    w = tl.where(masked_in, values, zero)
    return t, in_tile, masked_in, values, rewards, p, q, k, u, s, w


@triton.jit
def _gae_summary_kernel(
    summary_ptr, num_chunks, chunk_len, tiles_per_chunk, length,
    rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr, step_scores_ptr, step_ends_ptr,
    stride_rewards, stride_values, stride_mask, stride_old, stride_ref, num_steps,
    kl_coef, gamma, gamma_lam,
    FUSED: tl.constexpr, HAS_KL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr,
    STEPS: tl.constexpr,
):
    """summary[:, row, chunk] = composite map (p, q, k, u, s, w) of all tokens of one chunk (6, B, chunks)."""
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    chunk_start = chunk * chunk_len
    chunk_end = tl.minimum(chunk_start + chunk_len, length)
    step_ends_row, step_scores_row = _row_steps(row, step_ends_ptr, step_scores_ptr, num_steps, length, FUSED, STEPS)
    agg_p, agg_q, agg_k, agg_u, agg_s, agg_w = 1.0, 0.0, 0.0, 0.0, 1.0, 0.0
    for tile in range(0, tiles_per_chunk):
        tile_end = chunk_end - tile * BLOCK
        _t, _in, _m, _v, _r, p, q, k, u, s, w = _tile_maps(
            row, tile_end, chunk_start, length,
            rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr, step_ends_row, step_scores_row,
            stride_rewards, stride_values, stride_mask, stride_old, stride_ref,
            kl_coef, gamma, gamma_lam, FUSED, HAS_KL, KL_ESTIMATOR, BLOCK,
        )
        p, q, k, u, s, w = tl.associative_scan((p, q, k, u, s, w), 0, _compose)
        agg_p, agg_q, agg_k, agg_u, agg_s, agg_w = _compose(
            agg_p, agg_q, agg_k, agg_u, agg_s, agg_w,
            _last(p, BLOCK), _last(q, BLOCK), _last(k, BLOCK), _last(u, BLOCK), _last(s, BLOCK), _last(w, BLOCK),
        )
    plane = num_chunks * tl.num_programs(1)
    base = summary_ptr + row * num_chunks + chunk
    tl.store(base, agg_p)
    tl.store(base + plane, agg_q)
    tl.store(base + 2 * plane, agg_k)
    tl.store(base + 3 * plane, agg_u)
    tl.store(base + 4 * plane, agg_s)
    tl.store(base + 5 * plane, agg_w)


@triton.jit
def _gae_chunk_kernel(
    advantages_ptr, returns_ptr, rewards_out_ptr, summary_ptr, num_chunks, chunk_len, tiles_per_chunk, length,
    rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr, step_scores_ptr, step_ends_ptr, outcome_ptr,
    stride_rewards, stride_values, stride_mask, stride_old, stride_ref, num_steps,
    kl_coef, gamma, gamma_lam,
    FUSED: tl.constexpr, HAS_KL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, STORE_REWARDS: tl.constexpr,
    BLOCK: tl.constexpr, STEPS: tl.constexpr,
):
    """Advantages and returns of one chunk of one row; outputs are contiguous (B, T)."""
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    carry_a = 0.0
    carry_w = 0.0
    if FUSED:
        carry_o = tl.load(outcome_ptr + row).to(tl.float32)
    else:
        carry_o = 0.0
    plane = num_chunks * tl.num_programs(1)
    for later in range(num_chunks - 1, chunk, -1):  # compose the chunks to the right, last first
        base = summary_ptr + row * num_chunks + later
        p = tl.load(base)
        q = tl.load(base + plane)
        k = tl.load(base + 2 * plane)
        u = tl.load(base + 3 * plane)
        s = tl.load(base + 4 * plane)
        w = tl.load(base + 5 * plane)
        carry_a = p * carry_a + q * carry_w + k * carry_o + u
        carry_w = s * carry_w + w
        carry_o = s * carry_o
    chunk_start = chunk * chunk_len
    chunk_end = tl.minimum(chunk_start + chunk_len, length)
    step_ends_row, step_scores_row = _row_steps(row, step_ends_ptr, step_scores_ptr, num_steps, length, FUSED, STEPS)
    for tile in range(0, tiles_per_chunk):
        tile_end = chunk_end - tile * BLOCK
        t, in_tile, masked_in, values, rewards, p, q, k, u, s, w = _tile_maps(
            row, tile_end, chunk_start, length,
            rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr, step_ends_row, step_scores_row,
            stride_rewards, stride_values, stride_mask, stride_old, stride_ref,
            kl_coef, gamma, gamma_lam, FUSED, HAS_KL, KL_ESTIMATOR, BLOCK,
        )
        p, q, k, u, s, w = tl.associative_scan((p, q, k, u, s, w), 0, _compose)
        advantages = p * carry_a + q * carry_w + k * carry_o + u
        out = row64 * length + t
        tl.store(advantages_ptr + out, tl.where(masked_in, advantages, 0.0), mask=in_tile)
        tl.store(returns_ptr + out, tl.where(masked_in, advantages + values, 0.0), mask=in_tile)
        if STORE_REWARDS:
            # The outcome lands on the first masked-in token of the walk while it is still pending.
            seen = tl.cumsum(masked_in.to(tl.int32), 0)
            outcome_here = tl.where(masked_in & (seen == 1), carry_o, 0.0)
            tl.store(rewards_out_ptr + out, rewards + outcome_here, mask=in_tile)
        carry_a = _last(advantages, BLOCK)
        carry_w = _last(s, BLOCK) * carry_w + _last(w, BLOCK)
        carry_o = _last(s, BLOCK) * carry_o


def _launch(
    values, loss_mask, gamma, lam, *, token_rewards=None, outcome=None, step_scores=None, step_ends=None,
    old_logp=None, ref_logp=None, kl_coef=0.0, kl_estimator="k1", return_rewards=False, block=None, chunk_len=None,
):
    """Run the scan; `token_rewards` given -> plain GAE, else the fused scatter + KL + GAE. Returns 3 tensors."""
    batch, length = loss_mask.shape
    device = loss_mask.device
    advantages = torch.empty(batch, length, dtype=torch.float32, device=device)  # (B, T)
    returns = torch.empty_like(advantages)  # (B, T)
    rewards_out = torch.empty_like(advantages) if return_rewards else None  # (B, T)
    if batch == 0 or length == 0:
        return advantages, returns, rewards_out
    if block is None:
        block, chunk_len = launch_plan(batch, length, device, max_block=_GPU_BLOCK, programs_per_sm=_PROGRAMS_PER_SM)
    if chunk_len % block:
        raise ValueError(f"scatter_rewards_and_gae: chunk_len {chunk_len} must be a multiple of block {block}")
    num_chunks = ceil_div(length, chunk_len)
    fused = token_rewards is None
    has_kl = fused and kl_coef != 0
    mask = mask_for_kernel(loss_mask)
    values = row_major(values)
    token_rewards = row_major(token_rewards)
    old_logp = row_major(old_logp) if has_kl else None
    ref_logp = row_major(ref_logp) if has_kl else None
    if fused:
        step_scores = step_scores.contiguous()
        step_ends = step_ends.contiguous()
        outcome = outcome.contiguous()
    # Unused pointer arguments get a valid tensor; the constexpr flags keep the kernels from reading them.
    placeholder = advantages
    pointers = (
        token_rewards if token_rewards is not None else placeholder, values, mask,
        old_logp if has_kl else placeholder, ref_logp if has_kl else placeholder,
        step_scores if fused else placeholder, step_ends if fused else placeholder,
    )
    strides = (
        token_rewards.stride(0) if token_rewards is not None else 0, values.stride(0), mask.stride(0),
        old_logp.stride(0) if has_kl else 0, ref_logp.stride(0) if has_kl else 0,
        step_scores.shape[1] if fused else 0,
    )
    scalars = (float(kl_coef), float(gamma), float(gamma * lam))
    num_steps = step_scores.shape[1] if fused else 0
    flags = dict(FUSED=fused, HAS_KL=has_kl, KL_ESTIMATOR=_KL_CODES[kl_estimator], BLOCK=block,
                 STEPS=next_power_of_two(num_steps))
    launch = launch_options()
    summary_launch = dict(launch, maxnreg=_SUMMARY_MAX_REGISTERS) if launch else launch
    grid = (num_chunks, batch)
    summary = placeholder
    if num_chunks > 1:
        summary = torch.empty(6, batch, num_chunks, dtype=torch.float32, device=device)  # (6, B, chunks)
        _gae_summary_kernel[grid](summary, num_chunks, chunk_len, chunk_len // block, length, *pointers, *strides,
                                  *scalars,
                                  **flags, **summary_launch)
    _gae_chunk_kernel[grid](
        advantages, returns, rewards_out if return_rewards else placeholder, summary, num_chunks, chunk_len,
        chunk_len // block, length,
        *pointers, outcome if fused else placeholder, *strides, *scalars,
        STORE_REWARDS=return_rewards, **flags, **launch,
    )
    return advantages, returns, rewards_out


def compute_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    loss_mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE advantages and returns (B, T) fp32, un-whitened, 0 at masked-out positions; see the twin."""
    check_gae_inputs(values, loss_mask, gamma, lam, token_rewards)
    if torch.float64 in (token_rewards.dtype, values.dtype):
        return _twin_compute_gae(token_rewards, values, loss_mask, gamma, lam)
    advantages, returns, _ = _launch(values, loss_mask, gamma, lam, token_rewards=token_rewards)
    return advantages, returns


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
    """Rewards placed + KL penalty + GAE in one pass; token_rewards only written when `return_rewards`."""
    check_scatter_inputs(outcome, step_scores, step_ends, old_logp, ref_logp, loss_mask, kl_coef, kl_estimator)
    check_gae_inputs(values, loss_mask, gamma, lam)
    floats = [outcome, step_scores, values] + ([old_logp, ref_logp] if kl_coef != 0 else [])
    if any(t.dtype == torch.float64 for t in floats):
        return _twin_scatter_rewards_and_gae(outcome, step_scores, step_ends, old_logp, ref_logp, values, loss_mask,
                                             kl_coef, gamma, lam, kl_estimator, return_rewards)
    advantages, returns, rewards = _launch(
        values, loss_mask, gamma, lam, outcome=outcome, step_scores=step_scores, step_ends=step_ends,
        old_logp=old_logp, ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator,
        return_rewards=return_rewards,
    )
    return RewardsAndGAE(advantages, returns, rewards)
