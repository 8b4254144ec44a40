"""Atomic training checkpoints: models or DeepSpeed engines, optimisers, schedulers, RNG states and loop state.

Layout of `run_dir/checkpoints/step_XXXXXXXX/`:

    models/<name>.pt            state_dict of a plain nn.Module (torch.save; tied weights stay tied)
    <name>/ds/...               a DeepSpeed engine's own checkpoint (module, optimizer, scheduler; tag "ds")
    optimizers/<name>.pt        optimizer state_dict (optimisers owned by a DeepSpeed engine are skipped)
    schedulers/<name>.pt        LR scheduler state_dict (likewise)
    state_rank<RRRRR>.pt        each rank's `state` (step, data position, `capture_rng_state()` …): tensors and
                                plain Python data only
    COMPLETE                    JSON {"step", "time", "world_size", "files": {relative path: {"bytes", "sha256"}}},
                                written last: the marker is also the manifest of every other file

Every file is read back data-only: `torch.load(weights_only=True)`, also inside DeepSpeed's loader (which asks for
full unpickling; TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides it, and the few plain-data classes DeepSpeed pickles into
its optimizer states are allowed by name). A checkpoint holding anything else (a pickled callable) is refused with
an error naming the file, so a checkpoint from elsewhere cannot run code.

Before a checkpoint is used, every file is checked against the manifest (size, then SHA-256): flipped bytes,
truncation and empty files are named with the file and what is wrong. `find_latest_checkpoint` skips a damaged
checkpoint with a warning and falls back to the previous complete one; when none is usable it raises one
`CheckpointError`. A failed write (disk full: "no space left writing <file>") removes the partial checkpoint,
keeps the previous ones, and raises `CheckpointError`.

A checkpoint is written into `step_XXXXXXXX.tmp-<pid>` (one process) or `step_XXXXXXXX.tmp` (torch.distributed
initialised: every rank must agree on the name, and DeepSpeed's collective save writes into it from all ranks),
every file is fsynced, the COMPLETE marker is written, and the directory is renamed into place, so a crash at any
moment leaves either the previous checkpoints or a stale temp directory that `find_latest_checkpoint` ignores and
the next save removes. Under torch.distributed all ranks call `save_checkpoint`/`load_checkpoint`; rank 0 writes the
shared files and renames; the run directory must be on a file system every rank sees.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from stepsearch.errors import UserError
from stepsearch.trainer.ranks import barrier as _barrier
from stepsearch.trainer.ranks import is_distributed as _distributed
from stepsearch.trainer.ranks import rank as _rank
from stepsearch.trainer.ranks import world_size as _world_size

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
DEEPSPEED_TAG = "ds"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_HASH_CHUNK = 8 << 20
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"

log = logging.getLogger("stepsearch.checkpoint")


class CheckpointError(UserError):
    """A checkpoint that cannot be written or used; the message names the file and what is wrong."""


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when available) every CUDA device's RNG state, as tensors and plain data."""
    name, key, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; CUDA states are restored for the devices present in both."""
    random.setstate(state["python"])
    name, key, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.int64).astype(np.uint32), position, has_gauss,
                         cached_gaussian))
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
    """The newest complete checkpoint whose files match the manifest, or None when the run has no checkpoint.

    A damaged checkpoint is reported (file and problem) and the previous complete one is tried; `CheckpointError`
    lists every problem when no complete checkpoint is usable. Collective under torch.distributed (rank 0 reads the
    files, every rank gets its verdict).
    """
    problems = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = _shared_verdict(path)
        if problem is None:
            if problems:
                log.warning("falling back to checkpoint %s, the newest usable one", path)
            return path
        log.warning("checkpoint %s is unusable: %s", path, problem)
        problems.append(problem)
    if problems:
        raise CheckpointError(f"no usable checkpoint in {Path(run_dir) / CHECKPOINTS_DIR}: {'; '.join(problems)}")
    return None


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every file of a complete checkpoint against its manifest; `CheckpointError` names the first bad one."""
    problem = _problem(Path(path))
    if problem is not None:
        raise CheckpointError(problem)


def _problem(path: Path) -> str | None:
    """What is wrong with checkpoint `path` ("<file>: <problem>"), or None when every file matches the manifest."""
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)"
    identity = _identity(marker)
    if _VERIFIED.get(path.resolve()) == identity:
        return None
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
        files = content.get("files") if isinstance(content, dict) else None
        if files is None and isinstance(content, dict) and "step" in content:
            log.warning("checkpoint %s has no file checksums (written before they were recorded): not verified", path)
            return None
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                for e in files.values()):
            raise ValueError("expected a JSON object with 'files': {path: {bytes, sha256}}")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"{marker}: unreadable manifest ({err})"
    for relative, expected in sorted(files.items()):
        file = path / relative
        if not file.is_file():
            return f"{file}: missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            what = "empty" if size == 0 else "truncated" if size < expected["bytes"] else "too long"
            return f"{file}: {what} ({size} bytes, the manifest says {expected['bytes']})"
    digests = _sha256_many([path / relative for relative in sorted(files)])
    for relative, digest in zip(sorted(files), digests):
        if digest != files[relative]["sha256"]:
            return f"{path / relative}: damaged (its SHA-256 differs from the manifest's)"
    _VERIFIED[path.resolve()] = identity
    return None


# Checkpoints verified in this process, by the identity of their marker: `find_latest_checkpoint` has just read
# every file, and `load_checkpoint` of the same checkpoint need not hash gigabytes again.
_VERIFIED: dict[Path, tuple[int, int, int]] = {}


def _identity(marker: Path) -> tuple[int, int, int]:
    stat = marker.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _shared_verdict(path: Path) -> str | None:
    """`_problem(path)` computed by rank 0 and given to every rank."""
    if not _distributed():
        return _problem(path)
    verdict = [_problem(path) if _rank() == 0 else None]
    torch.distributed.broadcast_object_list(verdict, src=0)
    return verdict[0]


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_many(files: list[Path]) -> list[str]:
    """SHA-256 of each file; hashlib releases the GIL on large buffers, so threads hash files in parallel."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(files), 1))) as pool:
        return list(pool.map(_sha256, files))


def _manifest(root: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under `root` (the files of every rank)."""
    files = sorted(Path(directory, name) for directory, _, names in os.walk(root) for name in names)
    digests = _sha256_many(files)
    return {file.relative_to(root).as_posix(): {"bytes": file.stat().st_size, "sha256": digest}
            for file, digest in zip(files, digests)}


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
        with _writing(temp):
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob("step_*.tmp*"):
                shutil.rmtree(stale)
            (temp / "models").mkdir(parents=True)
            (temp / "optimizers").mkdir()
            (temp / "schedulers").mkdir()
    _barrier()

    try:
        _write_files(temp, rank, models, optimizers, schedulers, state)
        _barrier()
        if rank == 0:
            with _writing(temp):
                _fsync_tree(temp)
            marker = {"step": step, "time": time.time(), "world_size": world_size, "files": _manifest(temp)}
            with _writing(temp / COMPLETE_MARKER), open(temp / COMPLETE_MARKER, "w", encoding="utf-8") as handle:
                json.dump(marker, handle)
                handle.flush()
                os.fsync(handle.fileno())
            with _writing(final):
                _fsync_dir(temp)
                _move_into_place(temp, final)
                _fsync_dir(root)
    except BaseException:
        if rank == 0 and temp.exists():  # frees the space a full disk needs; the previous checkpoints stay
            shutil.rmtree(temp)
        raise
    if rank == 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def _write_files(temp: Path, rank: int, models: dict[str, Any], optimizers: dict[str, Any],
                 schedulers: dict[str, Any], state: dict[str, Any]) -> None:
    """This rank's share of a checkpoint: engines write their own shards, rank 0 the shared files."""
    engine_owned = _engine_owned_ids(models)
    for name, model in models.items():
        if _is_deepspeed_engine(model):
            target = temp / name
            try:
                model.save_checkpoint(str(target), tag=DEEPSPEED_TAG, save_latest=False)
            except RuntimeError as err:  # torch.save to a path reports a failed write as "unexpected pos ..."
                free = shutil.disk_usage(temp).free >> 20
                raise CheckpointError(f"writing {target} failed ({free} MiB free on its file system): {err}") from err
            except OSError as err:
                raise _write_error(target, err) from err
        elif rank == 0:
            _save_file(model.state_dict(), temp / "models" / f"{name}.pt")
    if rank == 0:
        for kind, objects in (("optimizers", optimizers), ("schedulers", schedulers)):
            for name, obj in objects.items():
                if obj is not None and id(obj) not in engine_owned:
                    _save_file(obj.state_dict(), temp / kind / f"{name}.pt")
    _save_file(state, temp / f"state_rank{rank:05d}.pt")


def _save_file(obj: Any, file: Path) -> None:
    """torch.save through a Python file object, so a failed write raises OSError with its errno (a path would
    give torch's "unexpected pos" instead)."""
    with _writing(file), open(file, "wb") as handle:
        torch.save(obj, handle)


@contextlib.contextmanager
def _writing(target: Path) -> Iterator[None]:
    """Turn an OSError while writing `target` into a CheckpointError naming it."""
    try:
        yield
    except OSError as err:
        raise _write_error(target, err) from err


def _write_error(target: Path, err: OSError) -> CheckpointError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return CheckpointError(f"no space left writing {target}")
    return CheckpointError(f"cannot write {target}: {err.strerror or err}")


def load_checkpoint(path: str | os.PathLike, *, models: dict[str, Any], optimizers: dict[str, Any],
                    schedulers: dict[str, Any]) -> dict[str, Any]:
    """Restore every named model/engine, optimizer and scheduler in place; returns this rank's saved `state`.

    The RNG states inside `state` are not applied here: the caller restores them (`restore_rng_state`) at the
    point of its loop where the uninterrupted run captured them. Collective under torch.distributed.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    problem = _shared_verdict(path)
    if problem is not None:
        raise CheckpointError(problem)
    engine_owned = _engine_owned_ids(models)
    for name, model in models.items():
        if _is_deepspeed_engine(model):
            with _data_only_deepspeed_loads(path / name):
                load_path, _ = model.load_checkpoint(str(path / name), tag=DEEPSPEED_TAG,
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
            if load_path is None:
                raise CheckpointError(f"{path / name}: DeepSpeed could not load the engine checkpoint '{name}'")
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
        raise CheckpointError(f"{path}: no loop state file ({own.name})")
    return _load_data(state_file)


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
        raise CheckpointError(f"{file}: checkpoint has no {what} (saved under a different name?)")
    return _load_data(file)


def _load_data(file: Path) -> Any:
    """torch.load of tensors and plain data only; anything else (a pickled callable) is refused, never run."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{file}: refused: it holds more than tensors and plain data "
                              f"({_refusal_reason(err)})") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{file}: unreadable ({type(err).__name__}: {err})") from err


_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _refusal_reason(err: pickle.UnpicklingError) -> str:
    """The object torch's weights-only unpickler refused (its message goes on to advise allowlisting it: we don't)."""
    found = _UNSUPPORTED_GLOBAL.search(str(err))
    if found:
        return f"the pickled global {found.group(1)}"
    lines = [line.strip() for line in str(err).splitlines() if "WeightsUnpickler error" in line]
    return lines[0] if lines else type(err).__name__


@contextlib.contextmanager
def _data_only_deepspeed_loads(engine_dir: Path) -> Iterator[None]:
    """Make DeepSpeed's `torch.load(..., weights_only=False)` calls data-only while an engine loads."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals([DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]):
            yield
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{engine_dir}: refused: it holds more than tensors and plain data "
                              f"({_refusal_reason(err)})") from err
    finally:
        if previous is None:
            del os.environ[_FORCE_WEIGHTS_ONLY]
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


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
