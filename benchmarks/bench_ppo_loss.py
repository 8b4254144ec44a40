"""Benchmark: PPO loss (clipped policy + clipped value + entropy, token-mean), fused Triton vs the torch twin.

Methods (forward, and forward + backward into logp, values and entropy):
    triton         `stepsearch.kernels.ppo_loss.ppo_loss` (three small launches forward, one backward)
    torch_twin     `stepsearch.algo.ppo_loss.ppo_loss`, eager torch. This is also the peers' method: verl's
                   compute_policy_loss / compute_value_loss / agg_loss and OpenRLHF's PolicyLoss / ValueLoss are the
                   same eager elementwise ops and masked means, so its row stands for them.
    torch_compile  the twin under `torch.compile` (GPU only): the strongest generic baseline

GPU: medians of `triton.testing.do_bench` (L2 flushed before every run) over two input sets rotated per call
(together larger than L2), achieved GB/s counted as the compulsory traffic (forward: 7 fp32 inputs + bool mask;
forward + backward: that plus 3 fp32 gradients written) and its fraction of the measured copy bandwidth. Issue
target on one H100: 2M tokens forward + backward <= 80 us and >= 5x faster than the twin.

    python benchmarks/bench_ppo_loss.py            # GPU, B=512 T=4096 (2M tokens)
    python benchmarks/bench_ppo_loss.py --quick    # seconds on CPU: the twin alone at B=64 T=512

Results: a printed table and long-format CSV at benchmarks/results/ppo_loss.csv (ppo_loss_quick.csv for --quick).
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

from stepsearch.algo.ppo_loss import ppo_loss as twin_ppo_loss

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SETTINGS = dict(clip_ratio=0.2, dual_clip=3.0, value_clip=0.5, vf_coef=1.0, entropy_coef=1e-3)
DIFFERENTIABLE = ("logp", "values", "entropy")


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU run (the twin), seconds")
    parser.add_argument("--shape", help="BxT (default GPU 512x4096; quick 64x512)")
    parser.add_argument("--methods", default="triton,torch_twin,torch_compile")
    parser.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/ppo_loss[_quick].csv)")
    return parser.parse_args(argv)



def _make_inputs(batch, length, device, seed):
    generator = torch.Generator().manual_seed(seed)

    def randn(scale=1.0):
        return (torch.randn(batch, length, generator=generator) * scale).to(device)

    logp = -randn().abs()
    inputs = {
        "logp": logp, "old_logp": logp + randn(0.1), "advantages": randn(), "values": randn(),
        "old_values": randn(), "returns": randn(), "entropy": randn().abs(),
        "loss_mask": (torch.rand(batch, length, generator=generator) < 0.8).to(device),
    }
    for name in DIFFERENTIABLE:
        inputs[name].requires_grad_()
    return inputs


def _bytes_moved(tokens: int, backward: bool) -> int:
    return tokens * (7 * 4 + 1 + (3 * 4 if backward else 0))


def _loss_fn(method):
    if method == "torch_twin":
        return twin_ppo_loss
    if method == "torch_compile":
        return torch.compile(twin_ppo_loss, dynamic=False)
    from stepsearch.kernels.ppo_loss import ppo_loss

    return ppo_loss


def _step(loss_fn, input_sets, backward):
    calls = iter(range(10**12))

    def step():
        x = input_sets[next(calls) % len(input_sets)]
        out = loss_fn(x["logp"], x["old_logp"], x["advantages"], x["values"], x["old_values"], x["returns"],
                      x["loss_mask"], x["entropy"], **SETTINGS)
        if backward:
            out.loss.backward()

    return step


def _copy_ceiling_gb_s(device) -> float:
    import triton

    source = torch.empty(2**28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: target.copy_(source), return_mode="median")
    return 2 * source.numel() * 4 / (ms * 1e-3) / 1e9


def _time(step, input_sets, on_gpu, repeats=5) -> float:
    leaves = [x[name] for x in input_sets for name in DIFFERENTIABLE]
    if on_gpu:
        import triton

        return triton.testing.do_bench(step, grad_to_none=leaves, return_mode="median") * 1e-3
    step()
    times = []
    for _ in range(repeats):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    on_gpu = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if on_gpu else "cpu")
    batch, length = (int(x) for x in (args.shape or ("512x4096" if on_gpu else "64x512")).split("x"))
    methods = [m for m in args.methods.split(",") if on_gpu or m == "torch_twin"]
    out_path = args.out or RESULTS_DIR / ("ppo_loss.csv" if on_gpu else "ppo_loss_quick.csv")
    device_name = bench_common.device_name(device)
    ceiling = _copy_ceiling_gb_s(device) if on_gpu else None
    input_sets = [_make_inputs(batch, length, device, seed) for seed in range(2)]  # 2 x 64 MB at 2M tokens
    tokens = batch * length

    seconds = {}
    for method in tqdm(methods, desc=f"B={batch} T={length}", file=sys.stderr):
        loss_fn = _loss_fn(method)
        for backward in (False, True):
            try:
                seconds[method, backward] = _time(_step(loss_fn, input_sets, backward), input_sets, on_gpu)
            except Exception as error:  # torch.compile can fail on a given setup: say so, keep the other rows
                if method != "torch_compile":
                    raise
                print(f"torch_compile failed ({type(error).__name__}: {error}); row left out", file=sys.stderr)
                break

    rows = []
    for (method, backward), value in seconds.items():
        metrics = {"median_us": value * 1e6, "gb_s": _bytes_moved(tokens, backward) / value / 1e9}
        if ceiling:
            metrics["fraction_of_copy_ceiling"] = metrics["gb_s"] / ceiling
        if ("torch_twin", backward) in seconds:
            metrics["speedup_vs_torch_twin"] = seconds["torch_twin", backward] / value
        for metric, number in metrics.items():
            rows.append({"benchmark": "ppo_loss", "device": device_name, "batch": batch, "length": length,
                         "tokens": tokens, "dtype": "fp32", "pass": "fwd+bwd" if backward else "fwd",
                         "method": method, "metric": metric, "value": number})

    print(f"device: {device_name} | {tokens} tokens" + (f" | measured copy ceiling {ceiling:.0f} GB/s" if ceiling
                                                          else ""))
    header = f"{'method':<14} {'pass':<8} {'median us':>11} {'GB/s':>8} {'x twin':>8}"
    print(header)
    print("-" * len(header))
    table = {}
    for row in rows:
        table.setdefault((row["method"], row["pass"]), {})[row["metric"]] = row["value"]
    for (method, pass_name), metrics in table.items():
        print(f"{method:<14} {pass_name:<8} {metrics['median_us']:>11.1f} {metrics['gb_s']:>8.1f} "
              f"{metrics.get('speedup_vs_torch_twin', float('nan')):>8.2f}")
    bench_common.write_csv(out_path, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
