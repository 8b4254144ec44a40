"""Where a fused-kernel call's time goes: GPU kernels or the host path (part of benchmarks/gpu_check.sh).

    python benchmarks/gpu_check_profile.py            # GPU: PPO loss fwd+bwd at 512 x 4096, scatter + KL + GAE
    TRITON_INTERPRET=1 python benchmarks/gpu_check_profile.py --quick   # CPU dry run at 8 x 256

On the first H200 run the PPO loss took 804 us fwd+bwd for 2M fp32 tokens (~120 MB: 30 us at the measured copy
bandwidth) and the fused GAE 129 us (~44 MB). Either the kernels are slow or the calls spend their time on the host
(Python, argument handling, launches) while the GPU waits. For each call this prints the wall time per call
(synchronised, median of 20 after warm-up), the host time per call (the same calls queued back to back without a
synchronisation: what the CPU spends to launch them), the GPU time of its kernels per call (torch.profiler, CUPTI),
the GPU's busy share of the wall time, and each kernel's share; a GPU busy for a small part of the wall time means
the host path is what to cut (fewer launches, CUDA graphs), a busy one that the kernels themselves are. The floor
rows time one launch of an empty Triton kernel with 2 and with 24 arguments (the fused kernels take 20-35) and one
eager torch op, host and wall: the least a call with that many launches can cost on this machine.
`benchmarks/bench_host_path.py` times this project's share of the host path on a CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench_common
import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stepsearch.kernels.gae import scatter_rewards_and_gae  # noqa: E402
from stepsearch.kernels.ppo_loss import ppo_loss  # noqa: E402

STEPS = 4  # step rewards per row
CALLS = 20


def ppo_call(batch: int, length: int, device: torch.device):
    """One fused PPO loss fwd + bwd on fresh gradients, as the trainer's update calls it."""
    generator = torch.Generator().manual_seed(0)

    def randn():
        return torch.randn(batch, length, generator=generator).to(device)

    logp, values, entropy = (-randn().abs()).requires_grad_(), randn().requires_grad_(), randn().abs().requires_grad_()
    old_logp, advantages, old_values, returns = logp.detach() + 0.1 * randn(), randn(), randn(), randn()
    mask = (torch.rand(batch, length, generator=generator) < 0.8).to(device)

    def call():
        for leaf in (logp, values, entropy):
            leaf.grad = None
        out = ppo_loss(
            logp,
            old_logp,
            advantages,
            values,
            old_values,
            returns,
            mask,
            entropy,
            clip_ratio=0.2,
            dual_clip=3.0,
            value_clip=0.2,
            vf_coef=0.5,
            entropy_coef=0.001,
            loss_agg_mode="token-mean",
        )
        out.loss.backward()

    return call


def gae_call(batch: int, length: int, device: torch.device):
    """One fused reward scatter + k1 KL + GAE, as the trainer's advantage stage calls it."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(batch, length, generator=generator) < 0.8
    step_ends = torch.sort(torch.randint(0, length, (batch, STEPS), generator=generator), dim=1).values
    tensors = [
        torch.rand(batch, generator=generator),
        torch.rand(batch, STEPS, generator=generator),
        step_ends,
        -torch.rand(batch, length, generator=generator),
        -torch.rand(batch, length, generator=generator),
        torch.randn(batch, length, generator=generator),
        mask,
    ]
    outcome, scores, ends, old_logp, ref_logp, values, mask = (t.to(device) for t in tensors)

    def call():
        scatter_rewards_and_gae(
            outcome, scores, ends, old_logp, ref_logp, values, mask, kl_coef=0.001, gamma=1.0, lam=1.0
        )

    return call


@triton.jit
def _empty_kernel(x_ptr, n):
    pass


# fmt: off
@triton.jit
def _empty_kernel_24_args(
    a_ptr, b_ptr, c_ptr, d_ptr, e_ptr, f_ptr, g_ptr, h_ptr, i_ptr, j_ptr, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10,
    x1, x2, x3, FLAG: tl.constexpr,
):
    pass
# fmt: on


def floor_calls(device: torch.device) -> list[tuple[str, object]]:
    """One launch each: an empty Triton kernel with 2 and with 24 arguments, one eager torch op."""
    x = torch.zeros(1, device=device)
    pointers = [torch.zeros(16, device=device) for _ in range(10)]

    def triton_2_args():
        _empty_kernel[(1,)](x, 1)

    def triton_24_args():
        _empty_kernel_24_args[(1,)](*pointers, *range(16, 26), 0.5, 1.5, 2.5, FLAG=True)

    def torch_op():
        x.add_(1.0)

    return [
        ("triton launch, 2 args", triton_2_args),
        ("triton launch, 24 args", triton_24_args),
        ("torch op (add_)", torch_op),
    ]


def kernel_table(call, device: torch.device) -> tuple[float, list[tuple[str, float]]]:
    """(GPU microseconds per call, [(kernel, microseconds per call)]) from torch.profiler over CALLS calls."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(CALLS):
            call()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for event in profiler.key_averages():
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device.type == "cuda" and device_us > 0:
            rows.append((event.key, device_us / CALLS))
    rows.sort(key=lambda row: -row[1])
    return sum(us for _, us in rows), rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 x 256 on the CPU under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.quick else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check_profile: no CUDA device (use --quick with TRITON_INTERPRET=1 for a CPU dry run)")
        return 2
    batch, length = (8, 256) if args.quick else (512, 4096)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"
    print(f"{name}, B={batch} T={length} fp32, {CALLS} calls each")
    print(f"{'call':<30} {'wall us':>9} {'host us':>9} {'GPU us':>9} {'GPU busy':>9}")
    tables = []
    for label, make in (("ppo_loss fwd+bwd", ppo_call), ("scatter_kl_gae", gae_call)):
        call = make(batch, length, device)
        wall = 1e6 * bench_common.median_seconds(call, device, CALLS, warmup=3)
        host = bench_common.median_host_microseconds(call, device, CALLS)
        gpu, rows = kernel_table(call, device)
        print(f"{label:<30} {wall:>9.1f} {host:>9.1f} {gpu:>9.1f} {gpu / wall:>8.0%}")
        tables.append((label, rows))
    for label, call in floor_calls(device):
        wall = 1e6 * bench_common.median_seconds(call, device, CALLS, warmup=3)
        host = bench_common.median_host_microseconds(call, device, CALLS)
        print(f"{'floor: ' + label:<30} {wall:>9.1f} {host:>9.1f}")
    for label, rows in tables:
        print(f"\n{label}: GPU time per call by kernel")
        for kernel, us in rows[:8]:
            print(f"  {us:>8.1f} us  {kernel[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
