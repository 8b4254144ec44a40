"""Fused reward scatter + KL penalty + GAE (Triton): associative scans over time, parallel over B and T.

Same signatures and semantics as the pure-torch twins `stepsearch.algo.gae.compute_gae` and
`stepsearch.algo.gae.scatter_rewards_and_gae` (read `stepsearch.algo.gae` and `stepsearch.algo.scatter` for the
maths). Structure (Liger style): private `@triton.jit` kernels, a launcher, the public functions. No autograd:
advantages and returns are data.

The scan. Walking a row backwards in time, the state (A, W, O) = (advantage of the next generated token, its value,
outcome not yet placed) changes at masked-in tokens only:

    masked-in t:  A <- gamma*lam*A + gamma*W + O + (r_t - V_t);  W <- V_t;  O <- 0
    masked-out t: identity (the skip-through of verl)

so the outcome lands on the last generated token and every generated token sees the value of the next one. Maps
compose associatively; a composite is (p, q, k, u, s, w) meaning A <- pA + qW + kO + u, W <- sW + w, O <- sO.

A tile of BLOCK tokens is held as (BLOCK / ROW, ROW): row r holds the ROW = 4 tokens ending ROW r before the tile's
end, so rows run backwards in time and the tokens of a row forwards. One thread holds one row: every array is read
and written as one 16-byte vector per thread, and a row's tokens are walked in registers. Per tile:

1. each row builds, token by token (latest first), the composite map of the row before it in the walk: that row's
   tokens, loaded again one row later in time (cache hits; nothing for row 0);
2. one forward `tl.associative_scan` over rows composes them (never `reverse=True`, unreliable for non-commutative
   combines: Triton issue 4362), giving each row the map of everything later in the tile, which takes the carried
   state to the state entering the row;
3. each row walks its own tokens from that state, writing advantages and returns; the earliest row's final state
   is the carry into the next tile (one three-operand reduction).

Against a scan over tokens (one element per token, BLOCK-long scans), this moves data between threads only in the
row scan: in the offline sm_90 compile at 512-token tiles the loop body is 523 instructions per warp and tile fused
with k1 KL and 4 step slots, 395 for plain GAE (Triton 3.9; 574 and 418 with 3.6), against 1,039 and 970 for a 6-wide
scan over the tokens in reversed order, whose descending addresses also kept every load scalar.

Parallel over T: a row is cut into chunks of whole tiles. When the rows alone fill the GPU (B >= 2 x SMs) there is
one chunk per row and a single kernel (`_gae_chunk_kernel`) walks its row's tiles right to left with the state in
registers. Otherwise `_gae_summary_kernel` first writes each chunk's composite map (6 floats: its own rows' maps
scanned, the last taken) and then each chunk program of `_gae_chunk_kernel` composes the summaries of the chunks to
its right (a short scalar loop) to get its carry-in: B x chunks programs, so few long rows still fill the device
(the inputs are read twice in that case).

Rewards are formed in registers (KL from old/ref log-probs; step scores matched against the row's `step_ends`, loaded
once per program as a vector and read out as loop-invariant scalars; the outcome through O) and only written to global
memory when `return_rewards=True`. Everything is fp32 in registers; outputs are fp32; float64 inputs are delegated to
the twin. Step ends outside [0, T) are ignored (checking would need a host sync; the twin raises on them). Under
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
# 8 step slots, rewards stored, Triton 3.9 / 3.6): the fused chunk kernel needs 91-93 / 105-109 registers (5 / 4
# programs per SM), the plain-GAE one 52 / 56, the summary kernel 53-124 / 56-75; no spills.
_GPU_BLOCK = 512
# Tokens per tile row, one row per thread: 16-byte vector loads and stores of fp32, the row walked in registers.
_ROW = 4
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
def _apply(p, q, k, u, s, w, a, w_state, o):
    """The state (A, W, O) after the composite map (p, q, k, u, s, w)."""
    return p * a + q * w_state + k * o + u, s * w_state + w, s * o


@triton.jit
def _add3(a1, b1, c1, a2, b2, c2):
    return a1 + a2, b1 + b2, c1 + c2


@triton.jit
def _last3(a, b, c, ROWS: tl.constexpr):
    """(a, b, c)[ROWS - 1] as scalars, in one reduction."""
    is_last = tl.arange(0, ROWS) == ROWS - 1
    return tl.reduce((tl.where(is_last, a, 0.0), tl.where(is_last, b, 0.0), tl.where(is_last, c, 0.0)), 0, _add3)


@triton.jit
def _column(tile, c, ROW: tl.constexpr):
    """Column c of a (ROWS, ROW) tile as a (ROWS,) vector: a row's tokens sit in one thread, so no data moves."""
    return tl.sum(tl.where(tl.arange(0, ROW)[None, :] == c, tile, 0.0), axis=1)


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
def _slot(vector, s, STEPS: tl.constexpr):
    """vector[s] as a scalar (a loop-invariant reduction: computed once per program, outside the tile loop)."""
    return tl.sum(tl.where(tl.arange(0, STEPS) == s, vector, 0), axis=0)


@triton.jit
def _tile(
    row, tile_end, tile_start, shift,
    rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr, step_ends_row, step_scores_row,
    stride_rewards, stride_values, stride_mask, stride_old, stride_ref, kl_coef,
    FUSED: tl.constexpr, HAS_KL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, ROWS: tl.constexpr, ROW: tl.constexpr,
    STEPS: tl.constexpr,
):
    """A tile as (ROWS, ROW): row r holds times tile_end - ROW (r + 1) + shift + [0, ROW), so row 0 is the latest
    and each thread loads one 16-byte vector per array. Returns t, in-tile (t in [tile_start, tile_end)), masked-in
    (0/1), values and rewards (minus the KL penalty plus the step scores placed at their ends, or the given
    rewards), all 0 outside the tile and where masked out."""
    t = tile_end - ROW * (tl.arange(0, ROWS)[:, None] + 1) + shift + tl.arange(0, ROW)[None, :]  # (ROWS, ROW)
    in_tile = (t >= tile_start) & (t < tile_end)
    row64 = row.to(tl.int64)
    # Loads are masked by the tile only, so none waits for the mask; pads (even NaN) are selected away, never used.
    masked_in = tl.load(mask_ptr + row64 * stride_mask + t, mask=in_tile, other=0) != 0
    values = tl.load(values_ptr + row64 * stride_values + t, mask=in_tile, other=0.0).to(tl.float32)
    if FUSED:
        rewards = tl.zeros([ROWS, ROW], dtype=tl.float32)
        if HAS_KL:
            old_logp = tl.load(old_logp_ptr + row64 * stride_old + t, mask=in_tile, other=0.0).to(tl.float32)
            ref_logp = tl.load(ref_logp_ptr + row64 * stride_ref + t, mask=in_tile, other=0.0).to(tl.float32)
            log_ratio = tl.minimum(tl.maximum(old_logp - ref_logp, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
            if KL_ESTIMATOR == 1:
                kl = log_ratio
            elif KL_ESTIMATOR == 2:
                kl = 0.5 * log_ratio * log_ratio
            else:
                kl = tl.minimum(tl.maximum(tl.exp(-log_ratio) - 1.0 + log_ratio, -K3_CLAMP), K3_CLAMP)
            rewards = -kl_coef * kl
        for step in tl.static_range(STEPS):  # two steps on one token add up
            at_end = t == _slot(step_ends_row, step, STEPS)
            rewards += tl.where(at_end, _slot(step_scores_row, step, STEPS), 0.0)
    else:
        rewards = tl.load(rewards_ptr + row64 * stride_rewards + t, mask=in_tile, other=0.0).to(tl.float32)
    values = tl.where(masked_in, values, 0.0)
    rewards = tl.where(masked_in, rewards, 0.0)
    return t, in_tile, masked_in.to(tl.float32), values, rewards


@triton.jit
def _token(masked_in, values, rewards, c, ROW: tl.constexpr):
    """Token c of every row: (masked in, value, reward), each (ROWS,)."""
    return _column(masked_in, c, ROW) > 0, _column(values, c, ROW), _column(rewards, c, ROW)


@triton.jit
def _row_maps(masked_in, values, rewards, gamma, gamma_lam, ROWS: tl.constexpr, ROW: tl.constexpr):
    """Composite map (p, q, k, u, s, w) of each row's ROW tokens in walk order (latest first), each (ROWS,)."""
    p = tl.full([ROWS], 1.0, tl.float32)
    q = tl.zeros([ROWS], dtype=tl.float32)
    k = tl.zeros([ROWS], dtype=tl.float32)
    u = tl.zeros([ROWS], dtype=tl.float32)
    s = tl.full([ROWS], 1.0, tl.float32)
    w = tl.zeros([ROWS], dtype=tl.float32)
    for c in tl.static_range(ROW - 1, -1, -1):
        is_in, value, reward = _token(masked_in, values, rewards, c, ROW)
        # then a masked-in token's map (gamma lam, gamma, 1, r - v, 0, v); a masked-out token changes nothing
        u = tl.where(is_in, gamma_lam * u + gamma * w + (reward - value), u)
        q = tl.where(is_in, gamma_lam * q + gamma * s, q)
        k = tl.where(is_in, gamma_lam * k + s, k)
        p = tl.where(is_in, gamma_lam * p, p)
        s = tl.where(is_in, 0.0, s)
        w = tl.where(is_in, value, w)
    return p, q, k, u, s, w


@triton.jit
def _gae_summary_kernel(
    summary_ptr, num_chunks, chunk_len, tiles_per_chunk, length,
    rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr, step_scores_ptr, step_ends_ptr,
    stride_rewards, stride_values, stride_mask, stride_old, stride_ref, num_steps,
    kl_coef, gamma, gamma_lam,
    FUSED: tl.constexpr, HAS_KL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr,
    STEPS: tl.constexpr, ROW: tl.constexpr,
):
    """summary[:, row, chunk] = composite map (p, q, k, u, s, w) of all tokens of one chunk (6, B, chunks)."""
    ROWS: tl.constexpr = BLOCK // ROW
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    chunk_start = chunk * chunk_len
    chunk_end = tl.minimum(chunk_start + chunk_len, length)
    step_ends_row, step_scores_row = _row_steps(row, step_ends_ptr, step_scores_ptr, num_steps, length, FUSED, STEPS)
    agg_p, agg_q, agg_k, agg_u, agg_s, agg_w = 1.0, 0.0, 0.0, 0.0, 1.0, 0.0
    for tile in range(0, tiles_per_chunk):
        tile_end = chunk_end - tile * BLOCK
        _t, _in, masked_in, values, rewards = _tile(
            row, tile_end, chunk_start, 0, rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr,
            step_ends_row, step_scores_row, stride_rewards, stride_values, stride_mask, stride_old, stride_ref,
            kl_coef, FUSED, HAS_KL, KL_ESTIMATOR, ROWS, ROW, STEPS,
        )
        p, q, k, u, s, w = _row_maps(masked_in, values, rewards, gamma, gamma_lam, ROWS, ROW)
        p, q, k, u, s, w = tl.associative_scan((p, q, k, u, s, w), 0, _compose)  # over rows, latest first
        tile_p, tile_q, tile_k = _last3(p, q, k, ROWS)
        tile_u, tile_s, tile_w = _last3(u, s, w, ROWS)
        agg_p, agg_q, agg_k, agg_u, agg_s, agg_w = _compose(
            agg_p, agg_q, agg_k, agg_u, agg_s, agg_w, tile_p, tile_q, tile_k, tile_u, tile_s, tile_w,
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
    BLOCK: tl.constexpr, STEPS: tl.constexpr, ROW: tl.constexpr,
):
    """Advantages and returns of one chunk of one row; outputs are contiguous (B, T)."""
    ROWS: tl.constexpr = BLOCK // ROW
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
        carry_a, carry_w, carry_o = _apply(p, q, k, u, s, w, carry_a, carry_w, carry_o)
    chunk_start = chunk * chunk_len
    chunk_end = tl.minimum(chunk_start + chunk_len, length)
    step_ends_row, step_scores_row = _row_steps(row, step_ends_ptr, step_scores_ptr, num_steps, length, FUSED, STEPS)
    columns = tl.arange(0, ROW)[None, :]
    for tile in range(0, tiles_per_chunk):
        tile_end = chunk_end - tile * BLOCK
        # Each row's scan input is the map of the row before it in the walk (loaded again, one row later in time;
        # nothing for row 0), so the inclusive scan gives every row the map of everything after it in the tile.
        _later_t, _later_in_tile, later_in, later_values, later_rewards = _tile(
            row, tile_end, chunk_start, ROW, rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr,
            step_ends_row, step_scores_row, stride_rewards, stride_values, stride_mask, stride_old, stride_ref,
            kl_coef, FUSED, HAS_KL, KL_ESTIMATOR, ROWS, ROW, STEPS,
        )
        p, q, k, u, s, w = _row_maps(later_in, later_values, later_rewards, gamma, gamma_lam, ROWS, ROW)
        p, q, k, u, s, w = tl.associative_scan((p, q, k, u, s, w), 0, _compose)
        state_a, state_w, state_o = _apply(p, q, k, u, s, w, carry_a, carry_w, carry_o)  # entering each row (ROWS,)
        t, in_tile, masked_in, values, rewards = _tile(
            row, tile_end, chunk_start, 0, rewards_ptr, values_ptr, mask_ptr, old_logp_ptr, ref_logp_ptr,
            step_ends_row, step_scores_row, stride_rewards, stride_values, stride_mask, stride_old, stride_ref,
            kl_coef, FUSED, HAS_KL, KL_ESTIMATOR, ROWS, ROW, STEPS,
        )
        advantages = tl.zeros([ROWS, ROW], dtype=tl.float32)
        returns = tl.zeros([ROWS, ROW], dtype=tl.float32)
        rewards_out = tl.zeros([ROWS, ROW], dtype=tl.float32)
        for c in tl.static_range(ROW - 1, -1, -1):  # each row's own tokens, latest first
            is_in, value, reward = _token(masked_in, values, rewards, c, ROW)
            # The pending outcome lands on the row's last generated token.
            outcome_here = tl.where(is_in, state_o, 0.0)
            state_a = tl.where(is_in, gamma_lam * state_a + gamma * state_w + state_o + reward - value, state_a)
            state_w = tl.where(is_in, value, state_w)
            state_o = tl.where(is_in, 0.0, state_o)
            here = columns == c
            advantages = tl.where(here, tl.where(is_in, state_a, 0.0)[:, None], advantages)
            returns = tl.where(here, tl.where(is_in, state_a + value, 0.0)[:, None], returns)
            if STORE_REWARDS:
                rewards_out = tl.where(here, (reward + outcome_here)[:, None], rewards_out)
        out = row64 * length + t
        tl.store(advantages_ptr + out, advantages, mask=in_tile)
        tl.store(returns_ptr + out, returns, mask=in_tile)
        if STORE_REWARDS:
            tl.store(rewards_out_ptr + out, rewards_out, mask=in_tile)
        carry_a, carry_w, carry_o = _last3(state_a, state_w, state_o, ROWS)  # the earliest row ends the tile


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
    if chunk_len % block or block % _ROW:
        raise ValueError(f"scatter_rewards_and_gae: chunk_len {chunk_len} must be a multiple of block {block}, "
                         f"and block of {_ROW}")
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
    flags = dict(FUSED=fused, HAS_KL=has_kl, KL_ESTIMATOR=_KL_CODES[kl_estimator], BLOCK=block, ROW=_ROW,
                 STEPS=next_power_of_two(num_steps))
    launch = launch_options()
    grid = (num_chunks, batch)
    summary = placeholder
    if num_chunks > 1:
        summary = torch.empty(6, batch, num_chunks, dtype=torch.float32, device=device)  # (6, B, chunks)
        _gae_summary_kernel[grid](summary, num_chunks, chunk_len, chunk_len // block, length, *pointers, *strides,
                                  *scalars, **flags, **launch)
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
