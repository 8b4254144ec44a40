"""Benchmark: LM-head log-prob + entropy, fused Triton kernel vs torch twin vs materialised logits (peers' method).

Measures forward-only (rollout scoring: old/ref log-probs) and forward+backward (actor update), at Qwen2.5-3B shapes
by default (H=2048, V=151936, 16k response tokens, bf16). Reports median time (`triton.testing.do_bench`), TFLOP/s
counted as 2NHV (forward) and 8NHV (forward + backward: forward, logit recompute, d hidden, d weight), the fraction
of the device's measured bf16 GEMM ceiling, and the peak extra memory (max_memory_allocated above what the inputs
already hold; it includes the gradients themselves, reported separately as `grad_mib`). Two hidden-state buffers
alternate between calls so a repeated input cannot sit in L2 (the weight alone is 600 MB at these shapes).

    python benchmarks/bench_logprob.py                 # GPU, full shapes
    python benchmarks/bench_logprob.py --quick         # seconds on CPU: twin vs materialised at small shapes

CPU mode times with perf_counter (median) and measures peak memory as the rise of the process's peak RSS (Linux
/proc; glibc is told to mmap every allocation above 64 KiB so freed tensors leave RSS). Results: a printed table
and long-format CSV at benchmarks/results/logprob.csv (one row per device, method, pass, metric).
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import sys
import time
from pathlib import Path

import bench_common
import torch
from tqdm import tqdm

from stepsearch.algo.logprob import logprob_entropy as twin_logprob_entropy
from stepsearch.algo.logprob import logprob_entropy_materialized

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "logprob.csv"
MIB = 2**20


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU run (twin vs materialised), seconds")
    parser.add_argument("--tokens", type=int, help="N, response tokens (default 16384; quick 512)")
    parser.add_argument("--hidden", type=int, help="H (default 2048; quick 128)")
    parser.add_argument("--vocab", type=int, help="V (default 151936; quick 16384)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--chunk-size", type=int, default=4096, help="vocabulary columns per chunk")
    parser.add_argument("--methods", default="triton,torch_twin,materialized",
                        help="comma-separated subset of triton,torch_twin,materialized")
    parser.add_argument("--out", type=Path, help=f"CSV path (default {RESULTS_PATH}; --quick: logprob_quick.csv)")
    return parser.parse_args(argv)



class _RssPeak:
    """Peak resident memory above a baseline, for CPU runs (Linux only; None elsewhere)."""

    def __init__(self):
        self.available = Path("/proc/self/clear_refs").exists()
        if self.available:
            try:
                ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big frees return to the OS
            except OSError:
                self.available = False

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def measure(self, fn) -> float | None:
        if not self.available:
            fn()
            return None
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset the peak-RSS watermark
        baseline = self._status("VmRSS:")
        fn()
        return (self._status("VmHWM:") - baseline) / MIB


def _make_step(method, hidden_buffers, weight, targets, grad_logp, grad_entropy, chunk_size, backward):
    """A zero-argument callable running one pass; alternates hidden buffers so L2 cannot keep the input."""
    if method == "triton":
        from stepsearch.kernels.logprob import logprob_entropy as triton_logprob_entropy

        def fn(h, w, t):
            return triton_logprob_entropy(h, w, t, chunk_size=chunk_size)
    elif method == "torch_twin":
        def fn(h, w, t):
            return twin_logprob_entropy(h, w, t, chunk_size=chunk_size)
    elif method == "materialized":
        def fn(h, w, t):
            return logprob_entropy_materialized(h, w, t)
    else:
        raise ValueError(f"--methods: unknown method {method!r}")
    calls = [0]

    def step():
        hidden = hidden_buffers[calls[0] % len(hidden_buffers)]
        calls[0] += 1
        if not backward:
            with torch.no_grad():
                return fn(hidden, weight, targets)
        logp, entropy = fn(hidden, weight, targets)
        return torch.autograd.grad((logp, entropy), (hidden, weight), (grad_logp, grad_entropy))

    return step


def _gemm_ceiling_tflops(n_rows, hidden_size, dtype, device) -> float:
    """Measured dense GEMM ceiling of this device at the benchmark's shape (cuBLAS, one vocabulary chunk)."""
    import triton.testing

    a = torch.randn(n_rows, hidden_size, dtype=dtype, device=device)
    b = torch.randn(hidden_size, 8192, dtype=dtype, device=device)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * n_rows * hidden_size * 8192 / (ms * 1e-3) / 1e12


def _measure_gpu(step):
    import triton.testing

    step()  # compile / autotune outside the measurement
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak_mib = (torch.cuda.max_memory_allocated() - baseline) / MIB
    ms = triton.testing.do_bench(step, return_mode="median")
    return ms, peak_mib


def _measure_cpu(step, rss, repeats=5):
    step()
    peak_mib = rss.measure(step)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), peak_mib


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    on_gpu = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if on_gpu else "cpu")
    n_rows = args.tokens or (16384 if on_gpu else 512)
    hidden_size = args.hidden or (2048 if on_gpu else 128)
    vocab = args.vocab or (151936 if on_gpu else 16384)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if on_gpu else "fp32")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not on_gpu and "triton" in methods:
        print("no GPU (or --quick): skipping the Triton kernel; the GPU path is ready to run on a CUDA machine")
        methods.remove("triton")

    generator = torch.Generator().manual_seed(0)
    hidden_buffers = [
        torch.randn(n_rows, hidden_size, generator=generator).to(device, dtype).requires_grad_() for _ in range(2)
    ]  # 2 x (N, H)
    weight = (torch.randn(vocab, hidden_size, generator=generator) / math.sqrt(hidden_size)).to(device, dtype)
    weight.requires_grad_()  # (V, H)
    targets = torch.randint(0, vocab, (n_rows,), generator=generator).to(device)  # (N,)
    grad_logp = torch.randn(n_rows, generator=generator).to(device)  # (N,)
    grad_entropy = torch.randn(n_rows, generator=generator).to(device) * 0.01  # (N,)
    grad_mib = (n_rows + vocab) * hidden_size * hidden_buffers[0].element_size() / MIB

    device_name = bench_common.device_name(device)
    ceiling = _gemm_ceiling_tflops(n_rows, hidden_size, dtype, device) if on_gpu else None
    rss = None if on_gpu else _RssPeak()
    flops_per_pass = {"fwd": 2.0 * n_rows * hidden_size * vocab, "fwd+bwd": 8.0 * n_rows * hidden_size * vocab}
    measured = {}  # (method, pass) -> (ms, peak_mib)
    runs = [(m, p) for p in ("fwd", "fwd+bwd") for m in methods]
    for method, pass_name in tqdm(runs, desc="bench_logprob", unit="run"):
        step = _make_step(method, hidden_buffers, weight, targets, grad_logp, grad_entropy, args.chunk_size,
                          backward=pass_name == "fwd+bwd")
        try:
            measured[method, pass_name] = _measure_gpu(step) if on_gpu else _measure_cpu(step, rss)
        except torch.cuda.OutOfMemoryError:
            measured[method, pass_name] = (math.nan, math.inf)
            torch.cuda.empty_cache()

    rows = []
    common = {"device": device_name, "dtype": str(dtype).replace("torch.", ""), "n_tokens": n_rows,
              "hidden": hidden_size, "vocab": vocab, "chunk_size": args.chunk_size}
    header = f"{'method':<14}{'pass':<9}{'ms':>11}{'TFLOP/s':>10}{'peak MiB':>11}{'vs twin':>9}{'vs peers':>10}"
    print(f"\n{device_name} | N={n_rows} H={hidden_size} V={vocab} {common['dtype']} chunk={args.chunk_size}"
          + (f" | measured GEMM ceiling {ceiling:.0f} TFLOP/s" if ceiling else "")
          + f" | gradients themselves: {grad_mib:.0f} MiB")
    print(header)
    for (method, pass_name), (ms, peak_mib) in measured.items():
        tflops = flops_per_pass[pass_name] / (ms * 1e-3) / 1e12
        twin_ms = measured.get(("torch_twin", pass_name), (math.nan,))[0]
        peers_ms = measured.get(("materialized", pass_name), (math.nan,))[0]
        metrics = {
            "time_ms": ms,
            "tflops": tflops,
            "peak_extra_mib": peak_mib if peak_mib is not None else math.nan,
            "speedup_vs_torch_twin": twin_ms / ms,
            "speedup_vs_materialized": peers_ms / ms,
        }
        if pass_name == "fwd+bwd":
            metrics["grad_mib"] = grad_mib
        if ceiling:
            metrics["fraction_of_gemm_ceiling"] = tflops / ceiling
        rows.extend(
            {**common, "method": method, "pass": pass_name, "metric": k, "value": v} for k, v in metrics.items()
        )
        peak_text = "n/a" if peak_mib is None else f"{peak_mib:.0f}"
        print(f"{method:<14}{pass_name:<9}{ms:>11.3f}{tflops:>10.2f}{peak_text:>11}"
              f"{metrics['speedup_vs_torch_twin']:>8.2f}x{metrics['speedup_vs_materialized']:>9.2f}x")
    if ceiling:
        rows.append({**common, "method": "cublas_gemm", "pass": "ceiling", "metric": "tflops", "value": ceiling})

    out_path = args.out or (RESULTS_PATH.with_name("logprob_quick.csv") if args.quick else RESULTS_PATH)
    bench_common.write_csv(out_path, rows, [*common, "method", "pass", "metric", "value"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
