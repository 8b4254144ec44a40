"""The host path of the fused kernel calls stays lean: launches and aten operators per call, from
`benchmarks/bench_host_path.py` run as a child process (its kernels are launch counters, so no GPU and no
interpreter; triton stays out of this process).

On a GPU every aten operator that is not an allocation or a view is a device launch, and each launch costs host
time that the microsecond goals of these kernels cannot afford: a fused GAE call is one Triton launch and two
allocations, a PPO-loss forward two launches, its backward one more (the upstream gradients are read by the kernel,
never stacked on the host).
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# call -> (Triton launches, most aten operators: allocations, views and detaches included), at the benchmark's
# 512 x 4096, where the rows fill the GPU and the GAE takes no chunk-summary pass
BUDGET = {
    "scatter_kl_gae": (1, 4),
    "gae": (1, 4),
    "ppo_loss fwd": (2, 8),
    "ppo_loss fwd+bwd": (3, 15),
}


def test_fused_calls_launch_and_dispatch_no_more_than_their_budget(tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    out = tmp_path / "host_path.csv"
    completed = subprocess.run(
        [sys.executable, "benchmarks/bench_host_path.py", "--calls", "20", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    measured = {}
    with open(out, encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            measured[row["call"], row["metric"]] = float(row["value"])
    for call, (launches, most_ops) in BUDGET.items():
        assert measured[call, "triton_launches"] == launches, call
        assert measured[call, "aten_ops"] <= most_ops, (call, measured[call, "aten_ops"])
        assert measured[call, "host_us"] > 0, call
