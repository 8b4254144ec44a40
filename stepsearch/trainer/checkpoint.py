"""Atomic training checkpoints: models or DeepSpeed engines, optimisers, schedulers, RNG states and loop state.

Layout of `run_dir/checkpoints/step_XXXXXXXX/`:

    models/<name>.pt            state_dict of a plain nn.Module (torch.save; tied weights stay tied)
    <name>/ds/...               a DeepSpeed engine's own checkpoint (module, optimizer, scheduler; tag "ds")
    optimizers/<name>.pt        optimizer state_dict (optimisers owned by a DeepSpeed engine are skipped)
    schedulers/<name>.pt        LR scheduler state_dict (likewise)
    state_rank<RRRRR>.pt        each rank's `state` (step, data position, `capture_rng_state()` …), pickled
    COMPLETE                    JSON {"step", "time", "world_size"}, written last

A checkpoint is written into `step_XXXXXXXX.tmp-<pid>` (one process) or `step_XXXXXXXX.tmp` (torch.distributed
initialised: every rank must agree on the name, and DeepSpeed's collective save writes into it from all ranks),
every file is fsynced, the COMPLETE marker is written, and the directory is renamed into place, so a crash at any
moment leaves either the previous checkpoints or a stale temp directory that `find_latest_checkpoint` ignores and
the next save removes. Under torch.distributed all ranks call `save_checkpoint`/`load_checkpoint`; rank 0 writes the
shared files and renames; the run directory must be on a file system every rank sees.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsearch.trainer.ranks import barrier as _barrier
from stepsearch.trainer.ranks import is_distributed as _distributed
from stepsearch.trainer.ranks import rank as _rank
from stepsearch.trainer.ranks import world_size as _world_size

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
DEEPSPEED_TAG = "ds"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when available) every CUDA device's RNG state."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; CUDA states are restored for the devices present in both."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """`run_dir/checkpoints/step_XXXXXXXX` (the name `save_checkpoint` writes for `step`)."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (directories with a COMPLETE marker; temp dirs ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, models: dict[str, Any], optimizers: dict[str, Any],
                    schedulers: dict[str, Any], state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically, then keep only the `keep` most recent complete ones; returns its path.

    `models` maps names to nn.Modules or DeepSpeed engines (an engine saves its own optimizer and scheduler, so
    passing those again in `optimizers`/`schedulers` is harmless: they are skipped, as are None values).
    Collective under torch.distributed: every rank calls it with its own `state`.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    rank, world_size = _rank(), _world_size()
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    temp = root / (f"{final.name}.tmp" if _distributed() else f"{final.name}.tmp-{os.getpid()}")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp*"):
            shutil.rmtree(stale)
        (temp / "models").mkdir(parents=True)
        (temp / "optimizers").mkdir()
        (temp / "schedulers").mkdir()
    _barrier()

    engine_owned = _engine_owned_ids(models)
    for name, model in models.items():
        if _is_deepspeed_engine(model):
            model.save_checkpoint(str(temp / name), tag=DEEPSPEED_TAG, save_latest=False)
        elif rank == 0:
            torch.save(model.state_dict(), temp / "models" / f"{name}.pt")
    if rank == 0:
        for kind, objects in (("optimizers", optimizers), ("schedulers", schedulers)):
            for name, obj in objects.items():
                if obj is not None and id(obj) not in engine_owned:
                    torch.save(obj.state_dict(), temp / kind / f"{name}.pt")
    torch.save(state, temp / f"state_rank{rank:05d}.pt")
    _barrier()

    if rank == 0:
        _fsync_tree(temp)
        marker = {"step": step, "time": time.time(), "world_size": world_size}
        with open(temp / COMPLETE_MARKER, "w", encoding="utf-8") as handle:
            json.dump(marker, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(temp)
        _move_into_place(temp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def load_checkpoint(path: str | os.PathLike, *, models: dict[str, Any], optimizers: dict[str, Any],
                    schedulers: dict[str, Any]) -> dict[str, Any]:
    """Restore every named model/engine, optimizer and scheduler in place; returns this rank's saved `state`.

    The RNG states inside `state` are not applied here: the caller restores them (`restore_rng_state`) at the
    point of its loop where the uninterrupted run captured them. Collective under torch.distributed.
    """
    path = Path(path)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    engine_owned = _engine_owned_ids(models)
    for name, model in models.items():
        if _is_deepspeed_engine(model):
            load_path, _ = model.load_checkpoint(str(path / name), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
            if load_path is None:
                raise FileNotFoundError(f"{path / name}: DeepSpeed could not load the engine checkpoint '{name}'")
        else:
            model.load_state_dict(_load_tensors(path / "models" / f"{name}.pt", f"model '{name}'"))
    for kind, objects in (("optimizers", optimizers), ("schedulers", schedulers)):
        for name, obj in objects.items():
            if obj is not None and id(obj) not in engine_owned:
                obj.load_state_dict(_load_tensors(path / kind / f"{name}.pt", f"{kind[:-1]} '{name}'"))
    own = path / f"state_rank{_rank():05d}.pt"
    # a run resumed on more ranks than it was saved with starts the extra ranks from rank 0's state
    state_file = own if own.is_file() else path / "state_rank00000.pt"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path}: no loop state file ({own.name})")
    return torch.load(state_file, map_location="cpu", weights_only=False)


def save_hf_model(module: Any, tokenizer: Any, out_dir: str | os.PathLike, *,
                  state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Export an HF model (and tokenizer, if given) with `save_pretrained` into `out_dir`, replacing it atomically.

    `module` is an HF PreTrainedModel, a wrapper with `.module` (DDP), or a DeepSpeed engine. Under ZeRO-3 the
    parameters are partitioned, so the full state dict is assembled with the engine's
    `_zero3_consolidated_16bit_state_dict()` (a collective that gathers one layer at a time and returns the dict on
    rank 0 only, in the engine's dtype) and handed to `save_pretrained(state_dict=...)`; this needs no
    `stage3_gather_16bit_weights_on_model_save` setting. A `state_dict` given (full tensors, e.g. gathered from a
    partitioned module that is not itself a DeepSpeed engine) is written instead. Collective under
    torch.distributed: every rank calls it; rank 0 writes.
    """
    out = Path(out_dir)
    if state_dict is None and _is_deepspeed_engine(module) and module.zero_optimization_partition_weights():
        state_dict = module._zero3_consolidated_16bit_state_dict()
    unwrapped = module.module if _is_deepspeed_engine(module) else module
    if isinstance(unwrapped, torch.nn.parallel.DistributedDataParallel):
        unwrapped = unwrapped.module
    if not hasattr(unwrapped, "save_pretrained"):
        raise TypeError(f"save_hf_model needs an HF PreTrainedModel (or a wrapper of one), got {type(module).__name__}")
    if _rank() == 0:
        temp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        if temp.exists():
            shutil.rmtree(temp)
        unwrapped.save_pretrained(temp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(temp)
        _fsync_tree(temp)
        _move_into_place(temp, out)
    _barrier()
    return out


def _load_tensors(file: Path, what: str) -> Any:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: checkpoint has no {what} (saved under a different name?)")
    return torch.load(file, map_location="cpu", weights_only=True)


def _move_into_place(temp: Path, final: Path) -> None:
    """Rename `temp` to `final`; an existing `final` (the same step saved again) is moved aside first, then removed."""
    if final.exists():
        aside = final.with_name(f"{final.name}.tmp-replaced-{os.getpid()}")
        os.rename(final, aside)
        os.rename(temp, final)
        shutil.rmtree(aside)
    else:
        os.rename(temp, final)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (files written by other ranks included)."""
    for directory, _, files in os.walk(root):
        for name in files:
            descriptor = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        _fsync_dir(Path(directory))


def _fsync_dir(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _is_deepspeed_engine(model: Any) -> bool:
    return hasattr(model, "save_checkpoint") and hasattr(model, "module") and hasattr(model, "load_checkpoint")


def _engine_owned_ids(models: dict[str, Any]) -> set[int]:
    """ids of the optimizers and schedulers that DeepSpeed engines among `models` checkpoint themselves."""
    owned = set()
    for model in models.values():
        if _is_deepspeed_engine(model):
            for attribute in ("optimizer", "lr_scheduler", "client_optimizer", "client_lr_scheduler"):
                obj = getattr(model, attribute, None)
                if obj is not None:
                    owned.add(id(obj))
                    # ZeRO wraps the client optimizer; the wrapped one is reachable as .optimizer
                    inner = getattr(obj, "optimizer", None)
                    if inner is not None:
                        owned.add(id(inner))
    return owned
