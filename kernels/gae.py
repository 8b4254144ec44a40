"""Fused reward scatter + KL penalty + GAE (Triton): associative scans over time, parallel over B and T.

Same signatures and semantics as the pure-torch twins `stepsearch.algo.gae.compute_gae` and
`stepsearch.algo.gae.scatter_rewards_and_gae` (read `stepsearch.algo.gae` and `stepsearch.algo.scatter` for the
maths). Structure (Liger style): private `@triton.jit` kernels, a launcher, the public functions. No autograd:
advantages and returns are data.

The scan. Walking a row backwards in time, the state (A, W, O) = (advantage of the next generated token, its value,
outcome not yet placed) changes at masked-in tokens only:

    masked-in t:  A <- gamma*lam*A + gamma*W + O + (r_t - V_t);  W <- V_t;  O <- 0
    masked-out t: identity (the skip-through of verl)

so the outcome lands on the last generated token and every generated token sees the value of the next one. Each
tile of BLOCK tokens is loaded in reversed order (index i holds t = tile_end - 1 - i) and scanned FORWARD with
`tl.associative_scan` (never `reverse=True`, unreliable for non-commutative combines: Triton issue 4362), twice:

1. over each token's successor in time (loaded again, shifted by one token, and kept to the tile), a "latest"
   scan of (seen, value): every token learns the value of the nearest later masked-in token of the tile, which is
   its W (the carried-in W where there is none), and the tile's latest masked-in token, the one that takes O;
2. the one-coefficient decay scan x <- p x + u, with p = gamma*lam on masked-in tokens (1 elsewhere) and
   u = r_t - V_t + gamma*W_t (+ O there): A_t = P_t A_in + U_t.

The state after a tile is read off its last element (one three-operand reduction). Against a single 6-wide scan of
affine maps on (A, W, O), the two 2-wide scans make the sm_90 loop body ~21% shorter (823 against 1,039 instructions
per warp and tile, fused with k1 KL and 4 step slots) and need a third fewer registers (see `_GPU_BLOCK`).

Parallel over T: a row is cut into chunks of whole tiles. When the rows alone fill the GPU (B >= 2 x SMs) there is
one chunk per row and a single kernel (`_gae_chunk_kernel`) walks its row's tiles right to left with the state in
registers. Otherwise `_gae_summary_kernel` first writes each chunk's composite affine map (p, q, k, u, s, w), meaning
A <- pA + qW + kO + u, W <- sW + w, O <- sO, built from the same scans (W and O enter a tile only through its latest
masked-in token, whose decay to the tile's end is k; q = gamma k), and then each chunk program of
`_gae_chunk_kernel` composes the summaries of the chunks to its right (a short scalar loop) to get its carry-in:
B x chunks programs, so few long rows still fill the device (the inputs are read twice in that case).

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
# 8 step slots): the fused chunk kernel needs 101-113 registers (4 programs per SM; 153 with the 6-wide scan), the
# plain-GAE one 64, the summary kernel 72-128; no spills.
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
def _combine_latest(seen1, value1, seen2, value2):
    """Scan of (seen, value): the value of the latest element (in scan order) that has one."""
    return tl.maximum(seen1, seen2), tl.where(seen2 > 0, value2, value1)


@triton.jit
def _combine_decay(p1, u1, p2, u2):
    """Composite of x <- p1 x + u1, then x <- p2 x + u2."""
    return p2 * p1, p2 * u1 + u2


@triton.jit
def _combine_decay_pair(p1, u1, k1, p2, u2, k2):
    """Two affine maps sharing their coefficient, composed at once."""
    return p2 * p1, p2 * u1 + u2, p2 * k1 + k2


@triton.jit
def _add3(a1, b1, c1, a2, b2, c2):
    return a1 + a2, b1 + b2, c1 + c2


@triton.jit
def _last3(a, b, c, BLOCK: tl.constexpr):
    """(a, b, c)[BLOCK - 1] as scalars (a scan's totals), in one reduction."""
    is_last = tl.arange(0, BLOCK) == BLOCK - 1
    return tl.reduce((tl.where(is_last, a, 0.0), tl.where(is_last, b, 0.0), tl.where(is_last, c, 0.0)), 0, _add3)


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
def _tile_inputs(
    row, tile_end, tile_start, length,
    rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr, step_ends_row, step_scores_row,
    stride_rewards, stride_values, stride_mask, stride_old, stride_ref,
    kl_coef, gamma, gamma_lam,
    FUSED: tl.constexpr, HAS_KL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr,
):
    """One tile in reversed order: t, the masks, values and rewards, and per token the nearest later masked-in
    token of the tile (`seen` = 1 where there is one, `later_value` its value), plus the shared decay p."""
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
    # Element i of the walk sees the token one step later in time (element i - 1's), kept to this tile: an
    # inclusive scan over these shifted elements is then exclusive of the token itself.
    later = t + 1
    later_in_tile = (later >= tile_start) & (later < tile_end)
    later_masked_in = tl.load(mask_ptr + row64 * stride_mask + later, mask=later_in_tile, other=0) != 0
    # Not masked by later_masked_in, so the two loads do not wait on each other: a masked-out value (pad, even a
    # NaN) is only ever passed over by the scan's select, never computed with.
    later_values = tl.load(values_ptr + row64 * stride_values + later, mask=later_in_tile, other=0.0)
    seen, later_value = tl.associative_scan(
        (tl.where(later_masked_in, 1.0, 0.0), later_values.to(tl.float32)), 0, _combine_latest)
    p = tl.where(masked_in, gamma_lam, 1.0)
    return t, in_tile, masked_in, values, rewards, seen, later_value, p


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
        _t, _in, masked_in, values, rewards, seen, later_value, p = _tile_inputs(
            row, tile_end, chunk_start, length,
            rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr, step_ends_row, step_scores_row,
            stride_rewards, stride_values, stride_mask, stride_old, stride_ref,
            kl_coef, gamma, gamma_lam, FUSED, HAS_KL, KL_ESTIMATOR, BLOCK,
        )
        # The tile's map from the state after it (A, W, O) to the state before it: with zero carries (u), and the
        # coefficient k with which W and O enter, both through the tile's latest masked-in token only (q = gamma k).
        u = tl.where(masked_in, rewards - values + gamma * tl.where(seen > 0, later_value, 0.0), 0.0)
        k = tl.where(masked_in & (seen == 0), 1.0, 0.0)
        p, u, k = tl.associative_scan((p, u, k), 0, _combine_decay_pair)
        tile_p, tile_u, tile_k = _last3(p, u, k, BLOCK)
        latest_value = tl.where(masked_in, values, tl.where(seen > 0, later_value, 0.0))
        tile_w, tile_any, _ = _last3(latest_value, tl.where(masked_in, 1.0, seen), p, BLOCK)
        agg_p, agg_q, agg_k, agg_u, agg_s, agg_w = _compose(
            agg_p, agg_q, agg_k, agg_u, agg_s, agg_w,
            tile_p, gamma * tile_k, tile_k, tile_u, 1.0 - tile_any, tile_w,
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
        t, in_tile, masked_in, values, rewards, seen, later_value, p = _tile_inputs(
            row, tile_end, chunk_start, length,
            rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr, step_ends_row, step_scores_row,
            stride_rewards, stride_values, stride_mask, stride_old, stride_ref,
            kl_coef, gamma, gamma_lam, FUSED, HAS_KL, KL_ESTIMATOR, BLOCK,
        )
        next_value = tl.where(seen > 0, later_value, carry_w)  # the value of the next generated token
        # The pending outcome lands on the tile's latest masked-in token (the row's last generated one).
        outcome_here = tl.where(masked_in & (seen == 0), carry_o, 0.0)
        u = tl.where(masked_in, rewards - values + gamma * next_value + outcome_here, 0.0)
        p, u = tl.associative_scan((p, u), 0, _combine_decay)
        advantages = p * carry_a + u
        out = row64 * length + t
        tl.store(advantages_ptr + out, tl.where(masked_in, advantages, 0.0), mask=in_tile)
        tl.store(returns_ptr + out, tl.where(masked_in, advantages + values, 0.0), mask=in_tile)
        if STORE_REWARDS:
            tl.store(rewards_out_ptr + out, rewards + outcome_here, mask=in_tile)
        latest_value = tl.where(masked_in, values, next_value)
        carry_a, carry_w, tile_any = _last3(advantages, latest_value, tl.where(masked_in, 1.0, seen), BLOCK)
        carry_o = carry_o * (1.0 - tile_any)


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
