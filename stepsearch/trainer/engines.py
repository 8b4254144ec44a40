"""Actor and critic optimisers behind one engine interface: DeepSpeed ZeRO-3 under a launcher, AdamW in one process.

Both engines have one interface, so the trainer loop is the same code in both worlds:

    engine(*args)              forward of the wrapped module
    engine.backward(loss)      `loss` already has *sum* semantics over the mini-batch and all ranks (the PPO loss is
                               normalised by the global token count), so gradients add up to the mini-batch gradient
    engine.step()              clip, optimiser step, LR-scheduler step, zero the gradients
    engine.discard_gradients() drop the accumulated gradients without stepping (a skipped update)
    engine.checkpoint_items()  (model, optimizer, scheduler) for `stepsearch.trainer.checkpoint`: a DeepSpeed
                               engine saves its own optimiser and scheduler, so it is (engine, None, None)

DeepSpeed (`DeepSpeedTrainEngine`): the config is built in code from our `PPOConfig`/`DeepSpeedConfig` (ZeRO stage,
CPU offload, bf16 on GPU / fp32 on CPU, gradient clipping, torch's AdamW unless `deepspeed.optimizer: fused`,
linear warm-up) and a user JSON (`deepspeed.config_path`) overrides any key. Gradient accumulation is ours, not
DeepSpeed's: the DeepSpeed config has `gradient_accumulation_steps = 1` and we call `backward` once per micro-batch
and `step` once per mini-batch; ZeRO accumulates into its partitioned gradients between optimiser steps. ZeRO
averages gradients over the data-parallel ranks, so `backward` multiplies the loss by the world size to keep the sum
semantics. The reference model runs under ZeRO-3 inference (`deepspeed.initialize` without optimiser).

Weight sync: `gathered_named_parameters` gathers the ZeRO-3 partitions a few tensors at a time
(`GatheredParameters`) and yields full tensors, which the rollout engine loads with `update_weights`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stepsearch.config import ConfigError
from stepsearch.trainer.ranks import world_size

if TYPE_CHECKING:
    from stepsearch.config import Config, DeepSpeedConfig


# ----------------------------------------------------------------------------------------------------------------
# learning-rate schedule


def warmup_factor(warmup_steps: int):
    """Linear warm-up from 1/(warmup+1) of the LR to the full LR, then constant."""

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / (warmup_steps + 1)) if warmup_steps > 0 else 1.0

    return factor


# ----------------------------------------------------------------------------------------------------------------
# one-process engine


class LocalTrainEngine:
    """torch AdamW + LambdaLR warm-up + global-norm clipping; the one-process path without DeepSpeed.

    A module with 16-bit trainable parameters is trained with fp32 parameters (converted here) and its forward
    passes run under autocast to that 16-bit dtype: AdamW on bf16 parameters drops every update below bf16's
    resolution (about 0.4% of a weight; at the paper's learning rate 7e-7, all of them).
    """

    def __init__(self, module: nn.Module, lr: float, weight_decay: float, warmup_steps: int, grad_clip: float) -> None:
        low = sorted({p.dtype for p in module.parameters() if p.requires_grad and p.dtype != torch.float32}, key=str)
        self.autocast_dtype = (torch.bfloat16 if torch.bfloat16 in low else low[0]) if low else None
        if low:
            module.float()
        self.module = module
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.AdamW(
            [p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_factor(warmup_steps))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.autocast_dtype is None:
            return self.module(*args, **kwargs)
        device_type = next(self.module.parameters()).device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype):
            return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Optimiser step; returns the pre-clip global gradient norm (a device tensor: no host sync)."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def checkpoint_items(self) -> tuple[nn.Module, Any, Any]:
        return self.module, self.optimizer, self.scheduler


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def deepspeed_config(cfg: "Config", *, lr: float, train: bool, on_gpu: bool, dp_size: int) -> dict:
    """The DeepSpeed JSON built from our config (overridden by `deepspeed.config_path` when given)."""
    ds = cfg.deepspeed
    offload_device = "cpu" if on_gpu else "none"  # offloading is a GPU-memory feature; on CPU it is a no-op
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": on_gpu,
        "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": True,
        "offload_param": {"device": offload_device if ds.offload_params and ds.zero_stage == 3 else "none"},
    }
    if train:
        zero["offload_optimizer"] = {"device": offload_device if ds.offload_optimizer else "none"}
    # An explicit bfloat16 holds on CPU too (ZeRO-3 would otherwise build the models in fp32 there)
    bf16 = cfg.model.dtype == "bfloat16" or (on_gpu and cfg.model.dtype == "auto")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.ppo.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.ppo.micro_batch_size * dp_size,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train:
        config["gradient_clipping"] = cfg.ppo.grad_clip
        config["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": cfg.ppo.weight_decay,
                "torch_adam": ds.optimizer == "torch" or not on_gpu,
            },
        }
        config["zero_allow_untested_optimizer"] = True
        config["zero_force_ds_cpu_optimizer"] = False
    if ds.config_path:
        path = Path(ds.config_path)
        try:
            user = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"deepspeed.config_path={ds.config_path}: cannot read a DeepSpeed JSON: {exc}") from None
        if not train:  # the reference has no optimiser: keep only what applies to inference
            user = {k: v for k, v in user.items() if k not in ("optimizer", "scheduler", "gradient_clipping")}
        config = _merge(config, user)
    return config


def check_optimizer(ds_cfg: "DeepSpeedConfig", on_gpu: bool) -> None:
    """`deepspeed.optimizer: fused` uses DeepSpeed's FusedAdam (or its CPU Adam with `offload_optimizer`), which is
    compiled at the first step unless DeepSpeed was installed with it prebuilt: check now that it can be, and say
    what is missing, instead of failing after the models are loaded. torch's AdamW (the default) needs nothing."""
    if ds_cfg.optimizer != "fused" or not on_gpu:
        return
    import shutil

    from deepspeed.ops.op_builder import CPUAdamBuilder, FusedAdamBuilder
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    builder = CPUAdamBuilder() if ds_cfg.offload_optimizer else FusedAdamBuilder()
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:  # a source checkout of DeepSpeed has no build record
        installed_ops = {}
    if installed_ops.get(builder.NAME):
        return
    missing = []
    if not ds_cfg.offload_optimizer and (CUDA_HOME is None or shutil.which("nvcc", path=f"{CUDA_HOME}/bin") is None):
        missing.append("nvcc (CUDA_HOME)")
    if shutil.which("c++") is None:
        missing.append("a C++ compiler")
    if not is_ninja_available():
        missing.append("ninja")
    if missing:
        raise ConfigError(
            f"deepspeed.optimizer=fused: DeepSpeed's {builder.NAME} is not prebuilt and cannot be "
            f"compiled here (missing: {', '.join(missing)}); use deepspeed.optimizer=torch"
        )


class DeepSpeedTrainEngine:
    """A ZeRO engine behind the `LocalTrainEngine` interface (module docstring)."""

    def __init__(self, module: nn.Module, config: dict, warmup_steps: int) -> None:
        import deepspeed

        self.world_size = world_size()
        self.engine, _, _, _ = deepspeed.initialize(
            model=module,
            model_parameters=[p for p in module.parameters() if p.requires_grad],
            config=config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(warmup_steps)),
        )
        self.module = self.engine.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> torch.Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)

    def discard_gradients(self) -> None:
        self.engine.optimizer.zero_grad()

    def checkpoint_items(self) -> tuple[Any, None, None]:
        return self.engine, None, None


class DeepSpeedInferenceEngine:
    """The frozen reference under ZeRO-3 inference: parameters sharded, gathered layer by layer in forward."""

    def __init__(self, module: nn.Module, config: dict) -> None:
        import deepspeed

        self.engine, *_ = deepspeed.initialize(model=module, config=config)
        self.engine.eval()
        self.module = self.engine.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*args, **kwargs)


def gathered_named_parameters(module: nn.Module, group_size: int = 32) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (gathered) parameters of a ZeRO-3 module, `group_size` tensors at a time; plain ones as they are.

    Every rank must iterate (gathering is collective); the yielded tensors are copies, valid after the gather ends.
    """
    named = list(module.named_parameters())
    if not any(hasattr(p, "ds_id") for _, p in named):
        yield from ((name, p.detach()) for name, p in named)
        return
    import deepspeed

    for start in range(0, len(named), group_size):
        group = named[start : start + group_size]
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            copies = [(name, p.detach().clone()) for name, p in group]
        yield from copies
