"""Which process this is: rank, world size, barrier and sum over ranks, the same calls with or without a process group.

Every module that needs to know whether torch.distributed runs asks here (the trainer, the engines, checkpoints),
so "one process" is one rule: no initialised process group means rank 0 of a world of 1, where `barrier` and
`all_reduce_sum` do nothing. `init_process_group` starts the group under a launcher (deepspeed, torchrun).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from stepsearch.config import DeepSpeedConfig


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in one process)."""
    if is_distributed() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def gather_objects(obj: object) -> list:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` in one process."""
    if world_size() == 1:
        return [obj]
    gathered: list = [None] * world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def use_deepspeed(ds_cfg: "DeepSpeedConfig") -> bool:
    """`on`, or `auto` under a launcher (WORLD_SIZE is set by deepspeed/torchrun)."""
    if ds_cfg.enabled == "on":
        return True
    return ds_cfg.enabled == "auto" and "WORLD_SIZE" in os.environ


def init_process_group(timeout_minutes: int = 60) -> tuple[int, int, int]:
    """Start the process group (NCCL on GPUs, gloo on CPU) with a `timeout_minutes` limit on every collective;
    returns (rank, local_rank, world_size)."""
    import datetime

    import deepspeed

    if not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank(), local_rank, world_size()
