"""The one switch between the Triton kernels (`stepsearch.kernels`) and their pure-torch twins (`stepsearch.algo`).

The trainer calls `configure(config.kernels.impl)` once and then only the functions here:

    impl = "auto"    Triton for CUDA tensors when triton imports, the torch twin otherwise (CPU runs, no triton)
    impl = "triton"  always the kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); fails loudly else
    impl = "torch"   always the twins

The environment variable STEPSEARCH_KERNELS (same three values) overrides `configure`, for A/B runs without editing
a config. Twins and kernels have the same signatures and semantics (tests pin them to each other), so switching
never changes results beyond fp32 rounding. Kernel modules are imported inside the functions, only when a call runs
the Triton path: importing this module needs neither triton nor a GPU.

`scatter_rewards` alone has no kernel (the hot path is the fused `scatter_rewards_and_gae`, which can also return
the rewards); it always runs the twin, a handful of vectorised torch ops. `masked_whiten`, `explained_variance` and
`loss_normalizers` are cheap reductions and are re-exported from the twins for one import site.
"""

from __future__ import annotations

import functools
import os

import torch

from stepsearch.algo import gae as gae_twin
from stepsearch.algo import logprob as logprob_twin
from stepsearch.algo import ppo_loss as ppo_loss_twin
from stepsearch.algo.gae import RewardsAndGAE, masked_whiten
from stepsearch.algo.ppo_loss import PPOLossOutput, explained_variance, loss_normalizers
from stepsearch.algo.scatter import scatter_rewards

__all__ = [
    "IMPLS",
    "configure",
    "current_impl",
    "backend_for",
    "scatter_rewards",
    "compute_gae",
    "scatter_rewards_and_gae",
    "ppo_loss",
    "policy_loss",
    "value_loss",
    "logprob_entropy",
    "masked_whiten",
    "explained_variance",
    "loss_normalizers",
    "PPOLossOutput",
    "RewardsAndGAE",
]

IMPLS = ("auto", "triton", "torch")
ENV_VAR = "STEPSEARCH_KERNELS"
_configured = "auto"


def _check_impl(impl: str, source: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{source}: kernel implementation must be one of {IMPLS}, got {impl!r}")
    return impl


def configure(impl: str) -> None:
    """Choose the implementation once (from `kernels.impl` in the config); STEPSEARCH_KERNELS still wins."""
    global _configured
    _configured = _check_impl(impl, "kernels.impl")


def current_impl() -> str:
    """The implementation in force: STEPSEARCH_KERNELS if set, else what `configure` was given ("auto" default)."""
    forced = os.environ.get(ENV_VAR)
    return _check_impl(forced, f"environment variable {ENV_VAR}") if forced else _configured


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(tensor: torch.Tensor) -> str:
    """"triton" or "torch": which implementation a call on `tensor` runs (for logging and tests)."""
    impl = current_impl()
    if impl == "torch":
        return "torch"
    if impl == "triton":
        if not _triton_importable():
            raise RuntimeError("kernels.impl is 'triton' but triton cannot be imported; install the [kernels] "
                               "extra or set kernels.impl to 'auto' or 'torch'")
        if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"kernels.impl is 'triton' but the tensors are on {tensor.device}; the kernels need "
                               "CUDA tensors (or TRITON_INTERPRET=1 for CPU debugging). Use 'auto' on CPU.")
        return "triton"
    return "triton" if tensor.device.type == "cuda" and _triton_importable() else "torch"


def compute_gae(
    token_rewards: torch.Tensor, values: torch.Tensor, loss_mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T); see `stepsearch.algo.gae.compute_gae`."""
    implementation = gae_twin
    if backend_for(values) == "triton":
        from stepsearch.kernels import gae as implementation
    return implementation.compute_gae(token_rewards, values, loss_mask, gamma, lam)


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
    """Rewards placed + KL penalty + GAE -> (advantages, returns, token_rewards or None); see the twin."""
    implementation = gae_twin
    if backend_for(values) == "triton":
        from stepsearch.kernels import gae as implementation
    return implementation.scatter_rewards_and_gae(
        outcome, step_scores, step_ends, old_logp, ref_logp, values, loss_mask, kl_coef, gamma, lam,
        kl_estimator, return_rewards,
    )


def ppo_loss(
    logp, old_logp, advantages, values, old_values, returns, loss_mask, entropy=None, *, clip_ratio: float,
    dual_clip: float | None = None, value_clip: float, vf_coef: float, entropy_coef: float,
    loss_agg_mode: str = "token-mean", global_token_count=None, global_seq_count=None,
) -> PPOLossOutput:
    """PPO loss and diagnostics; see `stepsearch.algo.ppo_loss.ppo_loss` (values=None: actor only, logp=None:
    critic only)."""
    implementation = ppo_loss_twin
    if backend_for(loss_mask) == "triton":
        from stepsearch.kernels import ppo_loss as implementation
    return implementation.ppo_loss(
        logp, old_logp, advantages, values, old_values, returns, loss_mask, entropy, clip_ratio=clip_ratio,
        dual_clip=dual_clip, value_clip=value_clip, vf_coef=vf_coef, entropy_coef=entropy_coef,
        loss_agg_mode=loss_agg_mode, global_token_count=global_token_count, global_seq_count=global_seq_count,
    )


def policy_loss(logp, old_logp, advantages, loss_mask, entropy=None, *, clip_ratio: float,
                dual_clip: float | None = None, entropy_coef: float = 0.0, loss_agg_mode: str = "token-mean",
                global_token_count=None, global_seq_count=None) -> PPOLossOutput:
    """Actor part of `ppo_loss` (value fields are 0)."""
    return ppo_loss(logp, old_logp, advantages, None, None, None, loss_mask, entropy, clip_ratio=clip_ratio,
                    dual_clip=dual_clip, value_clip=1.0, vf_coef=0.0, entropy_coef=entropy_coef,
                    loss_agg_mode=loss_agg_mode, global_token_count=global_token_count,
                    global_seq_count=global_seq_count)


def value_loss(values, old_values, returns, loss_mask, *, value_clip: float, vf_coef: float = 1.0,
               loss_agg_mode: str = "token-mean", global_token_count=None, global_seq_count=None) -> PPOLossOutput:
    """Critic part of `ppo_loss` (`loss` = vf_coef * value_loss; policy fields are 0)."""
    return ppo_loss(None, None, None, values, old_values, returns, loss_mask, None, clip_ratio=1.0,
                    value_clip=value_clip, vf_coef=vf_coef, entropy_coef=0.0, loss_agg_mode=loss_agg_mode,
                    global_token_count=global_token_count, global_seq_count=global_seq_count)


def logprob_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (N,), entropy (N,)) of `targets` (N,) under softmax(hidden (N, H) @ weight (V, H).T / temperature),
    never building the (N, V) logits; see `stepsearch.algo.logprob.logprob_entropy`."""
    implementation = logprob_twin
    if backend_for(hidden) == "triton":
        from stepsearch.kernels import logprob as implementation
    return implementation.logprob_entropy(
        hidden, weight, targets, chunk_size=chunk_size, temperature=temperature
    )
