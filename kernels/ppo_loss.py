"""Fused PPO loss (Triton): clipped policy loss (+ dual clip), clipped value loss, entropy bonus, fwd + bwd.

Same signature and semantics as the pure-torch twin `stepsearch.algo.ppo_loss.ppo_loss` (read it for the maths,
the aggregation modes and the micro-batch / data-parallel normalisers). Structure (Liger style): private
`@triton.jit` kernels, the forward launcher, one `torch.autograd.Function` for the backward, the public `ppo_loss`.

Forward, two launches:
1. `_ppo_fwd_kernel`, programs over (chunk of T, row): per token the clipped policy loss, the clipped value loss,
   the entropy, the diagnostics, and the local derivatives d pg_t / d logp_t and d vf_t / d v_t, written once to
   fp32 buffers (so the backward never re-reads the inputs). Each program writes 7 unweighted partial sums to a
   (7, B, chunks) buffer: no atomics.
2. `_ppo_finalize_kernel`, one program: adds the partials in a fixed order (rows in blocks, chunks in sequence),
   derives the per-row weights of the aggregation mode and the normaliser, and writes the 7 outputs (0-d tensors,
   never read on the host) and the per-row weights for the backward. Results are bitwise reproducible.
Backward: `_ppo_bwd_kernel` scales the saved local derivatives by row weight x normaliser x upstream gradients
(non-unit upstream gradients of loss, policy_loss, value_loss and entropy_loss are all honoured; the kernel reads
them from autograd's 0-d tensors, so nothing is stacked or zero-filled on the host) and writes the gradients of
logp, values and entropy in their own dtypes. The outputs hang on three autograd nodes over the one forward:
`loss` over (logp, values, entropy), (`policy_loss`, `entropy_loss`) over (logp, entropy) and `value_loss` over
values. So `loss.backward()` is one backward launch, and the trainer's two separate calls, `policy_loss - c *
entropy_loss` into the actor and `value_loss` into the critic, each reach only their own model's graph: through a
single node the second call would walk into the first model's graph, already freed.

Memory traffic per token (fp32 inputs, all parts on): forward reads 7 x 4 + 1 bytes and writes 8, backward reads
8 + 1 and writes 12: ~58 bytes, about 120 MB at 2M tokens. Float64 inputs are delegated to the twin. Under
TRITON_INTERPRET=1 the kernels run on CPU tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from stepsearch.algo.ppo_loss import LOSS_AGG_MODES, PPOLossOutput, check_ppo_inputs
from stepsearch.algo.ppo_loss import ppo_loss as _twin_ppo_loss
from stepsearch.kernels.launch import (
    LOG_RATIO_CLAMP,
    ceil_div,
    launch_options,
    launch_plan,
    mask_for_kernel,
    row_major,
)

__all__ = ["ppo_loss"]

# 512-token tiles at 4 warps: 95 registers, no spills, 5 programs resident per SM (offline sm_90 compile read with
# cuobjdump -res-usage; 1024-token tiles need 181 registers, 2 programs per SM: too few loads in flight).
_GPU_BLOCK = 512
# ~8 programs per SM: chunks are independent here (no carried state), so more of them only hide more latency.
_PROGRAMS_PER_SM = 8
_FINALIZE_BLOCK_ROWS = 1024
_NUM_PARTIALS = 7  # policy, value, entropy, tokens, clipped tokens, approx-kl, value-clipped tokens
_NUM_OUTPUTS = 8  # the 7 fields of PPOLossOutput, then the normaliser 1 / N


@triton.jit
def _ppo_fwd_kernel(
    partials_ptr, dpolicy_ptr, dvalue_ptr, num_chunks, chunk_len, tiles_per_chunk, length,
    logp_ptr, old_logp_ptr, advantages_ptr, values_ptr, old_values_ptr, returns_ptr, mask_ptr, entropy_ptr,
    stride_logp, stride_old_logp, stride_adv, stride_values, stride_old_values, stride_returns, stride_mask,
    stride_entropy,
    clip_low, clip_high, dual_clip, value_clip,
    HAS_POLICY: tl.constexpr, HAS_VALUE: tl.constexpr, HAS_ENTROPY: tl.constexpr, DUAL_CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    chunk_start = chunk * chunk_len
    chunk_end = tl.minimum(chunk_start + chunk_len, length)
    policy_acc = tl.zeros([BLOCK], dtype=tl.float32)
    value_acc = tl.zeros([BLOCK], dtype=tl.float32)
    entropy_acc = tl.zeros([BLOCK], dtype=tl.float32)
    token_acc = tl.zeros([BLOCK], dtype=tl.float32)
    clipped_acc = tl.zeros([BLOCK], dtype=tl.float32)
    kl_acc = tl.zeros([BLOCK], dtype=tl.float32)
    value_clipped_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for tile in range(0, tiles_per_chunk):
        t = chunk_start + tile * BLOCK + tl.arange(0, BLOCK)
        in_chunk = t < chunk_end
        masked_in = tl.load(mask_ptr + row64 * stride_mask + t, mask=in_chunk, other=0) != 0
        token_acc += masked_in.to(tl.float32)
        out = row64 * length + t
        # Loads are masked by the chunk only: with a mask constant over each thread's tokens they are 16-byte
        # vectors and none waits for the loss mask. What masked-out tokens hold (pads, NaN) is only ever selected
        # away below, so it reaches neither a sum nor a derivative.
        if HAS_POLICY:
            logp = tl.load(logp_ptr + row64 * stride_logp + t, mask=in_chunk, other=0.0).to(tl.float32)
            old_logp = tl.load(old_logp_ptr + row64 * stride_old_logp + t, mask=in_chunk, other=0.0).to(tl.float32)
            advantages = tl.load(advantages_ptr + row64 * stride_adv + t, mask=in_chunk, other=0.0).to(tl.float32)
            raw_log_ratio = logp - old_logp
            log_ratio = tl.minimum(tl.maximum(raw_log_ratio, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP)
            ratio = tl.exp(log_ratio)
            unclipped = -advantages * ratio
            clipped = -advantages * tl.minimum(tl.maximum(ratio, clip_low), clip_high)
            is_clipped = clipped > unclipped
            policy = tl.where(is_clipped, clipped, unclipped)
            in_clamp = (raw_log_ratio >= -LOG_RATIO_CLAMP) & (raw_log_ratio <= LOG_RATIO_CLAMP)
            dpolicy = tl.where(is_clipped | (~in_clamp), 0.0, unclipped)
            if DUAL_CLIP:
                lower_bound = -advantages * dual_clip
                dual_active = (advantages < 0) & (lower_bound < policy)
                policy = tl.where(dual_active, lower_bound, policy)
                dpolicy = tl.where(dual_active, 0.0, dpolicy)
            policy_acc += tl.where(masked_in, policy, 0.0)
            clipped_acc += (masked_in & is_clipped).to(tl.float32)
            kl_acc += tl.where(masked_in, (ratio - 1.0) - log_ratio, 0.0)
            tl.store(dpolicy_ptr + out, tl.where(masked_in, dpolicy, 0.0), mask=in_chunk)
            if HAS_ENTROPY:
                entropy = tl.load(entropy_ptr + row64 * stride_entropy + t, mask=in_chunk, other=0.0)
                entropy_acc += tl.where(masked_in, entropy.to(tl.float32), 0.0)
        if HAS_VALUE:
            values = tl.load(values_ptr + row64 * stride_values + t, mask=in_chunk, other=0.0).to(tl.float32)
            old_values = tl.load(old_values_ptr + row64 * stride_old_values + t, mask=in_chunk,
                                 other=0.0).to(tl.float32)
            returns = tl.load(returns_ptr + row64 * stride_returns + t, mask=in_chunk, other=0.0).to(tl.float32)
            values_clipped = tl.minimum(tl.maximum(values, old_values - value_clip), old_values + value_clip)
            unclipped_error = (values - returns) * (values - returns)
            clipped_error = (values_clipped - returns) * (values_clipped - returns)
            is_value_clipped = clipped_error > unclipped_error
            value_acc += tl.where(masked_in, 0.5 * tl.where(is_value_clipped, clipped_error, unclipped_error), 0.0)
            value_clipped_acc += (masked_in & is_value_clipped).to(tl.float32)
            dvalue = tl.where(masked_in & (~is_value_clipped), values - returns, 0.0)
            tl.store(dvalue_ptr + out, dvalue, mask=in_chunk)
    plane = num_chunks * tl.num_programs(1)
    base = partials_ptr + row * num_chunks + chunk
    tl.store(base, tl.sum(policy_acc, axis=0))
    tl.store(base + plane, tl.sum(value_acc, axis=0))
    tl.store(base + 2 * plane, tl.sum(entropy_acc, axis=0))
    tl.store(base + 3 * plane, tl.sum(token_acc, axis=0))
    tl.store(base + 4 * plane, tl.sum(clipped_acc, axis=0))
    tl.store(base + 5 * plane, tl.sum(kl_acc, axis=0))
    tl.store(base + 6 * plane, tl.sum(value_clipped_acc, axis=0))


@triton.jit
def _ppo_finalize_kernel(
    outputs_ptr, row_weights_ptr, partials_ptr, num_rows, num_chunks,
    global_tokens_ptr, global_tokens, global_seqs_ptr, global_seqs, vf_coef, entropy_coef,
    MODE: tl.constexpr, GLOBAL_TOKENS: tl.constexpr, GLOBAL_SEQS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
):
    """One program: fixed-order sums of the partials -> outputs (8,) and per-row weights (B,).

    MODE 0 token-mean, 1 seq-mean-token-sum, 2 seq-mean-token-mean. GLOBAL_*: 0 local count, 1 scalar, 2 pointer.
    """
    plane = num_rows * num_chunks
    policy_sum = 0.0
    value_sum = 0.0
    entropy_sum = 0.0
    token_sum = 0.0
    seq_sum = 0.0
    clipped_sum = 0.0
    kl_sum = 0.0
    value_clipped_sum = 0.0
    for row_start in range(0, num_rows, BLOCK_ROWS):
        rows = row_start + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < num_rows
        policy = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        value = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        entropy = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        tokens = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        clipped = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        kl = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        value_clipped = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for chunk in range(0, num_chunks):
            at = partials_ptr + rows * num_chunks + chunk
            policy += tl.load(at, mask=row_ok, other=0.0)
            value += tl.load(at + plane, mask=row_ok, other=0.0)
            entropy += tl.load(at + 2 * plane, mask=row_ok, other=0.0)
            tokens += tl.load(at + 3 * plane, mask=row_ok, other=0.0)
            clipped += tl.load(at + 4 * plane, mask=row_ok, other=0.0)
            kl += tl.load(at + 5 * plane, mask=row_ok, other=0.0)
            value_clipped += tl.load(at + 6 * plane, mask=row_ok, other=0.0)
        has_tokens = tokens > 0
        if MODE == 0:
            weight = tl.where(row_ok, 1.0, 0.0)
        elif MODE == 1:
            weight = tl.where(has_tokens, 1.0, 0.0)
        else:
            weight = tl.where(has_tokens, 1.0 / tl.maximum(tokens, 1.0), 0.0)
        tl.store(row_weights_ptr + rows, weight, mask=row_ok)
        policy_sum += tl.sum(weight * policy, axis=0)
        value_sum += tl.sum(weight * value, axis=0)
        entropy_sum += tl.sum(weight * entropy, axis=0)
        token_sum += tl.sum(tokens, axis=0)
        seq_sum += tl.sum(has_tokens.to(tl.float32), axis=0)
        clipped_sum += tl.sum(clipped, axis=0)
        kl_sum += tl.sum(kl, axis=0)
        value_clipped_sum += tl.sum(value_clipped, axis=0)
    if GLOBAL_TOKENS == 1:
        token_sum = global_tokens
    elif GLOBAL_TOKENS == 2:
        token_sum = tl.load(global_tokens_ptr).to(tl.float32)
    if GLOBAL_SEQS == 1:
        seq_sum = global_seqs
    elif GLOBAL_SEQS == 2:
        seq_sum = tl.load(global_seqs_ptr).to(tl.float32)
    inv_tokens = 1.0 / tl.maximum(token_sum, 1.0)
    if MODE == 0:
        inv_norm = inv_tokens
    else:
        inv_norm = 1.0 / tl.maximum(seq_sum, 1.0)
    policy_loss = policy_sum * inv_norm
    value_loss = value_sum * inv_norm
    entropy_loss = entropy_sum * inv_norm
    tl.store(outputs_ptr, policy_loss + vf_coef * value_loss - entropy_coef * entropy_loss)
    tl.store(outputs_ptr + 1, policy_loss)
    tl.store(outputs_ptr + 2, value_loss)
    tl.store(outputs_ptr + 3, entropy_loss)
    tl.store(outputs_ptr + 4, kl_sum * inv_tokens)
    tl.store(outputs_ptr + 5, clipped_sum * inv_tokens)
    tl.store(outputs_ptr + 6, value_clipped_sum * inv_tokens)
    tl.store(outputs_ptr + 7, inv_norm)


@triton.jit
def _upstream(grad_ptr, GIVEN: tl.constexpr):
    """An upstream gradient (0-d fp32), 0 where autograd passed none."""
    if GIVEN:
        return tl.load(grad_ptr).to(tl.float32)
    else:
        return 0.0


@triton.jit
def _ppo_bwd_kernel(
    grad_logp_ptr, grad_values_ptr, grad_entropy_ptr, dpolicy_ptr, dvalue_ptr, mask_ptr, stride_mask,
    row_weights_ptr, outputs_ptr, grad_loss_ptr, grad_policy_ptr, grad_value_ptr, grad_entropy_loss_ptr, length,
    vf_coef, entropy_coef,
    HAS_POLICY: tl.constexpr, HAS_VALUE: tl.constexpr, HAS_ENTROPY: tl.constexpr, GIVEN_LOSS: tl.constexpr,
    GIVEN_POLICY: tl.constexpr, GIVEN_VALUE: tl.constexpr, GIVEN_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad = local derivative x row weight x 1/N x the upstream gradients of (loss, policy, value, entropy)."""
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_row = t < length
    out = row64 * length + t
    scale = tl.load(row_weights_ptr + row) * tl.load(outputs_ptr + 7)
    grad_loss = _upstream(grad_loss_ptr, GIVEN_LOSS)
    if HAS_POLICY:
        policy_scale = scale * (grad_loss + _upstream(grad_policy_ptr, GIVEN_POLICY))
        dpolicy = tl.load(dpolicy_ptr + out, mask=in_row, other=0.0)
        tl.store(grad_logp_ptr + out, dpolicy * policy_scale, mask=in_row)
    if HAS_VALUE:
        value_scale = scale * (vf_coef * grad_loss + _upstream(grad_value_ptr, GIVEN_VALUE))
        dvalue = tl.load(dvalue_ptr + out, mask=in_row, other=0.0)
        tl.store(grad_values_ptr + out, dvalue * value_scale, mask=in_row)
    if HAS_ENTROPY:
        entropy_scale = scale * (_upstream(grad_entropy_loss_ptr, GIVEN_ENTROPY) - entropy_coef * grad_loss)
        masked_in = tl.load(mask_ptr + row64 * stride_mask + t, mask=in_row, other=0) != 0
        tl.store(grad_entropy_ptr + out, tl.where(masked_in, entropy_scale, 0.0), mask=in_row)


def _count_args(count, device):
    """(kind, pointer, scalar) for a normaliser given as None, a number or a tensor (never read on the host)."""
    if count is None:
        return 0, None, 0.0
    if isinstance(count, torch.Tensor):
        return 2, count.to(device=device, dtype=torch.float32).reshape(()), 0.0
    return 1, None, float(count)


class _Saved(NamedTuple):
    """What the backward needs from the forward: local derivatives, mask, row weights, the outputs buffer. Never the
    outputs handed out: a node whose context held its own outputs would form a reference cycle through their
    `grad_fn` that Python's collector cannot see into, and every call's buffers would stay allocated for good."""

    dpolicy: torch.Tensor  # (B, T) fp32 d pg_t / d logp_t, or a placeholder
    dvalue: torch.Tensor  # (B, T) fp32 d vf_t / d v_t, or a placeholder
    mask: torch.Tensor  # (B, T) as the kernels read it
    row_weights: torch.Tensor  # (B,)
    outputs: torch.Tensor  # (8,) the 7 fields of PPOLossOutput, then 1 / N
    block: int
    vf_coef: float
    entropy_coef: float


@torch.no_grad()
def _forward(logp, old_logp, advantages, values, old_values, returns, loss_mask, entropy,
             settings) -> tuple[_Saved, tuple[torch.Tensor, ...]]:
    """The forward kernels: per-token derivatives, fixed-order sums, outputs. Returns what the backward needs and
    the outputs buffer unbound (0-d views: the 7 fields of PPOLossOutput, each handed out once, then 1 / N).
    Records no autograd history (a copy of a non-contiguous input that requires grad would otherwise add a node);
    the `_LossPart` nodes connect the outputs to the inputs."""
    (clip_ratio, dual_clip, value_clip, vf_coef, entropy_coef, mode, global_tokens, global_seqs,
     block, chunk_len) = settings
    batch, length = loss_mask.shape
    device = loss_mask.device
    has_policy, has_value, has_entropy = logp is not None, values is not None, entropy is not None
    if block is None:
        block, chunk_len = launch_plan(batch, length, device, max_block=_GPU_BLOCK, programs_per_sm=_PROGRAMS_PER_SM)
    if chunk_len % block:
        raise ValueError(f"ppo_loss: chunk_len {chunk_len} must be a multiple of block {block}")
    num_chunks = max(1, ceil_div(length, chunk_len))
    mask = mask_for_kernel(loss_mask)
    outputs = torch.empty(_NUM_OUTPUTS, dtype=torch.float32, device=device)  # (8,)
    # (7, B, chunks); every forward program writes its slot, an empty batch leaves zeros for the finalize.
    allocate = torch.empty if batch and length else torch.zeros
    partials = allocate(_NUM_PARTIALS, batch, num_chunks, dtype=torch.float32, device=device)
    row_weights = torch.empty(batch, dtype=torch.float32, device=device)  # (B,)
    dpolicy = torch.empty(batch, length, dtype=torch.float32, device=device) if has_policy else outputs
    dvalue = torch.empty(batch, length, dtype=torch.float32, device=device) if has_value else outputs
    tensors = [row_major(x) for x in (logp, old_logp, advantages, values, old_values, returns)]
    entropy_in = row_major(entropy)
    pointers = [x if x is not None else outputs for x in tensors] + [mask, entropy_in if has_entropy else outputs]
    strides = [x.stride(0) if x is not None else 0 for x in tensors] + [
        mask.stride(0), entropy_in.stride(0) if has_entropy else 0]
    launch = launch_options()
    if batch and length:
        _ppo_fwd_kernel[(num_chunks, batch)](
            partials, dpolicy, dvalue, num_chunks, chunk_len, chunk_len // block, length, *pointers, *strides,
            1.0 - clip_ratio, 1.0 + clip_ratio, float(dual_clip or 0.0), float(value_clip),
            HAS_POLICY=has_policy, HAS_VALUE=has_value, HAS_ENTROPY=has_entropy,
            DUAL_CLIP=dual_clip is not None, BLOCK=block, **launch,
        )
    tokens_kind, tokens_ptr, tokens_scalar = _count_args(global_tokens, device)
    seqs_kind, seqs_ptr, seqs_scalar = _count_args(global_seqs, device)
    _ppo_finalize_kernel[(1,)](
        outputs, row_weights if batch else outputs, partials, batch, num_chunks,
        tokens_ptr if tokens_ptr is not None else outputs, tokens_scalar,
        seqs_ptr if seqs_ptr is not None else outputs, seqs_scalar, float(vf_coef), float(entropy_coef),
        MODE=mode, GLOBAL_TOKENS=tokens_kind, GLOBAL_SEQS=seqs_kind, BLOCK_ROWS=_FINALIZE_BLOCK_ROWS,
    )
    saved = _Saved(dpolicy, dvalue, mask, row_weights, outputs, block, float(vf_coef), float(entropy_coef))
    return saved, outputs.unbind(0)


# The outputs each autograd node returns.
_PART_OUTPUTS = {"loss": ("loss",), "actor": ("policy_loss", "entropy_loss"), "critic": ("value_loss",)}


class _LossPart(torch.autograd.Function):
    """Some differentiable outputs of one fused forward as one autograd node, whose gradient reaches only the
    inputs it was given.

    Three nodes share one forward: `loss` over (logp, values, entropy), `actor` (policy_loss, entropy_loss) over
    (logp, entropy), `critic` (value_loss) over values. The trainer backpropagates the actor part and the critic part
    in two separate calls, each into its own model's graph: a single node over all inputs would lead the second
    call into the first model's graph, already freed, even with no gradient for it. Intermediates live on ctx (no
    save_for_backward), and absent upstream gradients stay None."""

    @staticmethod
    def forward(ctx, part, saved, fields, logp, values, entropy):
        ctx.set_materialize_grads(False)
        ctx.part, ctx.saved = part, saved
        ctx.dtypes = tuple(x.dtype if x is not None else None for x in (logp, values, entropy))
        return tuple(fields[PPOLossOutput._fields.index(name)] for name in _PART_OUTPUTS[ctx.part])

    @staticmethod
    def backward(ctx, *grads):
        upstream = dict(zip(_PART_OUTPUTS[ctx.part], grads))
        grad_loss, grad_policy, grad_value, grad_entropy = (
            upstream.get(name) for name in ("loss", "policy_loss", "value_loss", "entropy_loss"))
        need_logp, need_values, need_entropy = ctx.needs_input_grad[3:6]
        has_policy = need_logp and (grad_loss is not None or grad_policy is not None)
        has_value = need_values and (grad_loss is not None or grad_value is not None)
        has_entropy = need_entropy and (grad_loss is not None or grad_entropy is not None)
        if not (has_policy or has_value or has_entropy):
            return None, None, None, None, None, None
        saved = ctx.saved
        batch, length = saved.mask.shape
        logp_dtype, values_dtype, entropy_dtype = ctx.dtypes
        device = saved.mask.device
        grad_logp = torch.empty(batch, length, dtype=logp_dtype, device=device) if has_policy else None
        grad_values = torch.empty(batch, length, dtype=values_dtype, device=device) if has_value else None
        grad_entropy_in = torch.empty(batch, length, dtype=entropy_dtype, device=device) if has_entropy else None
        if batch and length:
            placeholder = saved.outputs
            _ppo_bwd_kernel[(ceil_div(length, saved.block), batch)](
                grad_logp if has_policy else placeholder, grad_values if has_value else placeholder,
                grad_entropy_in if has_entropy else placeholder, saved.dpolicy, saved.dvalue, saved.mask,
                saved.mask.stride(0), saved.row_weights, saved.outputs,
                *[g if g is not None else placeholder for g in (grad_loss, grad_policy, grad_value, grad_entropy)],
                length, saved.vf_coef, saved.entropy_coef, HAS_POLICY=has_policy, HAS_VALUE=has_value,
                HAS_ENTROPY=has_entropy, GIVEN_LOSS=grad_loss is not None, GIVEN_POLICY=grad_policy is not None,
                GIVEN_VALUE=grad_value is not None, GIVEN_ENTROPY=grad_entropy is not None, BLOCK=saved.block,
                **launch_options(),
            )
        return None, None, None, grad_logp, grad_values, grad_entropy_in


def ppo_loss(
    logp: torch.Tensor | None,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor | None,
    values: torch.Tensor | None,
    old_values: torch.Tensor | None,
    returns: torch.Tensor | None,
    loss_mask: torch.Tensor,
    entropy: torch.Tensor | None = None,
    *,
    clip_ratio: float,
    dual_clip: float | None = None,
    value_clip: float,
    vf_coef: float,
    entropy_coef: float,
    loss_agg_mode: str = "token-mean",
    global_token_count: torch.Tensor | float | None = None,
    global_seq_count: torch.Tensor | float | None = None,
    _block: int | None = None,
    _chunk_len: int | None = None,
) -> PPOLossOutput:
    """Fused PPO loss and diagnostics (0-d fp32 tensors, no host sync); see the twin for every argument.

    `_block` / `_chunk_len` override the launch plan (tests exercise several tiles and chunks at small shapes).
    """
    check_ppo_inputs(logp, old_logp, advantages, values, old_values, returns, loss_mask, entropy,
                     clip_ratio=clip_ratio, dual_clip=dual_clip, value_clip=value_clip, loss_agg_mode=loss_agg_mode)
    given = [x for x in (logp, old_logp, advantages, values, old_values, returns, entropy) if x is not None]
    if any(x.dtype == torch.float64 for x in given):
        return _twin_ppo_loss(logp, old_logp, advantages, values, old_values, returns, loss_mask, entropy,
                              clip_ratio=clip_ratio, dual_clip=dual_clip, value_clip=value_clip, vf_coef=vf_coef,
                              entropy_coef=entropy_coef, loss_agg_mode=loss_agg_mode,
                              global_token_count=global_token_count, global_seq_count=global_seq_count)
    if logp is None:
        vf_coef_used, entropy_coef_used = vf_coef, 0.0
    else:
        vf_coef_used = vf_coef if values is not None else 0.0
        entropy_coef_used = entropy_coef if entropy is not None else 0.0
    settings = (float(clip_ratio), dual_clip, float(value_clip), vf_coef_used, entropy_coef_used,
                LOSS_AGG_MODES.index(loss_agg_mode), global_token_count, global_seq_count, _block, _chunk_len)
    # Only the nodes connect outputs to inputs.
    saved, views = _forward(logp, old_logp, advantages, values, old_values, returns, loss_mask, entropy, settings)
    fields = dict(zip(PPOLossOutput._fields, views))
    (fields["loss"],) = _LossPart.apply("loss", saved, views, logp, values, entropy)
    if logp is not None:
        fields["policy_loss"], fields["entropy_loss"] = _LossPart.apply("actor", saved, views, logp, None, entropy)
    if values is not None:
        (fields["value_loss"],) = _LossPart.apply("critic", saved, views, None, values, None)
    return PPOLossOutput(**fields)
