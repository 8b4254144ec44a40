"""Per-token estimators of KL(old || ref) from the log-probs of the sampled tokens (Schulman's k1, k2, k3).

With the log-ratio `x = old_logp - ref_logp` of a token sampled from the old policy:

    k1 = x                          unbiased, can be negative per token (the StePPO / verl default "kl")
    k2 = x^2 / 2                    biased, non-negative ("mse")
    k3 = exp(-x) - 1 + x            unbiased, non-negative, low variance ("low_var_kl")

Clamps:
- the log-ratio is clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP] = [-20, 20] before any estimator. This is this
  project's choice (the same bound its PPO ratio uses), not verl's: verl clamps the log-ratio only inside k3. It
  keeps one pathological token from making exp() overflow or dominating the penalty; k1 and k2 therefore differ
  from verl's on tokens whose |log-ratio| exceeds 20;
- k3 is then clamped to [-K3_CLAMP, K3_CLAMP] = [-10, 10] (k3 >= 0, so in effect an upper bound of 10), as verl
  does for its "low_var_kl".

All functions are elementwise, keep the input shape and compute in the inputs' floating dtype.
"""

from __future__ import annotations

import torch

__all__ = ["LOG_RATIO_CLAMP", "K3_CLAMP", "KL_ESTIMATORS", "kl_k1", "kl_k2", "kl_k3", "kl_penalty"]

LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0
KL_ESTIMATORS = ("k1", "k2", "k3")


def _clamped_log_ratio(old_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return (old_logp - ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def kl_k1(old_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = clamp(old_logp - ref_logp, -20, 20), same shape as the inputs (B, T)."""
    return _clamped_log_ratio(old_logp, ref_logp)


def kl_k2(old_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = clamp(old_logp - ref_logp, -20, 20)^2 / 2."""
    return 0.5 * _clamped_log_ratio(old_logp, ref_logp).square()


def kl_k3(old_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = clamp(exp(-x) - 1 + x, -10, 10) with x = clamp(old_logp - ref_logp, -20, 20)."""
    log_ratio = _clamped_log_ratio(old_logp, ref_logp)
    return (torch.exp(-log_ratio) - 1.0 + log_ratio).clamp(-K3_CLAMP, K3_CLAMP)


def kl_penalty(old_logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """The estimator named `estimator` ("k1", "k2" or "k3") of KL(old || ref) per token."""
    if estimator == "k1":
        return kl_k1(old_logp, ref_logp)
    if estimator == "k2":
        return kl_k2(old_logp, ref_logp)
    if estimator == "k3":
        return kl_k3(old_logp, ref_logp)
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
