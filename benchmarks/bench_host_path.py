"""Benchmark: the host path of the fused kernel calls (the Python around the launches), on a CPU, no GPU needed.

A fused call costs the GPU time of its kernels plus the host time to get them launched: argument checks, the launch
plan, allocations, the autograd node, Triton's dispatch and the driver. When the kernels take tens of microseconds
the host part decides the wall time, and with it the PPO-loss (<= 80 us fwd+bwd) and GAE (<= 25 us) goals. This
script times the part that is this project's code: every `@triton.jit` kernel of `stepsearch.kernels.gae` and
`stepsearch.kernels.ppo_loss` is replaced by a stand-in that only counts its launches, and each public call runs on
CPU tensors at the GPU benchmark shape (B=512, T=4096 fp32; the stand-ins touch no data, so the shape only matters
through the code paths it selects). glibc is told to keep freed 8 MB buffers in its heap (`mallopt`), as the GPU's
caching allocator keeps its blocks: otherwise each allocation maps fresh pages and the timings swing by 2x from
run to run. Triton's own dispatch and the CUDA driver come on top; `gpu_check_profile.py` measures those on a GPU.

Per call: median host microseconds over `--calls` calls after warm-up; the same in units of one eager torch op
(`torch.add` of two 1-element tensors, timed in the same run) as a machine-independent size; Triton launches; aten
operators dispatched (counted with a TorchDispatchMode, allocations and views included: each is host work, and each
non-allocating one is a device launch on a GPU). The torch twin's operator count stands for the peers' eager method.

    python benchmarks/bench_host_path.py            # about 20 s on one CPU core

Results: a printed table and long-format CSV at benchmarks/results/host_path.csv.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import sys
from collections import Counter
from pathlib import Path

import bench_common
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stepsearch.algo.gae import scatter_rewards_and_gae as twin_scatter_rewards_and_gae
from stepsearch.algo.ppo_loss import ppo_loss as twin_ppo_loss

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_STEPS = 4
PPO_SETTINGS = dict(clip_ratio=0.2, dual_clip=3.0, value_clip=0.2, vf_coef=0.5, entropy_coef=1e-3)


class _CountedLaunch:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **meta)` only counts the launch."""

    def __init__(self, counter: Counter, name: str):
        self.counter, self.name = counter, name

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **meta):
        self.counter[self.name] += 1


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _keep_freed_buffers() -> bool:
    """glibc: serve large allocations from the heap and never trim it (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 31))


def _stub_kernels(launches: Counter) -> None:
    from stepsearch.kernels import gae, ppo_loss

    for module in (gae, ppo_loss):
        for name in [n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")]:
            setattr(module, name, _CountedLaunch(launches, name))


def _calls(batch: int, length: int) -> dict:
    from stepsearch.kernels.gae import compute_gae, scatter_rewards_and_gae
    from stepsearch.kernels.ppo_loss import ppo_loss

    generator = torch.Generator().manual_seed(0)

    def randn():
        return torch.randn(batch, length, generator=generator)

    mask = torch.rand(batch, length, generator=generator) < 0.8
    step_ends = torch.sort(torch.randint(0, length, (batch, NUM_STEPS), generator=generator), dim=1).values
    outcome, step_scores = torch.rand(batch, generator=generator), torch.rand(batch, NUM_STEPS, generator=generator)
    old_logp, ref_logp, values, rewards = -randn().abs(), -randn().abs(), randn(), randn()
    logp, new_values, entropy = (-randn().abs()).requires_grad_(), randn().requires_grad_(), randn().abs()
    entropy.requires_grad_()
    advantages, old_values, returns = randn(), randn(), randn()
    gae_args = (outcome, step_scores, step_ends, old_logp, ref_logp, values, mask, 1e-3, 1.0, 1.0)
    ppo_args = (logp, old_logp, advantages, new_values, old_values, returns, mask, entropy)

    def fused_gae():
        scatter_rewards_and_gae(*gae_args)

    def plain_gae():
        compute_gae(rewards, values, mask, 1.0, 1.0)

    def ppo_fwd():
        ppo_loss(*ppo_args, **PPO_SETTINGS)

    def ppo_fwd_bwd(loss_fn=ppo_loss):
        for leaf in (logp, new_values, entropy):
            leaf.grad = None
        loss_fn(*ppo_args, **PPO_SETTINGS).loss.backward()

    return {
        "scatter_kl_gae": (fused_gae, lambda: twin_scatter_rewards_and_gae(*gae_args)),
        "gae": (plain_gae, None),
        "ppo_loss fwd": (ppo_fwd, lambda: twin_ppo_loss(*ppo_args, **PPO_SETTINGS)),
        "ppo_loss fwd+bwd": (ppo_fwd_bwd, lambda: ppo_fwd_bwd(twin_ppo_loss)),
    }


def _count_ops(call) -> int:
    with _OpCounter() as counter:
        call()
    return sum(counter.ops.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="512x4096", help="BxT of the inputs (default 512x4096)")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per row")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "host_path.csv")
    args = parser.parse_args(argv)
    batch, length = (int(x) for x in args.shape.split("x"))
    torch.set_num_threads(1)
    if not _keep_freed_buffers():
        print("note: no glibc mallopt here; large CPU allocations map fresh pages and the times vary more")
    launches = Counter()
    _stub_kernels(launches)
    one, other = torch.ones(1), torch.ones(1)
    cpu = torch.device("cpu")
    eager_op_us = bench_common.median_host_microseconds(lambda: torch.add(one, other), cpu, args.calls, warmup=20)
    device = bench_common.device_name(cpu)
    rows = []
    print(f"host path per call, {device}, B={batch} T={length}; one eager torch op: {eager_op_us:.2f} us")
    header = f"{'call':<18} {'host us':>9} {'eager ops':>10} {'launches':>9} {'aten ops':>9} {'twin aten ops':>14}"
    print(header)
    print("-" * len(header))
    for name, (call, twin) in _calls(batch, length).items():
        host_us = bench_common.median_host_microseconds(call, cpu, args.calls, warmup=20)
        launches.clear()
        call()
        metrics = {
            "host_us": host_us,
            "host_in_eager_ops": host_us / eager_op_us,
            "triton_launches": sum(launches.values()),
            "aten_ops": _count_ops(call),
        }
        if twin is not None:
            metrics["twin_aten_ops"] = _count_ops(twin)
        for metric, value in metrics.items():
            rows.append(
                {
                    "benchmark": "host_path",
                    "device": device,
                    "batch": batch,
                    "length": length,
                    "call": name,
                    "metric": metric,
                    "value": value,
                }
            )
        print(
            f"{name:<18} {host_us:>9.1f} {metrics['host_in_eager_ops']:>10.1f} {metrics['triton_launches']:>9d} "
            f"{metrics['aten_ops']:>9d} {metrics.get('twin_aten_ops', float('nan')):>14}"
        )
    bench_common.write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
