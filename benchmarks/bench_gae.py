"""Benchmark: reward scatter + KL + GAE, fused Triton kernel vs torch twin vs the peers' Python loop over T.

Methods (each computes token rewards from outcome, step scores and the k1 KL penalty, then advantages and returns):
    triton_fused   `stepsearch.kernels.gae.scatter_rewards_and_gae` (rewards never written to memory)
    triton_gae     `stepsearch.algo.scatter.scatter_rewards` + `stepsearch.kernels.gae.compute_gae`
    torch_twin     `stepsearch.algo.gae.scatter_rewards_and_gae` (vectorised doubling scan)
    python_loop    `scatter_rewards` + `gae_python_loop`, the loop over T of verl / OpenRLHF / TRL / Search-R1

GPU: medians of `triton.testing.do_bench` (which also flushes L2 before every run) over input sets rotated per
call (together larger than L2), achieved GB/s counted as the bytes the fused kernel must move (old/ref log-probs,
values, mask in; advantages, returns out), and that rate as a fraction of the device's measured copy bandwidth.
The Python loop is timed with a few synchronised runs (it takes ~T x 10 launches). The goal on one H100:
B=512, T=4096 fp32 in <= 25 us and >= 5,000x faster than the loop.

    python benchmarks/bench_gae.py            # GPU, B=512 T=4096 and a few-long-rows case B=4 T=32768
    python benchmarks/bench_gae.py --quick    # seconds on CPU: torch twin vs Python loop at small shapes

Results: a printed table and long-format CSV at benchmarks/results/gae.csv (gae_quick.csv for --quick), one row
per device, shape, method and metric.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import bench_common
import torch
from tqdm import tqdm

from stepsearch.algo.gae import gae_python_loop
from stepsearch.algo.gae import scatter_rewards_and_gae as twin_scatter_rewards_and_gae
from stepsearch.algo.scatter import scatter_rewards

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_STEPS = 4
GAMMA, LAM, KL_COEF = 1.0, 1.0, 1e-3  # the paper's settings


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU run (twin vs loop), seconds")
    parser.add_argument("--shapes", help="comma-separated BxT list (default GPU 512x4096,4x32768; quick 64x512)")
    parser.add_argument("--methods", default="triton_fused,triton_gae,torch_twin,python_loop")
    parser.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/gae.csv or gae_quick.csv)")
    return parser.parse_args(argv)



def _make_inputs(batch, length, device, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    prompt = length // 8
    mask[:, prompt:] = torch.rand(batch, length - prompt, generator=generator) < 0.8  # response with retrieved holes
    step_ends = torch.sort(torch.randint(prompt, length, (batch, NUM_STEPS), generator=generator), dim=1).values
    inputs = {
        "outcome": torch.rand(batch, generator=generator),
        "step_scores": torch.rand(batch, NUM_STEPS, generator=generator),
        "step_ends": step_ends,
        "old_logp": -torch.rand(batch, length, generator=generator) * 2,
        "ref_logp": -torch.rand(batch, length, generator=generator) * 2,
        "values": torch.randn(batch, length, generator=generator),
        "loss_mask": mask,
    }
    return {name: tensor.to(device) for name, tensor in inputs.items()}


def _bytes_moved(batch, length) -> int:
    """Compulsory traffic of the fused kernel: 3 fp32 + 1 bool in, 2 fp32 out per token, plus per-row scalars."""
    return batch * length * (3 * 4 + 1 + 2 * 4) + batch * (4 + NUM_STEPS * (4 + 8))


def _method(name):
    def twin(x):
        return twin_scatter_rewards_and_gae(x["outcome"], x["step_scores"], x["step_ends"], x["old_logp"],
                                            x["ref_logp"], x["values"], x["loss_mask"], KL_COEF, GAMMA, LAM)

    def loop(x):
        rewards = scatter_rewards(x["outcome"], x["step_scores"], x["step_ends"], x["old_logp"], x["ref_logp"],
                                  x["loss_mask"], KL_COEF)
        return gae_python_loop(rewards, x["values"], x["loss_mask"], GAMMA, LAM)

    if name == "torch_twin":
        return twin
    if name == "python_loop":
        return loop
    from stepsearch.kernels import gae as kernels

    def fused(x):
        return kernels.scatter_rewards_and_gae(x["outcome"], x["step_scores"], x["step_ends"], x["old_logp"],
                                               x["ref_logp"], x["values"], x["loss_mask"], KL_COEF, GAMMA, LAM)

    def gae_only(x):
        rewards = scatter_rewards(x["outcome"], x["step_scores"], x["step_ends"], x["old_logp"], x["ref_logp"],
                                  x["loss_mask"], KL_COEF)
        return kernels.compute_gae(rewards, x["values"], x["loss_mask"], GAMMA, LAM)

    return {"triton_fused": fused, "triton_gae": gae_only}[name]


def _copy_ceiling_gb_s(device) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second) on a 1 GiB buffer."""
    import triton

    source = torch.empty(2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), return_mode="median")
    return 2 * source.numel() * 4 / (ms * 1e-3) / 1e9


def _time_gpu(fn, input_sets, slow: bool) -> float:
    """Median seconds per call, rotating through the input sets."""
    import triton

    calls = iter(range(10**12))

    def step():
        fn(input_sets[next(calls) % len(input_sets)])

    if slow:
        return bench_common.median_seconds(step, torch.device("cuda"), repeats=3)
    return triton.testing.do_bench(step, return_mode="median") * 1e-3


def _time_cpu(fn, input_sets, repeats=5) -> float:
    fn(input_sets[0])
    times = []
    for index in range(repeats):
        start = time.perf_counter()
        fn(input_sets[index % len(input_sets)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if on_gpu else "cpu")
    shapes = args.shapes or ("512x4096,4x32768" if on_gpu else "64x512")
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in shapes.split(",")]
    methods = [m for m in args.methods.split(",") if on_gpu or not m.startswith("triton")]
    out_path = args.out or RESULTS_DIR / ("gae.csv" if on_gpu else "gae_quick.csv")
    device_name = bench_common.device_name(device)
    ceiling = _copy_ceiling_gb_s(device) if on_gpu else None

    rows = []
    for batch, length in shapes:
        # Enough input sets to exceed a 50 MB L2 when rotated (one set ~21 bytes/token).
        num_sets = max(2, -(-64 * 2**20 // (batch * length * 21))) if on_gpu else 2
        input_sets = [_make_inputs(batch, length, device, seed) for seed in range(num_sets)]
        seconds = {}
        for method in tqdm(methods, desc=f"B={batch} T={length}", file=sys.stderr):
            fn = _method(method)
            seconds[method] = (_time_gpu(fn, input_sets, slow=method == "python_loop") if on_gpu
                               else _time_cpu(fn, input_sets))
        moved = _bytes_moved(batch, length)
        for method, value in seconds.items():
            metrics = {"median_us": value * 1e6, "gb_s": moved / value / 1e9}
            if ceiling:
                metrics["fraction_of_copy_ceiling"] = metrics["gb_s"] / ceiling
            for baseline in ("python_loop", "torch_twin"):
                if baseline in seconds:
                    metrics[f"speedup_vs_{baseline}"] = seconds[baseline] / value
            for metric, number in metrics.items():
                rows.append({"benchmark": "scatter_kl_gae", "device": device_name, "batch": batch, "length": length,
                             "dtype": "fp32", "method": method, "metric": metric, "value": number})

    print(f"device: {device_name}" + (f" | measured copy ceiling {ceiling:.0f} GB/s" if ceiling else ""))
    header = f"{'B':>5} {'T':>6} {'method':<13} {'median us':>12} {'GB/s':>9} {'x loop':>10} {'x twin':>8}"
    print(header)
    print("-" * len(header))
    table = {}
    for row in rows:
        table.setdefault((row["batch"], row["length"], row["method"]), {})[row["metric"]] = row["value"]
    for (batch, length, method), metrics in table.items():
        print(f"{batch:>5} {length:>6} {method:<13} {metrics['median_us']:>12.1f} {metrics['gb_s']:>9.1f} "
              f"{metrics.get('speedup_vs_python_loop', float('nan')):>10.1f} "
              f"{metrics.get('speedup_vs_torch_twin', float('nan')):>8.2f}")
    bench_common.write_csv(out_path, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
