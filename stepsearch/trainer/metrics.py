"""Per-step metric log: one JSONL row per step, TensorBoard scalars, optional Weights & Biases.

`StepMetrics` collects one step's scalars as the stages produce them (repeated names average).

`MetricsLogger.log(step, metrics)` takes Python numbers and 0-d tensors (possibly on GPU) and resolves all the tensors
with one host sync per call, so the trainer can hand over device-side statistics without a `.item()` per metric.
Rows go to `run_dir/metrics.jsonl` as `{"step": step, <keys sorted>}`, flushed per row; non-finite values are
written as `null` (the file stays valid JSON) and left out of TensorBoard. On resume from step N, rows with step > N
are dropped from the file first, so a resumed run's file equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from stepsearch.trainer.run_dir import RunDir, truncate_jsonl

_WANDB_ID_FILE = "wandb_run_id.txt"


class StepMetrics:
    """Scalars of one step, kept as they come (0-d device tensors are not synchronised); repeated names average.
    The logger resolves every tensor of the row with one device-to-host transfer."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: Any) -> None:
        value = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else float(value)
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def update(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            self.add(name, value)

    def means(self) -> dict[str, Any]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}


class MetricsLogger:
    """Writes one row of scalars per step to JSONL, TensorBoard and (optionally) wandb; only on the main rank.

    `resume_step=None` starts a fresh `metrics.jsonl` (an existing one is replaced); `resume_step=N` keeps the rows
    with step <= N and appends after them (TensorBoard events after N are purged the same way).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        is_main: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.path = RunDir(self.run_dir).metrics
        self._file = None
        self._tb_writer = None
        self._wandb_run = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self._file = open(self.path, "w", encoding="utf-8")
        else:
            self._truncate_after(resume_step)
            self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._tb_writer = _open_tensorboard(RunDir(self.run_dir).tensorboard, resume_step)
        if wandb_project is not None:
            self._wandb_run = _open_wandb(self.run_dir, wandb_project, resumed=resume_step is not None)

    def _truncate_after(self, resume_step: int) -> None:
        """Drop rows with step > resume_step (and a torn last line), replacing the file atomically."""
        truncate_jsonl(self.path, "metrics", lambda row: row["step"] <= resume_step)

    def log(self, step: int, metrics: dict[str, float | int | torch.Tensor]) -> dict[str, float | int | None]:
        """Write one row; returns it as Python numbers (None for non-finite) on the main rank, {} elsewhere.

        Tensor values must hold one element; they are resolved with one device-to-host copy per device.
        """
        if not self.is_main:
            return {}
        if "step" in metrics:
            raise ValueError("metrics must not contain the key 'step' (it is the row's index, passed separately)")
        row = _resolve(metrics)
        line = json.dumps({"step": int(step), **{key: row[key] for key in sorted(row)}}, allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()
        if self._tb_writer is not None:
            for key, value in row.items():
                if value is not None:
                    self._tb_writer.add_scalar(key, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log({key: value for key, value in row.items() if value is not None}, step=step)
        return row

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _resolve(metrics: dict[str, Any]) -> dict[str, float | int | None]:
    """Python numbers for every value; all tensors on one device come back in one stacked `.tolist()`."""
    row: dict[str, float | int | None] = {}
    tensors_by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be strings, got {key!r}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"metric {key!r}: expected a one-element tensor, got shape {tuple(value.shape)}")
            tensors_by_device.setdefault(value.device, []).append((key, value))
        elif isinstance(value, bool) or value is None:
            row[key] = None if value is None else int(value)
        elif isinstance(value, numbers.Integral):
            row[key] = int(value)
        elif isinstance(value, numbers.Real):
            row[key] = float(value)
        else:
            raise TypeError(f"metric {key!r}: expected a number or a one-element tensor, got {type(value).__name__}")
    for entries in tensors_by_device.values():
        # float64 keeps integer counts (tokens, turns) exact up to 2**53
        stacked = torch.stack([tensor.detach().reshape(()).to(torch.float64) for _, tensor in entries])
        for (key, tensor), value in zip(entries, stacked.tolist()):
            integral = not (tensor.dtype.is_floating_point or tensor.dtype.is_complex)
            row[key] = int(value) if integral else value
    return {key: value if value is None or math.isfinite(value) else None for key, value in row.items()}


_warned_no_tensorboard = False


def _open_tensorboard(log_dir: Path, resume_step: int | None) -> Any:
    """A SummaryWriter, or None with a one-time warning when tensorboard is not installed."""
    global _warned_no_tensorboard
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        if not _warned_no_tensorboard:
            warnings.warn(
                f"TensorBoard logging is off: {exc}. Install it with `pip install tensorboard` or set "
                "trainer.tensorboard=false; metrics.jsonl is still written.",
                stacklevel=3,
            )
            _warned_no_tensorboard = True
        return None
    # purge_step hides events logged after the checkpoint by the interrupted run
    return SummaryWriter(log_dir=str(log_dir), purge_step=None if resume_step is None else resume_step + 1)


def _open_wandb(run_dir: Path, project: str, resumed: bool) -> Any:
    """A wandb run whose id is kept in the run dir, so a resumed training continues the same wandb run."""
    try:
        import wandb
    except ImportError as exc:
        raise ImportError(
            "trainer.wandb_project is set but wandb is not installed: `pip install wandb`, "
            "or set trainer.wandb_project=null"
        ) from exc
    id_file = run_dir / _WANDB_ID_FILE
    if resumed and id_file.exists():
        run_id = id_file.read_text(encoding="utf-8").strip()
    else:
        run_id = wandb.util.generate_id()
        id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(project=project, name=run_dir.name, id=run_id, dir=str(run_dir), resume="allow")
