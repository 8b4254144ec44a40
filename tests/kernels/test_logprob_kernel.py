"""Tests for the fused log-prob + entropy Triton kernel (`stepsearch.kernels.logprob`).

CPU: the kernel runs under the Triton interpreter in one child process (TRITON_INTERPRET=1 must be set before
triton is imported, and must not leak into the rest of the suite). The parent builds the inputs, the child runs
the kernel forward and backward on them, and the parent checks the results against a float64 referee.
A second child compiles both kernels for sm_90 in every autotune config with Triton's bundled ptxas, so GPU
compile errors and register spills (read with the bundled cuobjdump) surface on CPU.
GPU (`gpu` marker): Qwen2.5-3B-like shapes against the float64 referee and the twin, in this process.
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from kernel_child import assert_no_spills, compile_for_hopper, compile_sm90, run_interpreter_cases

from stepsearch.algo.logprob import logprob_entropy as twin_logprob_entropy
from stepsearch.algo.logprob import logprob_entropy_materialized


def _make_case(name, n_rows, hidden_size, vocab, *, dtype, chunk_size, temperature=1.0, seed=0, logit_scale=0.4,
               hidden_grad=True, weight_grad=True, repeats=1, bad_target=False):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (n_rows,), generator=generator)  # (N,)
    if n_rows >= 2:
        targets[0], targets[1] = 0, vocab - 1  # vocabulary edges
    if bad_target:
        targets[2] = vocab
    return {
        "name": name,
        "hidden": torch.randn(n_rows, hidden_size, generator=generator).to(dtype),  # (N, H)
        "weight": (torch.randn(vocab, hidden_size, generator=generator) * logit_scale).to(dtype),  # (V, H)
        "targets": targets,
        "grad_logp": torch.randn(n_rows, generator=generator) * 1.7,  # (N,) non-unit upstream gradients
        "grad_entropy": torch.randn(n_rows, generator=generator) * 0.6,  # (N,)
        "chunk_size": chunk_size,
        "temperature": temperature,
        "hidden_grad": hidden_grad,
        "weight_grad": weight_grad,
        "repeats": repeats,
    }


def _run_case(logprob_entropy, case):
    """Forward + backward of one case; returns a dict of detached results (one per repeat)."""
    runs = []
    for _ in range(case["repeats"]):
        hidden = case["hidden"].clone().requires_grad_(case["hidden_grad"])
        weight = case["weight"].clone().requires_grad_(case["weight_grad"])
        logp, entropy = logprob_entropy(
            hidden, weight, case["targets"], chunk_size=case["chunk_size"], temperature=case["temperature"]
        )
        result = {"logp": logp.detach(), "entropy": entropy.detach()}
        inputs = [t for t in (hidden, weight) if t.requires_grad]
        if inputs:
            loss = (logp * case["grad_logp"].to(logp.device)).sum() + (
                entropy * case["grad_entropy"].to(entropy.device)
            ).sum()
            grads = torch.autograd.grad(loss, inputs)
            names = [n for n, t in (("grad_hidden", hidden), ("grad_weight", weight)) if t.requires_grad]
            result.update(zip(names, (g.detach() for g in grads)))
        runs.append(result)
    return runs


def _reference(case):
    """Float64 referee on the same (possibly bf16-rounded) input values."""
    hidden = case["hidden"].double().requires_grad_()
    weight = case["weight"].double().requires_grad_()
    logp, entropy = logprob_entropy_materialized(
        hidden, weight, case["targets"].clamp(0, weight.shape[0] - 1), temperature=case["temperature"]
    )
    loss = (logp * case["grad_logp"].double()).sum() + (entropy * case["grad_entropy"].double()).sum()
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return {"logp": logp.detach(), "entropy": entropy.detach(), "grad_hidden": grad_hidden, "grad_weight": grad_weight}


def _max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected.cpu()).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


INTERPRETER_CASES = [
    _make_case("fp32", 37, 48, 300, dtype=torch.float32, chunk_size=64, repeats=2),
    _make_case("fp32_temperature_odd_chunk", 37, 48, 300, dtype=torch.float32, chunk_size=100, temperature=0.7,
               seed=1),
    _make_case("bf16", 37, 48, 300, dtype=torch.bfloat16, chunk_size=64, seed=2),
    _make_case("fp32_frozen_weight_bad_target", 19, 40, 77, dtype=torch.float32, chunk_size=32, seed=3,
               weight_grad=False, bad_target=True),
]


def _interpreter_main(inputs_path: str, outputs_path: str) -> None:
    """Child-process entry point: run every case with the Triton kernel under the interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from stepsearch.kernels.logprob import logprob_entropy

    cases = torch.load(inputs_path, weights_only=True)
    torch.save({case["name"]: _run_case(logprob_entropy, case) for case in cases}, outputs_path)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    return run_interpreter_cases(__file__, INTERPRETER_CASES, tmp_path_factory.mktemp("logprob_interpreter"),
                                 timeout=300)


def _check_bounds(result, vocab):
    finite = torch.isfinite(result["logp"])
    assert (result["logp"][finite] <= 0).all()
    assert (result["entropy"] >= 0).all()
    assert (result["entropy"] <= math.log(vocab) * (1 + 1e-6)).all()


@pytest.mark.parametrize("case", [c for c in INTERPRETER_CASES if c["hidden"].dtype == torch.float32],
                         ids=lambda c: c["name"])
def test_interpreter_fp32_matches_float64(interpreter_results, case):
    (result, *repeats) = interpreter_results[case["name"]]
    reference = _reference(case)
    valid = case["targets"] < case["weight"].shape[0]
    assert _max_relative_error(result["logp"][valid], reference["logp"][valid]) < 1e-5
    assert _max_relative_error(result["entropy"], reference["entropy"]) < 1e-5
    if "grad_hidden" in result:
        assert result["grad_hidden"].dtype == torch.float32
        assert _max_relative_error(result["grad_hidden"][valid], reference["grad_hidden"][valid]) < 1e-5
    if "grad_weight" in result:
        assert result["grad_weight"].dtype == torch.float32
        assert _max_relative_error(result["grad_weight"], reference["grad_weight"]) < 1e-5
    _check_bounds(result, case["weight"].shape[0])
    for repeat in repeats:  # no atomics: bitwise identical reruns
        for name, value in result.items():
            assert torch.equal(value, repeat[name]), name


def test_interpreter_bf16_within_issue_tolerances(interpreter_results):
    case = next(c for c in INTERPRETER_CASES if c["name"] == "bf16")
    (result,) = interpreter_results["bf16"]
    reference = _reference(case)
    assert result["logp"].dtype == result["entropy"].dtype == torch.float32
    assert (result["logp"].double() - reference["logp"]).abs().max() < 1e-3
    assert (result["entropy"].double() - reference["entropy"]).abs().max() < 5e-3
    assert result["grad_hidden"].dtype == result["grad_weight"].dtype == torch.bfloat16
    assert _max_relative_error(result["grad_hidden"], reference["grad_hidden"]) < 2e-2
    assert _max_relative_error(result["grad_weight"], reference["grad_weight"]) < 2e-2
    _check_bounds(result, case["weight"].shape[0])


def test_interpreter_out_of_range_target_gives_nan_not_a_wrong_number(interpreter_results):
    case = next(c for c in INTERPRETER_CASES if c["name"] == "fp32_frozen_weight_bad_target")
    (result,) = interpreter_results[case["name"]]
    bad = case["targets"] >= case["weight"].shape[0]
    assert bad.sum() == 1
    assert torch.isnan(result["logp"][bad]).all()
    assert torch.isfinite(result["logp"][~bad]).all()
    assert "grad_weight" not in result and "grad_hidden" in result


def _compile_for_hopper_main() -> None:
    """Child-process entry point: compile both kernels for sm_90 in every autotune config of each dtype."""
    from stepsearch.kernels import logprob as kernels

    # H = 2048 and V = 151936 (Qwen2.5-3B) and the 4096-column chunks are multiples of 16.
    aligned = frozenset({"stride_h", "stride_w", "stride_d", "hidden_size", "vocab", "split_cols", "col_begin",
                         "col_end"})
    for dtype, precision, configs in (("bf16", "tf32", kernels._TENSOR_CORE_CONFIGS),
                                      ("fp32", "ieee", kernels._FP32_CONFIGS)):
        pointer_types = {"targets_ptr": "*i64", "hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}",
                         "dlogits_ptr": f"*{dtype}"}
        for config in configs:
            tiles = "x".join(str(config.kwargs[name]) for name in ("BLOCK_N", "BLOCK_V", "BLOCK_H"))
            for autotuned in (kernels._fwd_kernel, kernels._dlogits_kernel):
                compile_sm90(
                    autotuned.fn, dict(config.kwargs, DOT_PRECISION=precision, UPCAST_DOT_OPERANDS=False),
                    label=f"{autotuned.fn.__name__} {dtype} {tiles}/w{config.num_warps}",
                    options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                    pointer_types=pointer_types, float_args=frozenset({"inv_temp"}), aligned_ints=aligned,
                )


def test_kernels_compile_for_hopper_without_spills():
    """Compile (not run) both kernels for sm_90 in every autotune config (5 bf16, 3 fp32): none may spill."""
    lines = compile_for_hopper(__file__, timeout=600)
    assert_no_spills(lines, expected_count=2 * (5 + 3))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n_rows", [1, 1000, 4096])
def test_gpu_bf16_qwen_shapes_match_float64(n_rows):
    from stepsearch.kernels.logprob import logprob_entropy

    case = _make_case("gpu_bf16", n_rows, 2048, 151936, dtype=torch.bfloat16, chunk_size=4096, seed=7,
                      logit_scale=0.05, temperature=0.9)
    device_case = dict(case, hidden=case["hidden"].cuda(), weight=case["weight"].cuda(),
                       targets=case["targets"].cuda(), grad_logp=case["grad_logp"].cuda(),
                       grad_entropy=case["grad_entropy"].cuda(), repeats=2)
    (result, repeat) = _run_case(logprob_entropy, device_case)
    reference = _reference({k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()})
    assert (result["logp"].double() - reference["logp"]).abs().max() < 1e-3
    assert (result["entropy"].double() - reference["entropy"]).abs().max() < 5e-3
    assert _max_relative_error(result["grad_hidden"], reference["grad_hidden"]) < 2e-2
    assert _max_relative_error(result["grad_weight"], reference["grad_weight"]) < 2e-2
    _check_bounds(result, 151936)
    for name, value in result.items():
        assert torch.equal(value, repeat[name]), name


@pytest.mark.gpu
@gpu
def test_gpu_fp32_matches_float64_and_twin():
    from stepsearch.kernels.logprob import logprob_entropy

    case = _make_case("gpu_fp32", 513, 1024, 32003, dtype=torch.float32, chunk_size=4096, seed=8, logit_scale=0.1)
    device_case = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    (result,) = _run_case(logprob_entropy, device_case)
    (twin,) = _run_case(twin_logprob_entropy, device_case)
    reference = _reference(device_case)
    for name in ("logp", "entropy", "grad_hidden", "grad_weight"):
        assert _max_relative_error(result[name], reference[name]) < 1e-5, name
        assert _max_relative_error(twin[name], reference[name]) < 1e-4, name


if __name__ == "__main__":
    if sys.argv[1:] == ["--compile-for-hopper"]:
        _compile_for_hopper_main()
    else:
        _interpreter_main(sys.argv[1], sys.argv[2])
