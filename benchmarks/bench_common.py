"""Helpers shared by the benchmark scripts (run as `python benchmarks/bench_*.py`, so this imports as a sibling)."""
from __future__ import annotations

import platform

import torch


def device_name(device: torch.device) -> str:
    """The name recorded in every CSV row: the GPU's name, or the CPU with the thread count torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
