"""Fused LM-head log-prob + entropy (Triton): never builds the (N, V) logits, forward and backward.

Same signature and semantics as the pure-torch twin `stepsearch.algo.logprob.logprob_entropy` (read its docstring
for the maths and the gradient derivation). Structure (Liger style): private `@triton.jit` kernels, launchers, one
`torch.autograd.Function`, the public `logprob_entropy`.

Forward (`_fwd_kernel`): programs over (row tile, vocabulary split of `chunk_size` columns). Each program walks its
split in (BLOCK_N, BLOCK_V) logit tiles computed on the fly with `tl.dot` over H, and keeps an online log-sum-exp
(running max m, sum exp(z - m), sum exp(z - m) z, so E_p[z] comes out directly) plus the target logit. Rows and
columns past the ends read a clamped valid row and are masked afterwards, so the tile loads carry only the H mask;
with those few full-tile temporaries no autotune config spills on sm_90 (numbers next to the config tables). A tiny
torch combine merges the splits (num_splits x N floats). Splitting V keeps the GPU full when N is small (rollout
scoring of few tokens).

Backward: for each vocabulary chunk, `_dlogits_kernel` recomputes the logit tiles and writes
dz = (g ([j == target] - p) + e p (E_p[z] - z)) / temperature into an (N, chunk_size) buffer in the input dtype;
then two cuBLAS GEMMs take d hidden += dz @ W_chunk (fp32 accumulator) and d W_chunk = dz^T @ hidden (complete per
chunk, written once). No atomics: results are bitwise deterministic. FLOPs: forward 2NHV, backward 6NHV (logit
recompute, d hidden, d weight), i.e. exactly the 8NHV the benchmark counts. Extra memory besides the gradients:
N * chunk_size elements for dz and one fp32 (N, H) accumulator that every chunk's GEMM adds into in place (bf16 on
torch >= 2.8: cuBLAS with an fp32 C operand), plus (num_splits, N) statistics: ~0.4 GiB at N=16k, H=2048, chunk
4096, whatever V is.

Precision: tile loads stay in bf16/fp16 for the tensor cores, `tl.dot` accumulates in fp32 and everything after
the dot (softmax statistics, entropy, gradients) is fp32. fp32 inputs use IEEE fp32 dots (no TF32), so fp32 results
match float64 to ~1e-6 relative. fp64 inputs are delegated to the twin.

Out-of-range targets cannot be checked without a host sync; their log-prob comes out NaN (never silently wrong).
Under TRITON_INTERPRET=1 (CPU tests) autotuning is bypassed and small fixed tiles are used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepsearch.algo.logprob import check_logprob_inputs
from stepsearch.algo.logprob import logprob_entropy as _twin_logprob_entropy
from stepsearch.kernels.launch import INTERPRET

__all__ = ["logprob_entropy"]

# Small tiles for the CPU interpreter (tl.dot needs every dimension >= 16). The interpreter's tl.dot multiplies
# bf16 operands as their raw uint16 bits (triton 3.9), so there the tiles are upcast to fp32 first: same result,
# since bf16 products are exact in fp32.
_INTERPRET_LAUNCH = {"BLOCK_N": 16, "BLOCK_V": 16, "BLOCK_H": 16, "UPCAST_DOT_OPERANDS": True}

# H100 candidates, none of which spills (offline sm_90 compile read with cuobjdump -res-usage, registers per thread,
# forward / d-logits, pointers and H-multiple-of-16 ints specialised as a real launch specialises them; the sm_90
# compile test pins "no spill" for each). bf16/fp16 (wgmma): 64x128 127/80, 128x64 128/101, 128x128 214/128,
# 64x256 210/127, 64x64 at 4 warps 126/96.
_TENSOR_CORE_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 64, "BLOCK_H": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_H": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 64}, num_warps=4, num_stages=4),
]
# fp32 inputs take IEEE FMA dots whose operands live in registers: the 128x128 and 64x256 tiles spill there, so fp32
# gets its own smaller set (64x128 206/128, 64x64x32 168/128, 32x64x32 128/96).
_FP32_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_H": 32}, num_warps=4, num_stages=3),
]


def _configs_for_dtype(configs, named_args, **kwargs):
    """Autotuner pruning: the candidate set of the input dtype."""
    return _FP32_CONFIGS if named_args["hidden_ptr"].dtype == torch.float32 else _TENSOR_CORE_CONFIGS


def _maybe_autotune(fn):
    """Autotune on GPU keyed on the model's shape (Triton adds tensor dtypes): N changes every step, no re-tuning."""
    if INTERPRET:
        return fn
    return triton.autotune(
        configs=_TENSOR_CORE_CONFIGS + _FP32_CONFIGS, key=["hidden_size", "vocab"],
        prune_configs_by={"early_config_prune": _configs_for_dtype},
    )(fn)


@triton.jit
def _logit_tile(
    hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, hidden_size, stride_h, stride_w, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT_OPERANDS: tl.constexpr,
):
    """Logits z (BLOCK_N, BLOCK_V) fp32 = hidden[rows] . weight[cols] / temperature, accumulated over H."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    hs = tl.arange(0, BLOCK_H)
    # Out-of-range rows and columns read a valid row (clamped) and are masked by the callers: no 2-D load masks.
    safe_rows = tl.where(row_ok, rows, 0).to(tl.int64)
    safe_cols = tl.where(col_ok, cols, 0).to(tl.int64)
    hidden_ptrs = hidden_ptr + safe_rows[:, None] * stride_h + hs[None, :]
    weight_ptrs = weight_ptr + safe_cols[None, :] * stride_w + hs[:, None]
    for h_start in range(0, hidden_size, BLOCK_H):
        h_left = hidden_size - h_start
        hidden_tile = tl.load(hidden_ptrs, mask=hs[None, :] < h_left, other=0.0)
        weight_tile = tl.load(weight_ptrs, mask=hs[:, None] < h_left, other=0.0)
        if UPCAST_DOT_OPERANDS:
            hidden_tile = hidden_tile.to(tl.float32)
            weight_tile = weight_tile.to(tl.float32)
        acc = tl.dot(hidden_tile, weight_tile, acc, input_precision=DOT_PRECISION)
        hidden_ptrs += BLOCK_H
        weight_ptrs += BLOCK_H
    return acc * inv_temp


@_maybe_autotune
@triton.jit
def _fwd_kernel(
    hidden_ptr, weight_ptr, targets_ptr,
    part_max_ptr, part_sum_ptr, part_dot_ptr, target_logit_ptr,
    n_rows, hidden_size, vocab, split_cols, stride_h, stride_w, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT_OPERANDS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int32)  # V < 2**31; int64 costs registers
    running_max = tl.full((BLOCK_N,), -1.0e30, dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    running_dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = pid_split * split_cols
    v_end = tl.minimum(v_begin + split_cols, vocab)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        logits = _logit_tile(
            hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, hidden_size, stride_h, stride_w, inv_temp,
            BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT_OPERANDS,
        )
        logits = tl.where(col_ok[None, :], logits, -1.0e30)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        scale = tl.exp(running_max - new_max)
        probs_unnorm = tl.exp(logits - new_max[:, None])
        running_sum = scale * running_sum + tl.sum(probs_unnorm, axis=1)
        running_dot = scale * running_dot + tl.sum(probs_unnorm * logits, axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], logits, 0.0), axis=1)
    owns_target = row_ok & (targets >= v_begin) & (targets < v_end)
    part_offsets = pid_split * n_rows + rows
    tl.store(part_max_ptr + part_offsets, running_max, mask=row_ok)
    tl.store(part_sum_ptr + part_offsets, running_sum, mask=row_ok)
    tl.store(part_dot_ptr + part_offsets, running_dot, mask=row_ok)
    # Exactly one split owns each valid target; the buffer starts as NaN so an out-of-range target stays NaN.
    tl.store(target_logit_ptr + rows, target_logit, mask=owns_target)


@_maybe_autotune
@triton.jit
def _dlogits_kernel(
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, mean_logit_ptr, grad_logp_ptr, grad_entropy_ptr, dlogits_ptr,
    n_rows, hidden_size, vocab, col_begin, col_end, stride_h, stride_w, stride_d, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT_OPERANDS: tl.constexpr,
):
    # Row tiles vary fastest so programs resident together share the same weight tile in L2.
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    local_cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = col_begin + local_cols
    col_ok = cols < col_end
    logits = _logit_tile(
        hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, hidden_size, stride_h, stride_w, inv_temp,
        BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST_DOT_OPERANDS,
    )
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1).to(tl.int32)  # V < 2**31; int64 costs registers
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    mean_logit = tl.load(mean_logit_ptr + rows, mask=row_ok, other=0.0)
    grad_logp = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    probs = tl.exp(logits - lse[:, None])
    dlogits = probs * (grad_entropy[:, None] * (mean_logit[:, None] - logits) - grad_logp[:, None])
    dlogits += tl.where(cols[None, :] == targets[:, None], grad_logp[:, None], 0.0)
    dlogits = dlogits * inv_temp
    out_ptrs = dlogits_ptr + rows.to(tl.int64)[:, None] * stride_d + local_cols[None, :]
    tl.store(out_ptrs, dlogits.to(dlogits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _launch_kwargs() -> dict:
    return dict(_INTERPRET_LAUNCH) if INTERPRET else {"UPCAST_DOT_OPERANDS": False}


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 callers asked for fp32 accuracy (rel. err < 1e-5): TF32 would give ~1e-3.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(hidden, weight, targets, chunk_size, inv_temp):
    """Returns logp, entropy, lse, mean logit, all (N,) fp32."""
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    num_splits = triton.cdiv(vocab, chunk_size)
    part_max = torch.empty((num_splits, n_rows), dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty_like(part_max)
    part_dot = torch.empty_like(part_max)
    target_logit = torch.full((n_rows,), float("nan"), dtype=torch.float32, device=hidden.device)
    if n_rows:
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), num_splits)  # noqa: E731
        _fwd_kernel[grid](
            hidden, weight, targets, part_max, part_sum, part_dot, target_logit,
            n_rows, hidden_size, vocab, chunk_size, hidden.stride(0), weight.stride(0), inv_temp,
            DOT_PRECISION=_dot_precision(hidden.dtype), **_launch_kwargs(),
        )
    # Merge the splits' online statistics; every split holds >= 1 column so part_max is finite.
    global_max = part_max.amax(dim=0)  # (N,)
    scale = torch.exp(part_max - global_max)  # (S, N)
    total_sum = (scale * part_sum).sum(dim=0)
    mean_logit = (scale * part_dot).sum(dim=0) / total_sum  # E_p[z]
    lse = global_max + torch.log(total_sum)
    # lse - E_p[z] loses ~1e-7 x |z| to rounding: a near-one-hot row must not come out at -1e-6.
    entropy = (lse - mean_logit).clamp_min(0.0)
    logp = target_logit - lse
    return logp, entropy, lse, mean_logit


# torch >= 2.8 runs a bf16 x bf16 GEMM with an fp32 C operand on CUDA (aten::addmm.dtype_out): cuBLAS adds each
# chunk's product straight into the fp32 accumulator (beta = 1), no (N, H) partial product in between.
_ADDMM_HAS_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


def _matmul_into_fp32(accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """accumulator (fp32) += a @ b, in place, in fp32."""
    if a.dtype == torch.float32:
        accumulator.addmm_(a, b)
    elif a.is_cuda and _ADDMM_HAS_OUT_DTYPE:
        torch.ops.aten.addmm.dtype_out(accumulator, a, b, torch.float32, out=accumulator)
    elif a.is_cuda:
        accumulator.add_(a @ b)  # torch < 2.8: one (N, H) partial product per chunk, rounded to bf16 once
    else:
        accumulator.addmm_(a.float(), b.float())  # interpreter runs: CPU addmm needs one dtype


def _backward(hidden, weight, targets, lse, mean_logit, grad_logp, grad_entropy, chunk_size, inv_temp,
              need_hidden, need_weight):
    n_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    grad_hidden = torch.zeros((n_rows, hidden_size), dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    if n_rows == 0:
        if need_weight:
            grad_weight.zero_()
        return (grad_hidden.to(hidden.dtype) if need_hidden else None), grad_weight
    chunk_cols = min(chunk_size, vocab)
    dlogits = torch.empty((n_rows, chunk_cols), dtype=hidden.dtype, device=hidden.device)  # (N, chunk)
    grad_logp = grad_logp.contiguous()
    grad_entropy = grad_entropy.contiguous()
    for col_begin in range(0, vocab, chunk_cols):
        col_end = min(col_begin + chunk_cols, vocab)
        width = col_end - col_begin
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), triton.cdiv(width, meta["BLOCK_V"]))  # noqa: E731
        _dlogits_kernel[grid](
            hidden, weight, targets, lse, mean_logit, grad_logp, grad_entropy, dlogits,
            n_rows, hidden_size, vocab, col_begin, col_end, hidden.stride(0), weight.stride(0), dlogits.stride(0),
            inv_temp, DOT_PRECISION=_dot_precision(hidden.dtype), **_launch_kwargs(),
        )
        dlogits_chunk = dlogits[:, :width]  # (N, width)
        if need_hidden:
            _matmul_into_fp32(grad_hidden, dlogits_chunk, weight[col_begin:col_end])
        if need_weight:
            torch.mm(dlogits_chunk.T, hidden, out=grad_weight[col_begin:col_end])
    return (grad_hidden.to(hidden.dtype) if need_hidden else None), grad_weight


class _FusedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature):
        inv_temp = 1.0 / temperature
        logp, entropy, lse, mean_logit = _forward(hidden, weight, targets, chunk_size, inv_temp)
        ctx.save_for_backward(hidden, weight, targets, lse, mean_logit)
        ctx.chunk_size = chunk_size
        ctx.inv_temp = inv_temp
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, mean_logit = ctx.saved_tensors
        grad_hidden, grad_weight = _backward(
            hidden, weight, targets, lse, mean_logit, grad_logp.float(), grad_entropy.float(), ctx.chunk_size,
            ctx.inv_temp, ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        return grad_hidden, grad_weight, None, None, None


def logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 4096,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy under softmax(hidden @ weight.T / temperature), fused, fwd + bwd.

    Args:
        hidden: (N, H) final hidden states of the response tokens (bf16, fp16 or fp32).
        weight: (V, H) LM-head weight, same dtype as `hidden`.
        targets: (N,) int64 token ids in [0, V); an out-of-range id gives a NaN log-prob (no host sync).
        chunk_size: vocabulary columns per forward split and per backward chunk; the backward's dz buffer is
            N * chunk_size elements of the input dtype.
        temperature: sampling temperature the tokens were drawn at; divides the logits.

    Returns:
        (logp, entropy), both (N,) fp32, differentiable w.r.t. hidden and weight.

    Select the response tokens first, so prompt and retrieved tokens cost nothing:
        hidden = last_hidden[:, :-1][loss_mask]   # (N, H) from (B, T, H); loss_mask (B, T) bool
        logp, entropy = logprob_entropy(hidden, lm_head.weight, input_ids[:, 1:][loss_mask], temperature=T)
    """
    check_logprob_inputs(hidden, weight, targets, chunk_size, temperature)
    if hidden.dtype == torch.float64:
        return _twin_logprob_entropy(hidden, weight, targets, chunk_size=chunk_size, temperature=temperature)
    return _FusedLogprobEntropy.apply(
        hidden.contiguous(), weight.contiguous(), targets.long().contiguous(), chunk_size, float(temperature)
    )
