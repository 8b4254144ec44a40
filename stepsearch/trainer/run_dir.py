"""The run directory: where each artefact of a training run lives, and the one reader (and writer) of each.

    <trainer.output_dir>/<trainer.run_name>/
        config.yaml          the resolved config (`stepsearch.config.save_config`)
        metrics.jsonl        one row per step: {"step": N, <metric>: number | null, ...}     `read_metrics`
        trajectories.jsonl   a few sampled trajectories per step: {"step": N, <reward details>}  `read_trajectories`
        tensorboard/         TensorBoard events
        checkpoints/         atomic checkpoints (`stepsearch.trainer.checkpoint`)
        world/               the synthetic world and its index (the tiny default)
        tokenizer/           the tokenizer trained for the tiny model
        warm_start/          the warm-started initial policy (HF checkpoint)
        initial_policy/      the tiny model's initial policy when there is no warm start (HF checkpoint)
        eval_<which>/        results.json (+ results.md, trajectories/) of an evaluation         `read_eval`
        final/               the trained actor (HF checkpoint)
        report/              index.html and metrics.png (`stepsearch.trainer.report`)

JSONL files are appended a row at a time, so a crash can leave the last line torn. Every reader here applies the
same rule: a last line without its newline that does not parse is a torn write and is ignored; any other malformed
line is a ValueError naming the file and line. On resume `truncate_jsonl` rewrites a file atomically without the
rows after the checkpoint's step and without a torn last line, so appending continues from a clean line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from stepsearch.trainer.checkpoint import CHECKPOINTS_DIR


class RunDir:
    """Typed paths of one run directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.jsonl"
        self.trajectories = self.root / "trajectories.jsonl"
        self.tensorboard = self.root / "tensorboard"
        self.checkpoints = self.root / CHECKPOINTS_DIR
        self.world = self.root / "world"
        self.tokenizer = self.root / "tokenizer"
        self.warm_start = self.root / "warm_start"
        self.initial_policy = self.root / "initial_policy"
        self.final = self.root / "final"
        self.report = self.root / "report"

    @property
    def timings(self) -> Path:
        return self.root / "timings.json"

    def eval_dir(self, which: str) -> Path:
        """`eval_<which>/`: `which` is "before", "after" or "step<N>"."""
        return self.root / f"eval_{which}"

    def eval_results(self, which: str) -> Path:
        return self.eval_dir(which) / "results.json"


def _run_dir(path: str | os.PathLike) -> RunDir:
    return path if isinstance(path, RunDir) else RunDir(Path(path))


# ---------------------------------------------------------------------------------------------------------------
# JSONL: one reader for every row file


def read_jsonl(path: str | os.PathLike, what: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, their raw lines ending in a newline) of a row file whose rows are objects with an integer "step".

    A torn last line (no newline, does not parse) is left out; any other malformed line raises a ValueError naming
    `what`, the file and the line.
    """
    file = Path(path)
    lines = file.read_text(encoding="utf-8").splitlines(keepends=True)
    rows, raw = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{file}:{number}: malformed {what} row ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
            raise ValueError(f"{file}:{number}: a {what} row must be a JSON object with an integer 'step'")
        rows.append(row)
        raw.append(line if line.endswith("\n") else line + "\n")
    return rows, raw


def truncate_jsonl(path: str | os.PathLike, what: str, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrite a row file atomically with only the rows `keep` accepts (a torn last line goes too); no file, no-op."""
    file = Path(path)
    if not file.exists():
        return
    rows, raw = read_jsonl(file, what)
    temp = file.with_name(f"{file.name}.tmp-{os.getpid()}")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write("".join(line for row, line in zip(rows, raw) if keep(row)))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, file)


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# one reader per artefact


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of `metrics.jsonl` in file order; `path` is the run directory or the file itself."""
    file = Path(path.metrics if isinstance(path, RunDir) else path)
    if file.is_dir():
        file = RunDir(file).metrics
    return read_jsonl(file, "metrics")[0]


def read_trajectories(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of `trajectories.jsonl` in file order ([] when the run logged none)."""
    file = _run_dir(run_dir).trajectories
    return read_jsonl(file, "trajectory")[0] if file.exists() else []


def read_eval(run_dir: str | os.PathLike, which: str) -> dict[str, Any]:
    """The `EvalResult.to_dict()` written for `which` ("before", "after", "step<N>")."""
    file = _run_dir(run_dir).eval_results(which)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no evaluation '{which}' (was trainer.eval_max_questions 0?)")
    try:
        result = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(result, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return result


def write_timings(run_dir: str | os.PathLike, stages: dict[str, float]) -> None:
    """`timings.json`: wall seconds per stage of the whole job, in the order they ran (replaced atomically)."""
    file = _run_dir(run_dir).timings
    staging = file.with_name(file.name + ".tmp")
    staging.write_text(
        json.dumps({name: round(seconds, 3) for name, seconds in stages.items()}, indent=1), encoding="utf-8"
    )
    os.replace(staging, file)


def read_timings(run_dir: str | os.PathLike) -> dict[str, float]:
    """Stage -> wall seconds from `timings.json` ({} when the run wrote none)."""
    file = _run_dir(run_dir).timings
    if not file.is_file():
        return {}
    try:
        stages = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(stages, dict) or not all(isinstance(v, (int, float)) for v in stages.values()):
        raise ValueError(f"{file}: expected an object of stage -> seconds")
    return {str(name): float(seconds) for name, seconds in stages.items()}
