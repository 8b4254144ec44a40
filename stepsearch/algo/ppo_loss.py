"""PPO losses: clipped policy loss (+ dual clip), clipped value loss, entropy bonus, aggregation and diagnostics.

Per masked-in token t (m_t = [loss_mask_t != 0]), with the log-ratio clamped like the KL estimators:

    ratio_t      = exp(clamp(logp_t - old_logp_t, -20, 20))
    pg_t         = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps))          clipped surrogate
                   then, with dual clip c > 1 and A_t < 0: min(pg_t, -c A_t)          (Ye et al., 2020)
    vf_t         = 0.5 max((v_t - R_t)^2, (clip(v_t, v_old_t - eps_v, v_old_t + eps_v) - R_t)^2)
    loss         = agg(pg) + vf_coef agg(vf) - entropy_coef agg(entropy)

Gradients flow into `logp`, `values` and `entropy` only (old_logp, advantages, old_values and returns are data).
At a tie between the clipped and unclipped branch the unclipped one is taken (equal value, and equal gradient
whenever the clip is inactive).

Aggregation `agg(x)` over the mini-batch (verl's modes), with n_b = sum_t m_bt:

    token-mean            sum_bt m x / N_tokens
    seq-mean-token-sum    sum_b [n_b > 0] sum_t m x / N_seqs
    seq-mean-token-mean   sum_b [n_b > 0] (sum_t m x / n_b) / N_seqs

Invariance to micro-batching and data-parallel size: pass `global_token_count` / `global_seq_count`, the N_tokens /
N_seqs of the whole mini-batch across all ranks (`loss_normalizers` on each micro-batch, summed and all-reduced).
Then every micro-batch returns its share, and the sum of the micro-batch losses (and gradients) over all
micro-batches and ranks equals the loss of the whole mini-batch exactly. Without them the local counts are used
(the loss of this call alone). An engine that itself averages gradients over ranks or accumulation steps (DeepSpeed
does both) must have the loss multiplied back by dp_size x accumulation_steps. N_seqs counts sequences with at least
one masked-in token; empty sequences contribute nothing. A zero count is treated as 1 (an empty batch has loss 0).

Diagnostics are token-means over the same N_tokens, so they add up over micro-batches the same way:
approx_kl = mean of k3 = (ratio - 1) - log ratio (KL(old || new), non-negative), clip_frac = share of tokens whose
clipped branch is active, value_clip_frac = likewise for the value loss. `explained_variance` is separate.

Actor and critic may be updated separately (separate optimisers): pass `values=None` (actor only) or `logp=None`
(critic only), or use `policy_loss` / `value_loss`; absent parts are exact zeros. All outputs are 0-d tensors on
the inputs' device; nothing syncs with the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from stepsearch.algo.kl import LOG_RATIO_CLAMP
from stepsearch.algo.scatter import compute_dtype

__all__ = [
    "LOSS_AGG_MODES",
    "PPOLossOutput",
    "ppo_loss",
    "policy_loss",
    "value_loss",
    "loss_normalizers",
    "explained_variance",
    "check_ppo_inputs",
]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")


class PPOLossOutput(NamedTuple):
    """All fields are 0-d tensors. `loss` = policy_loss + vf_coef value_loss - entropy_coef entropy_loss."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    value_loss: torch.Tensor
    entropy_loss: torch.Tensor
    approx_kl: torch.Tensor
    clip_frac: torch.Tensor
    value_clip_frac: torch.Tensor


def check_ppo_inputs(
    logp, old_logp, advantages, values, old_values, returns, loss_mask, entropy, *, clip_ratio, dual_clip,
    value_clip, loss_agg_mode,
) -> None:
    """Raise ValueError naming the argument when shapes or settings disagree (no host sync)."""
    if loss_mask.dim() != 2:
        raise ValueError(f"ppo_loss: loss_mask must be (B, T), got shape {tuple(loss_mask.shape)}")
    if logp is None and values is None:
        raise ValueError("ppo_loss: give logp (policy loss), values (value loss) or both")
    required = []
    if logp is not None:
        required += [("logp", logp), ("old_logp", old_logp), ("advantages", advantages)]
    if values is not None:
        required += [("values", values), ("old_values", old_values), ("returns", returns)]
    if entropy is not None:
        if logp is None:
            raise ValueError("ppo_loss: entropy belongs to the policy loss; it needs logp")
        required.append(("entropy", entropy))
    for name, tensor in required:
        if tensor is None:
            needed_by = "values" if name in ("old_values", "returns") else "logp"
            raise ValueError(f"ppo_loss: {name} is required when {needed_by} is given")
        if tensor.shape != loss_mask.shape:
            raise ValueError(f"ppo_loss: {name} must be (B, T) = {tuple(loss_mask.shape)}, got {tuple(tensor.shape)}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"ppo_loss: loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if logp is not None and not clip_ratio > 0:
        raise ValueError(f"ppo_loss: clip_ratio must be positive, got {clip_ratio}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"ppo_loss: dual_clip must be > 1 or None, got {dual_clip}")
    if values is not None and not value_clip > 0:
        raise ValueError(f"ppo_loss: value_clip must be positive, got {value_clip}")


def loss_normalizers(loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N_tokens, N_seqs) of one micro-batch as 0-d float32 tensors: sum them (and all-reduce) to get the globals."""
    selected = loss_mask != 0  # (B, T)
    return selected.sum().to(torch.float32), selected.any(dim=1).sum().to(torch.float32)


def _as_count(count, fallback: torch.Tensor) -> torch.Tensor:
    if count is None:
        return fallback.clamp(min=1)
    return torch.as_tensor(count, dtype=fallback.dtype, device=fallback.device).clamp(min=1)


def _row_weights(
    selected: torch.Tensor, loss_agg_mode: str, global_token_count, global_seq_count, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (B, 1) such that agg(x) = sum_bt m x weight_b, 1 / N_tokens as a 0-d tensor)."""
    tokens_per_row = selected.sum(dim=1).to(dtype)  # (B,)
    inv_tokens = 1.0 / _as_count(global_token_count, tokens_per_row.sum())
    if loss_agg_mode == "token-mean":
        return inv_tokens.expand(len(selected))[:, None], inv_tokens
    has_tokens = (tokens_per_row > 0).to(dtype)  # (B,)
    inv_seqs = 1.0 / _as_count(global_seq_count, has_tokens.sum())
    if loss_agg_mode == "seq-mean-token-sum":
        return (has_tokens * inv_seqs)[:, None], inv_tokens
    return (has_tokens * inv_seqs / tokens_per_row.clamp(min=1))[:, None], inv_tokens


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
) -> PPOLossOutput:
    """PPO loss of a (micro-)batch and its diagnostics; every tensor argument is (B, T).

    Args:
        logp: log-probs of the sampled tokens under the current policy (differentiable), or None (critic only).
        old_logp: log-probs at rollout time; advantages: GAE advantages (whitened by the caller).
        values: current critic values (differentiable), or None (actor only); old_values: values at rollout time;
            returns: GAE returns.
        loss_mask: nonzero on generated response tokens.
        entropy: per-token policy entropy (differentiable) for the bonus, or None.
        clip_ratio: epsilon of the ratio clip; dual_clip: c > 1 or None; value_clip: epsilon of the value clip.
        vf_coef, entropy_coef: weights of the value loss and the entropy bonus in `loss`.
        loss_agg_mode: "token-mean", "seq-mean-token-sum" or "seq-mean-token-mean".
        global_token_count, global_seq_count: mini-batch normalisers across micro-batches and ranks (see module).
    """
    check_ppo_inputs(logp, old_logp, advantages, values, old_values, returns, loss_mask, entropy,
                     clip_ratio=clip_ratio, dual_clip=dual_clip, value_clip=value_clip, loss_agg_mode=loss_agg_mode)
    dtype = compute_dtype(logp, old_logp, advantages, values, old_values, returns, entropy)
    selected = loss_mask != 0  # (B, T)
    weights, inv_tokens = _row_weights(selected, loss_agg_mode, global_token_count, global_seq_count, dtype)
    zero = torch.zeros((), dtype=dtype, device=loss_mask.device)

    def aggregate(per_token: torch.Tensor) -> torch.Tensor:
        return (torch.where(selected, per_token, zero) * weights).sum()

    def token_mean(per_token: torch.Tensor) -> torch.Tensor:
        return torch.where(selected, per_token, zero).sum() * inv_tokens

    policy_part = entropy_part = approx_kl = clip_frac = value_part = value_clip_frac = zero
    if logp is not None:
        advantages = advantages.detach().to(dtype)
        log_ratio = (logp.to(dtype) - old_logp.detach().to(dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ratio = torch.exp(log_ratio)  # (B, T)
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
        is_clipped = clipped > unclipped  # (B, T)
        per_token = torch.where(is_clipped, clipped, unclipped)
        if dual_clip is not None:
            lower_bound = -advantages * dual_clip
            per_token = torch.where((advantages < 0) & (lower_bound < per_token), lower_bound, per_token)
        policy_part = aggregate(per_token)
        approx_kl = token_mean((ratio - 1.0) - log_ratio).detach()
        clip_frac = token_mean(is_clipped.to(dtype))
        if entropy is not None:
            entropy_part = aggregate(entropy.to(dtype))
    if values is not None:
        values = values.to(dtype)
        old_values = old_values.detach().to(dtype)
        returns = returns.detach().to(dtype)
        values_clipped = torch.minimum(torch.maximum(values, old_values - value_clip), old_values + value_clip)
        unclipped_error = (values - returns).square()
        clipped_error = (values_clipped - returns).square()
        is_value_clipped = clipped_error > unclipped_error  # (B, T)
        value_part = 0.5 * aggregate(torch.where(is_value_clipped, clipped_error, unclipped_error))
        value_clip_frac = token_mean(is_value_clipped.to(dtype))
    loss = policy_part + vf_coef * value_part - entropy_coef * entropy_part
    return PPOLossOutput(loss, policy_part, value_part, entropy_part, approx_kl, clip_frac, value_clip_frac)


def policy_loss(logp, old_logp, advantages, loss_mask, entropy=None, *, clip_ratio: float,
                dual_clip: float | None = None, entropy_coef: float = 0.0, loss_agg_mode: str = "token-mean",
                global_token_count=None, global_seq_count=None) -> PPOLossOutput:
    """Actor part only: `ppo_loss` with values=None (value_loss and value_clip_frac are 0)."""
    return ppo_loss(logp, old_logp, advantages, None, None, None, loss_mask, entropy, clip_ratio=clip_ratio,
                    dual_clip=dual_clip, value_clip=1.0, vf_coef=0.0, entropy_coef=entropy_coef,
                    loss_agg_mode=loss_agg_mode, global_token_count=global_token_count,
                    global_seq_count=global_seq_count)


def value_loss(values, old_values, returns, loss_mask, *, value_clip: float, vf_coef: float = 1.0,
               loss_agg_mode: str = "token-mean", global_token_count=None, global_seq_count=None) -> PPOLossOutput:
    """Critic part only: `ppo_loss` with logp=None (`loss` = vf_coef * value_loss; policy fields are 0)."""
    return ppo_loss(None, None, None, values, old_values, returns, loss_mask, None, clip_ratio=1.0,
                    value_clip=value_clip, vf_coef=vf_coef, entropy_coef=0.0, loss_agg_mode=loss_agg_mode,
                    global_token_count=global_token_count, global_seq_count=global_seq_count)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over masked-in tokens (biased variances), a 0-d tensor.

    Follows scikit-learn's `explained_variance_score`: 1 when both variances are 0, 0 when only Var(returns) is.
    """
    selected = mask != 0  # (B, T)
    dtype = compute_dtype(values, returns)
    zero = torch.zeros((), dtype=dtype, device=values.device)
    count = selected.sum().to(dtype).clamp(min=1)

    def variance(x: torch.Tensor) -> torch.Tensor:
        x = torch.where(selected, x.to(dtype), zero)
        mean = x.sum() / count
        return torch.where(selected, x - mean, zero).square().sum() / count

    residual_variance = variance(returns.to(dtype) - values.to(dtype))
    returns_variance = variance(returns)
    ratio = 1.0 - residual_variance / torch.where(returns_variance > 0, returns_variance, torch.ones_like(zero))
    return torch.where(returns_variance > 0, ratio,
                       torch.where(residual_variance > 0, zero, torch.ones_like(zero))).detach()
