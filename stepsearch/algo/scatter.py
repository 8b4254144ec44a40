"""Token placement of the StePPO rewards: step scores, outcome score and KL penalty -> `token_rewards` (B, T).

For each sequence b (docs/design.md, "Semantics": token placement):

    token_rewards[b, t] = sum_s step_scores[b, s] * [step_ends[b, s] == t]        step reward on the step's end token
                        + outcome[b] * [t == last t' with loss_mask[b, t'] != 0]    outcome on the last response token
                        - kl_coef * kl(old_logp[b, t], ref_logp[b, t])              KL penalty on generated tokens
    and token_rewards[b, t] = 0 wherever loss_mask[b, t] == 0.

- `step_ends[b, s] == -1` means "no step s"; two steps ending on the same token add up.
- A step end on a masked-out token (retrieved text, padding) is dropped with the rest of that position: the
  segmenter puts step ends on the last token of `</search>`, which is generated and therefore masked in.
- A sequence without masked-in tokens gets no outcome and all-zero rewards.
- Non-finite log-probs at masked-out positions (padding) do not leak: masking is a select, not a multiplication.
- `old_logp` / `ref_logp` may be None when `kl_coef == 0` (no reference model).

The result is float64 when any floating input is float64, else float32. This twin checks that step ends lie in
[-1, T) with one host sync; the Triton kernel cannot check without one and ignores out-of-range ends.
"""

from __future__ import annotations

import torch

from stepsearch.algo.kl import KL_ESTIMATORS, kl_penalty

__all__ = ["scatter_rewards", "check_scatter_inputs", "compute_dtype"]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any given floating tensor is float64, else float32 (bf16/fp16 inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def check_scatter_inputs(
    outcome: torch.Tensor,
    step_scores: torch.Tensor,
    step_ends: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    loss_mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str,
) -> None:
    """Raise ValueError naming the argument when shapes or settings disagree (no host sync)."""
    if loss_mask.dim() != 2:
        raise ValueError(f"scatter_rewards: loss_mask must be (B, T), got shape {tuple(loss_mask.shape)}")
    batch, _ = loss_mask.shape
    if outcome.shape != (batch,):
        raise ValueError(f"scatter_rewards: outcome must be (B,) = ({batch},), got shape {tuple(outcome.shape)}")
    if step_scores.dim() != 2 or step_scores.shape[0] != batch:
        raise ValueError(f"scatter_rewards: step_scores must be (B, S) with B = {batch}, "
                         f"got shape {tuple(step_scores.shape)}")
    if step_ends.shape != step_scores.shape:
        raise ValueError(f"scatter_rewards: step_ends {tuple(step_ends.shape)} must have the shape of "
                         f"step_scores {tuple(step_scores.shape)}")
    if step_ends.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"scatter_rewards: step_ends must be int64 or int32, got {step_ends.dtype}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"scatter_rewards: kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if kl_coef != 0:
        if old_logp is None or ref_logp is None:
            raise ValueError("scatter_rewards: old_logp and ref_logp are required when kl_coef != 0")
        for name, tensor in (("old_logp", old_logp), ("ref_logp", ref_logp)):
            if tensor.shape != loss_mask.shape:
                raise ValueError(f"scatter_rewards: {name} must be (B, T) = {tuple(loss_mask.shape)}, "
                                 f"got shape {tuple(tensor.shape)}")


def scatter_rewards(
    outcome: torch.Tensor,
    step_scores: torch.Tensor,
    step_ends: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    loss_mask: torch.Tensor,
    kl_coef: float,
    kl_estimator: str = "k1",
) -> torch.Tensor:
    """Per-token rewards (B, T) from the outcome (B,), step scores (B, S) at `step_ends` (B, S) and the KL penalty.

    Args:
        outcome: (B,) outcome score of each sequence (answer F1 or format penalty, plus the key reward).
        step_scores: (B, S) step reward of each search round (already scaled by the step weight).
        step_ends: (B, S) int64 token index closing round s, -1 where sequence b has fewer than s + 1 rounds.
        old_logp, ref_logp: (B, T) log-probs of the sampled tokens under the rollout and reference policies.
        loss_mask: (B, T) nonzero on generated response tokens (bool, int or float).
        kl_coef: beta of the KL penalty.
        kl_estimator: "k1" (default), "k2" or "k3"; see `stepsearch.algo.kl`.
    """
    check_scatter_inputs(outcome, step_scores, step_ends, old_logp, ref_logp, loss_mask, kl_coef, kl_estimator)
    batch, length = loss_mask.shape
    if step_ends.numel() and (int(step_ends.min()) < -1 or int(step_ends.max()) >= length):
        raise ValueError(f"scatter_rewards: step_ends must lie in [-1, {length}) (-1 = no step), got range "
                         f"[{int(step_ends.min())}, {int(step_ends.max())}]")
    dtype = compute_dtype(outcome, step_scores, old_logp, ref_logp)
    mask = loss_mask != 0  # (B, T)

    rewards = torch.zeros(batch, length, dtype=dtype, device=loss_mask.device)  # (B, T)
    if length == 0:
        return rewards
    has_step = step_ends >= 0  # (B, S)
    rewards.scatter_add_(1, step_ends.long().clamp(min=0),
                         torch.where(has_step, step_scores.to(dtype), torch.zeros((), dtype=dtype)))

    has_token = mask.any(dim=1)  # (B,)
    # argmax returns the first maximum, so on the flipped mask it finds the last masked-in token.
    last_token = (length - 1) - mask.flip(1).to(torch.int8).argmax(dim=1)  # (B,)
    rewards.scatter_add_(1, last_token[:, None],
                         torch.where(has_token, outcome.to(dtype), torch.zeros((), dtype=dtype))[:, None])

    if kl_coef != 0:
        rewards = rewards - kl_coef * kl_penalty(old_logp.to(dtype), ref_logp.to(dtype), kl_estimator)
    return torch.where(mask, rewards, torch.zeros((), dtype=dtype))
