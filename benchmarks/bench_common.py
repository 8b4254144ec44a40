"""Helpers shared by the benchmark scripts (run as `python benchmarks/bench_*.py`, so this imports as a sibling)."""
from __future__ import annotations

import csv
import platform
import statistics
import time
from pathlib import Path

import torch


def device_name(device: torch.device) -> str:
    """The name recorded in every CSV row: the GPU's name, or the CPU with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_host_microseconds(call, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median CPU microseconds per `call()`, the calls queued back to back: the device is synchronised only before
    the first timed call and after the last, so the time is what the host spends to issue one call (a
    synchronisation inside the timed window would add its own Python to every call)."""
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    synchronize(device)
    return 1e6 * statistics.median(times)


def median_seconds(call, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `call()` over `repeats` runs after `warmup` untimed ones, the device synchronised
    before and after each timed run (so a GPU call's queued kernels count)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_csv(path: Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Write the long-format rows (columns: `fieldnames`, default the first row's keys) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")
