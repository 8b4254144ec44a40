"""Per-token log-prob of the taken token and policy entropy from hidden states and the LM-head weight.

This is the pure-torch twin (the specification) of `stepsearch.kernels.logprob` and the CPU path. Both compute,
for every row i of `hidden` (N, H) and the LM-head `weight` (V, H):

    z_ij    = (hidden_i . weight_j) / temperature          logits, accumulated in fp32 (fp64 for fp64 inputs)
    lse_i   = log sum_j exp(z_ij)
    logp_i  = z_i,targets_i - lse_i                         log-prob of the taken token
    H_i     = lse_i - sum_j p_ij z_ij                        entropy, p = softmax(z)

Temperature divides the logits: a rollout sampled at temperature T must be scored at the same T, otherwise the
PPO ratio compares two different policies.

Memory: the (N, V) logits are never built. The vocabulary is walked in chunks of `chunk_size` columns with an
online log-sum-exp; only (N, chunk_size) logits live at once. The backward pass recomputes each chunk's logits
from the saved per-row statistics (lse and the mean logit sum_j p_ij z_ij) instead of storing them.

Gradient (derived once, tested against autograd): with g = upstream gradient of logp and e = of entropy,

    d logp / d z_j = [j == target] - p_j
    d H    / d z_j = p_j (E_p[z] - z_j)
    d z_j          = g ([j == target] - p_j) + e p_j (E_p[z] - z_j)

then d hidden = (dz / temperature) @ weight and d weight = (dz / temperature)^T @ hidden.

`logprob_entropy_materialized` is the peers' method (verl, OpenRLHF, TRL): build the full logits, upcast,
log_softmax, gather. It is the referee in tests and the baseline in `benchmarks/bench_logprob.py`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["logprob_entropy", "logprob_entropy_materialized", "check_logprob_inputs"]


def check_logprob_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, temperature: float
) -> None:
    """Raise ValueError with a clear message when shapes, dtypes or settings are inconsistent (no host sync)."""
    if hidden.dim() != 2:
        raise ValueError(f"logprob_entropy: hidden must be (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"logprob_entropy: weight must be (V, H), got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"logprob_entropy: hidden size mismatch, hidden is {tuple(hidden.shape)} "
            f"but weight is {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],):
        raise ValueError(
            f"logprob_entropy: targets must be (N,) = ({hidden.shape[0]},), got shape {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"logprob_entropy: targets must be int64 or int32, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"logprob_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}; they must match")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"logprob_entropy: unsupported dtype {hidden.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(
            f"logprob_entropy: tensors on different devices: hidden {hidden.device}, weight {weight.device}, "
            f"targets {targets.device}"
        )
    if weight.shape[0] == 0:
        raise ValueError("logprob_entropy: weight has an empty vocabulary (V = 0)")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"logprob_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"logprob_entropy: temperature must be a finite number > 0, got {temperature!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_logits(hidden_c: torch.Tensor, weight: torch.Tensor, start: int, stop: int, inv_temp: float) -> torch.Tensor:
    """Logits (N, stop - start) of one vocabulary chunk in the compute dtype of `hidden_c`."""
    return (hidden_c @ weight[start:stop].to(hidden_c.dtype).T) * inv_temp


class _ChunkedLogprobEntropy(torch.autograd.Function):
    """Vocabulary-chunked forward with online log-sum-exp; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature):
        inv_temp = 1.0 / temperature
        hidden_c = hidden.to(_compute_dtype(hidden.dtype))  # (N, H)
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        running_max = hidden_c.new_full((n_rows,), -math.inf)  # (N,)
        running_sum = hidden_c.new_zeros(n_rows)  # (N,) sum exp(z - running_max)
        # sum exp(z - m)(z - m): kept relative to the running max so entropy = log(sum) - this/sum needs no
        # cancellation between two large numbers.
        running_shifted = hidden_c.new_zeros(n_rows)  # (N,)
        target_logit = hidden_c.new_zeros(n_rows)  # (N,)
        for start in range(0, vocab, chunk_size):
            stop = min(start + chunk_size, vocab)
            logits = _chunk_logits(hidden_c, weight, start, stop, inv_temp)  # (N, chunk)
            new_max = torch.maximum(running_max, logits.amax(dim=1))
            shift = running_max - new_max  # (N,) <= 0; -inf on the first chunk
            scale = torch.exp(shift)
            carried = torch.where(running_sum > 0, scale * (running_shifted + shift * running_sum), 0.0)
            centred = logits - new_max[:, None]
            probs_unnorm = torch.exp(centred)
            running_shifted = carried + (probs_unnorm * centred).sum(dim=1)
            running_sum = scale * running_sum + probs_unnorm.sum(dim=1)
            running_max = new_max
            in_chunk = (targets >= start) & (targets < stop)
            local = (targets - start).clamp(0, stop - start - 1)
            target_logit = torch.where(in_chunk, logits.gather(1, local[:, None]).squeeze(1), target_logit)
        lse = running_max + torch.log(running_sum)
        entropy = torch.log(running_sum) - running_shifted / running_sum
        logp = target_logit - lse
        mean_logit = lse - entropy  # E_p[z], needed by the entropy gradient
        ctx.save_for_backward(hidden, weight, targets, lse, mean_logit)
        ctx.chunk_size = chunk_size
        ctx.inv_temp = inv_temp
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, mean_logit = ctx.saved_tensors
        compute_dtype = lse.dtype
        hidden_c = hidden.to(compute_dtype)  # (N, H)
        grad_logp = grad_logp.to(compute_dtype)  # (N,)
        grad_entropy = grad_entropy.to(compute_dtype)  # (N,)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden_c) if need_hidden else None  # (N, H)
        grad_weight = torch.empty_like(weight) if need_weight else None  # (V, H)
        vocab = weight.shape[0]
        for start in range(0, vocab, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, vocab)
            logits = _chunk_logits(hidden_c, weight, start, stop, ctx.inv_temp)  # (N, chunk)
            probs = torch.exp(logits - lse[:, None])
            dlogits = probs * (grad_entropy[:, None] * (mean_logit[:, None] - logits) - grad_logp[:, None])
            in_chunk = (targets >= start) & (targets < stop)
            local = (targets - start).clamp(0, stop - start - 1)
            dlogits.scatter_add_(1, local[:, None], torch.where(in_chunk, grad_logp, 0.0)[:, None])
            dlogits = dlogits * ctx.inv_temp
            if need_hidden:
                grad_hidden += dlogits @ weight[start:stop].to(compute_dtype)
            if need_weight:
                grad_weight[start:stop] = (dlogits.T @ hidden_c).to(weight.dtype)
        if need_hidden:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None


def logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 4096,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy under softmax(hidden @ weight.T / temperature), chunked over V.

    Args:
        hidden: (N, H) final hidden states of the response tokens (bf16, fp16, fp32 or fp64).
        weight: (V, H) LM-head weight, same dtype as `hidden`.
        targets: (N,) int64 token ids in [0, V) (checked here with one host sync; this is the CPU path).
        chunk_size: vocabulary columns per chunk; peak extra memory is about 4 * N * chunk_size * 4 bytes.
        temperature: sampling temperature the tokens were drawn at; divides the logits.

    Returns:
        (logp, entropy), both (N,) fp32 (fp64 for fp64 inputs), differentiable w.r.t. hidden and weight.
    """
    check_logprob_inputs(hidden, weight, targets, chunk_size, temperature)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(
            f"logprob_entropy: targets must lie in [0, {weight.shape[0]}), got range "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
    return _ChunkedLogprobEntropy.apply(hidden, weight, targets.long(), chunk_size, float(temperature))


def logprob_entropy_materialized(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The peers' method: full (N, V) logits in the input dtype, upcast, log_softmax, gather (plain autograd).

    Uses O(N * V) memory; for tests (as a float64 referee) and as the benchmark baseline only.
    """
    logits = hidden @ weight.T  # (N, V) in the input dtype, as an HF lm_head produces them
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    log_probs = torch.log_softmax(logits, dim=-1)  # (N, V)
    logp = log_probs.gather(1, targets.long()[:, None]).squeeze(1)
    entropy = torch.logsumexp(logits, dim=-1) - (log_probs.exp() * logits).sum(dim=-1)
    return logp, entropy
