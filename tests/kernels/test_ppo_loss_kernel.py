"""Tests for the fused PPO loss Triton kernel (`stepsearch.kernels.ppo_loss`), forward and backward.

CPU: the kernels run under the Triton interpreter in one child process (TRITON_INTERPRET=1 set before triton is
imported, never leaking into this process). The parent builds the cases and the upstream gradients, the child runs
forward + backward, the parent compares losses, diagnostics and gradients with the float64 twin. Cases cover every
aggregation mode, actor-only / critic-only calls, dual clip, global normalisers (tensor and number), holes and empty
rows, clamped log-ratios, strided and bf16 inputs, non-unit upstream gradients on all four losses, actor and critic
parts backpropagated in two separate calls (the trainer's pattern), several tiles and chunks (small BLOCK / chunk
overrides), and bitwise-identical reruns. A second child compiles the kernels for sm_90 and checks they do not spill
registers. GPU (`gpu` marker): 2M tokens against the twin.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from kernel_child import (
    assert_no_spills,
    compile_for_hopper,
    compile_sm90,
    non_finite,
    run_interpreter_cases,
    run_interpreter_check,
)

from stepsearch.algo.ppo_loss import PPOLossOutput
from stepsearch.algo.ppo_loss import ppo_loss as twin_ppo_loss

_DIFFERENTIABLE = ("logp", "values", "entropy")


def _make_case(name, batch, length, *, seed, mode="token-mean", parts=("policy", "value", "entropy"),
               dual_clip=3.0, block=None, chunk_len=None, global_counts=None, dtype=torch.float32, strided=False,
               density=0.6, extreme_ratios=False, repeats=1, split_backward=False, non_finite_padding=False):
    generator = torch.Generator().manual_seed(seed)
    width = length + 3 if strided else length

    def randn(scale=1.0):
        return (torch.randn(batch, width, generator=generator) * scale)[:, :length]

    logp = -randn().abs()
    old_logp = logp + randn(0.3)
    if extreme_ratios:
        old_logp[:, ::4] -= 30.0  # log-ratio beyond the +-20 clamp
    mask = torch.rand(batch, length, generator=generator) < density
    if batch > 2:
        mask[1] = False
    case = {
        "name": name, "mode": mode, "dual_clip": dual_clip, "block": block, "chunk_len": chunk_len,
        "repeats": repeats, "split_backward": split_backward, "loss_mask": mask,
        "logp": logp.to(dtype) if "policy" in parts else None,
        "old_logp": old_logp.to(dtype) if "policy" in parts else None,
        "advantages": randn().to(dtype) if "policy" in parts else None,
        "values": randn().to(dtype) if "value" in parts else None,
        "old_values": randn().to(dtype) if "value" in parts else None,
        "returns": randn().to(dtype) if "value" in parts else None,
        "entropy": randn().abs().to(dtype) if "entropy" in parts else None,
        "upstream": torch.randn(4, generator=generator) * 1.5,  # d(.)/d(loss, policy, value, entropy)
        "global_token_count": None, "global_seq_count": None, "non_finite_padding": non_finite_padding,
    }
    if non_finite_padding:  # what a model computes at pads and retrieved tokens may be anything: NaN, +inf, -inf
        padding = ~mask
        for name in ("logp", "old_logp", "advantages", "values", "old_values", "returns", "entropy"):
            if case[name] is not None:
                case[name][padding] = non_finite(int(padding.sum()), case[name].dtype)
    if global_counts == "tensor":
        case["global_token_count"] = torch.tensor(float(mask.sum() * 3 + 1))
        case["global_seq_count"] = torch.tensor(float(mask.any(1).sum() * 2 + 1))
    elif global_counts == "number":
        case["global_token_count"], case["global_seq_count"] = 1000.0, 7
    return case


CASES = [
    _make_case("token_mean_tiles_chunks", 5, 37, seed=0, block=16, chunk_len=16),
    _make_case("seq_sum_one_chunk", 5, 37, seed=1, mode="seq-mean-token-sum"),
    _make_case("seq_mean_chunks_no_dual", 6, 45, seed=2, mode="seq-mean-token-mean", dual_clip=None, block=16,
               chunk_len=32),
    _make_case("actor_only_global_tensor", 4, 33, seed=3, parts=("policy", "entropy"), global_counts="tensor",
               block=16, chunk_len=16),
    _make_case("critic_only_global_number", 4, 33, seed=4, parts=("value",), global_counts="number",
               mode="seq-mean-token-mean", block=16, chunk_len=16),
    _make_case("policy_no_entropy_extreme_ratios", 3, 40, seed=5, parts=("policy",), extreme_ratios=True),
    _make_case("strided_dense", 3, 29, seed=6, strided=True, density=1.0, block=16, chunk_len=16,
               mode="seq-mean-token-sum"),
    _make_case("bf16_inputs", 3, 31, seed=7, dtype=torch.bfloat16),
    _make_case("all_masked", 3, 17, seed=8, density=0.0),
    _make_case("deterministic_repeat", 4, 50, seed=9, block=16, chunk_len=32, repeats=3),
    _make_case("actor_then_critic_backward", 4, 33, seed=10, block=16, chunk_len=16, split_backward=True,
               mode="seq-mean-token-mean"),
    _make_case("non_finite_padding", 4, 37, seed=12, block=16, chunk_len=32, non_finite_padding=True),
]


def _without_padding(case):
    """The case with 0 at every masked-out input: the twin's `torch.where` backward would turn NaN there into NaN
    gradients (0 x NaN), where the kernel must (and the twin would with finite pads) give exactly 0."""
    if not case["non_finite_padding"]:
        return case
    selected = case["loss_mask"]
    return dict(case, **{name: torch.where(selected, case[name], torch.zeros((), dtype=case[name].dtype))
                         for name in ("logp", "old_logp", "advantages", "values", "old_values", "returns", "entropy")
                         if case[name] is not None})


def _settings(case):
    return dict(clip_ratio=0.2, dual_clip=case["dual_clip"], value_clip=0.4, vf_coef=0.7, entropy_coef=0.03,
                loss_agg_mode=case["mode"], global_token_count=case["global_token_count"],
                global_seq_count=case["global_seq_count"])


def _forward_backward(loss_fn, case, dtype=None, **extra):
    """Outputs (7,) and the gradients of the differentiable inputs after backprop of the weighted losses."""
    inputs, leaves = {}, {}
    for name in ("logp", "old_logp", "advantages", "values", "old_values", "returns", "entropy"):
        tensor = case[name]
        if tensor is not None and dtype is not None:
            tensor = tensor.to(dtype)
        if tensor is not None and name in _DIFFERENTIABLE:
            tensor = leaves[name] = tensor.detach().clone().requires_grad_()
            if case["split_backward"]:
                # As from a model: behind the input sits a node with saved tensors, freed by the backward that
                # passes it. The second call must not reach the first model's graph (it would raise).
                tensor = tensor * torch.ones_like(tensor)
        inputs[name] = tensor
    settings = _settings(case)
    if dtype is not None and isinstance(settings["global_token_count"], torch.Tensor):
        settings["global_token_count"] = settings["global_token_count"].to(dtype)
        settings["global_seq_count"] = settings["global_seq_count"].to(dtype)
    out = loss_fn(inputs["logp"], inputs["old_logp"], inputs["advantages"], inputs["values"], inputs["old_values"],
                  inputs["returns"], case["loss_mask"], inputs["entropy"], **settings, **extra)
    upstream = case["upstream"].to(out.loss.dtype)
    result = {"outputs": torch.stack([x.detach() for x in out])}
    if case["split_backward"]:  # the trainer: actor and critic parts backpropagated by two separate calls
        (upstream[1] * out.policy_loss + upstream[3] * out.entropy_loss).backward()
        assert leaves["values"].grad is None, "the actor's backward must not reach the critic"
        (upstream[2] * out.value_loss).backward()
    else:
        weighted = sum(g * value for g, value in zip(upstream, out[:4]) if value.requires_grad)
        if isinstance(weighted, torch.Tensor):
            weighted.backward()
    for name, leaf in leaves.items():
        result[f"grad_{name}"] = leaf.grad
    return result


def _kink_tokens(case, reference, shift=1e-6):
    """(B, T) bool: tokens whose float64 gradient (`reference`: the twin's `_forward_backward` in float64) changes
    branch when `logp` or `values` moves by +-`shift`.

    The clipped objectives have kinks (ratio at 1 - eps, 1 + eps or the dual-clip bound; |values - old_values| at
    the value clip; the switch between clipped and unclipped value loss), where the gradient jumps. A token within
    rounding of one takes either branch: a GPU's fp32 `exp` rounds differently from float64, and at millions of
    tokens about one token lands on the other side, an O(1) error in its gradient that says nothing about the
    kernel. Away from the kinks a shift of 1e-6 moves a gradient by at most ~2e-7 of the largest one (its slope
    is at most 1 / token count times the input scale); a branch change moves it by all of itself, and one below
    1e-6 of the largest gradient is within the comparison's tolerance whichever branch it takes."""
    kinks = torch.zeros_like(case["loss_mask"])
    for name in ("logp", "values"):
        if case[name] is None:
            continue
        for sign in (1.0, -1.0):
            moved = dict(case, **{name: case[name].double() + sign * shift})
            grad = _forward_backward(twin_ppo_loss, moved, dtype=torch.float64)[f"grad_{name}"]
            kinks |= (grad - reference[f"grad_{name}"]).abs() > 1e-6 * reference[f"grad_{name}"].abs().max()
    return kinks & case["loss_mask"]


def test_kink_tokens_are_the_ones_on_a_clip_bound():
    case = _make_case("kinks", 2, 8, seed=11, dual_clip=3.0)
    case["loss_mask"][:] = True
    case["advantages"][:] = 1.0
    case["old_logp"] = case["logp"] - torch.log(torch.tensor(1.1))  # ratio 1.1: inside the clip range
    case["old_logp"][0, 3] = case["logp"][0, 3] - torch.log(torch.tensor(1.2, dtype=torch.float64)).float()
    case["advantages"][1, 5] = -1.0
    case["old_logp"][1, 5] = case["logp"][1, 5] - torch.log(torch.tensor(3.0, dtype=torch.float64)).float()
    case["returns"] = case["old_values"] + 10.0  # the unclipped value loss is always the larger one ...
    case["values"] = case["old_values"] + 0.1
    case["values"][1, 2] = case["old_values"][1, 2] + 0.4  # ... except its gradient stops at the value clip
    expected = torch.zeros(2, 8, dtype=torch.bool)
    expected[0, 3] = expected[1, 5] = expected[1, 2] = True
    assert torch.equal(_kink_tokens(case, _forward_backward(twin_ppo_loss, case, dtype=torch.float64)), expected)


def _run_kernel(kernels, case):
    return [_forward_backward(kernels.ppo_loss, case, _block=case["block"], _chunk_len=case["chunk_len"])
            for _ in range(case["repeats"])]


def _interpreter_main(inputs_path: str, outputs_path: str) -> None:
    """Child-process entry point: run every case under the Triton interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from stepsearch.kernels import ppo_loss as kernels

    cases = torch.load(inputs_path, weights_only=True)
    torch.save({case["name"]: _run_kernel(kernels, case) for case in cases}, outputs_path)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    return run_interpreter_cases(__file__, CASES, tmp_path_factory.mktemp("ppo_interpreter"), timeout=600)


def _assert_close(got, want, tolerance, what, floor=1e-6):
    """Relative error below `tolerance`, measured against max(|want|, floor)."""
    scale = want.abs().max().clamp(min=floor)
    error = ((got.double() - want).abs().max() / scale).item()
    assert error < tolerance, f"{what}: relative error {error:.3g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_interpreter_matches_float64_twin(interpreter_results, case):
    (result, *repeats) = interpreter_results[case["name"]]
    reference = _forward_backward(twin_ppo_loss, _without_padding(case), dtype=torch.float64)
    low_precision = case["logp"] is not None and case["logp"].dtype == torch.bfloat16
    tolerance = 1e-2 if low_precision else 1e-5  # bf16 gradients are rounded to bf16 (2^-8) on the way out
    for index, field in enumerate(PPOLossOutput._fields):
        # Means of O(1) token terms can cancel to near 0 (fp32 sums then carry ~1e-7 absolute error): floor 1.
        _assert_close(result["outputs"][index], reference["outputs"][index], 1e-5, field, floor=1.0)
    assert result["outputs"].dtype == torch.float32
    for name in _DIFFERENTIABLE:
        key = f"grad_{name}"
        assert (key in result) == (key in reference), key
        if key in reference:
            assert result[key].dtype == case[name].dtype, key
            _assert_close(result[key], reference[key], tolerance, key)
            assert result[key][case["loss_mask"] == 0].eq(0).all(), key
    for repeat in repeats:  # fixed-order reductions, no atomics: bitwise identical
        for key, value in result.items():
            assert torch.equal(value, repeat[key]), key


def test_all_masked_batch_is_zero_not_nan(interpreter_results):
    (result,) = interpreter_results["all_masked"]
    assert result["outputs"].eq(0).all()
    assert all(result[f"grad_{name}"].eq(0).all() for name in _DIFFERENTIABLE)


def _compile_for_hopper_main() -> None:
    """Child-process entry point: compile the three kernels for sm_90 (no GPU needed: Triton's bundled ptxas)."""
    from stepsearch.kernels import ppo_loss as kernels
    from stepsearch.kernels.launch import launch_options

    float_args = frozenset({"clip_low", "clip_high", "dual_clip", "value_clip", "global_tokens", "global_seqs",
                            "vf_coef", "entropy_coef"})
    variants = [
        (kernels._ppo_fwd_kernel, dict(HAS_POLICY=True, HAS_VALUE=True, HAS_ENTROPY=True, DUAL_CLIP=True,
                                       BLOCK=kernels._GPU_BLOCK)),
        (kernels._ppo_fwd_kernel, dict(HAS_POLICY=False, HAS_VALUE=True, HAS_ENTROPY=False, DUAL_CLIP=False,
                                       BLOCK=kernels._GPU_BLOCK)),
        (kernels._ppo_finalize_kernel, dict(MODE=2, GLOBAL_TOKENS=2, GLOBAL_SEQS=1,
                                            BLOCK_ROWS=kernels._FINALIZE_BLOCK_ROWS)),
        (kernels._ppo_bwd_kernel, dict(HAS_POLICY=True, HAS_VALUE=True, HAS_ENTROPY=True, BLOCK=kernels._GPU_BLOCK)),
    ]
    for kernel, constants in variants:
        # At the benchmark shape (512 x 4096) every row stride, T and the chunk length are multiples of 16.
        aligned = frozenset(name for name in kernel.arg_names if name.startswith("stride_")) | {"length", "chunk_len"}
        compile_sm90(kernel, constants, label=f"{kernel.__name__} {sorted(k for k, v in constants.items() if v)}",
                     options=launch_options(), pointer_types={"mask_ptr": "*u8"}, float_args=float_args,
                     aligned_ints=aligned)


def test_kernels_compile_for_hopper_without_spills():
    """Compile (not run) the fwd / finalize / bwd kernels for sm_90: none may spill."""
    assert_no_spills(compile_for_hopper(__file__, timeout=600), expected_count=4)


def _buffers_freed_main() -> None:
    """Child-process entry point: whether each call's buffers (the saved local derivatives) are freed as soon as its
    outputs are dropped, with the cyclic collector off: after a forward only, after `loss.backward()`, and after the
    trainer's two backward calls through non-leaf inputs. Prints one `<pattern> freed=<bool>` line per pattern."""
    import gc
    import weakref

    from stepsearch.kernels.ppo_loss import ppo_loss

    gc.disable()
    case = _make_case("buffers", 3, 40, seed=4)
    settings = dict(clip_ratio=0.2, value_clip=0.2, vf_coef=0.5, entropy_coef=0.01)

    def run(pattern):
        logp = case["logp"].clone().requires_grad_()
        values = case["values"].clone().requires_grad_()
        entropy = case["entropy"].clone().requires_grad_()
        out = ppo_loss(logp * 1.0, case["old_logp"], case["advantages"], values * 1.0, case["old_values"],
                       case["returns"], case["loss_mask"], entropy * 1.0, **settings)
        buffer = weakref.ref(out.loss.grad_fn.saved.dpolicy)
        if pattern == "loss_backward":
            out.loss.backward()
        elif pattern == "split_backward":
            (out.policy_loss - 0.01 * out.entropy_loss).backward()
            out.value_loss.backward()
        del out
        return buffer() is None

    for pattern in ("forward", "loss_backward", "split_backward"):
        print(f"{pattern} freed={run(pattern)}")


def test_buffers_are_freed_with_the_outputs():
    """No reference cycle through the autograd nodes: one would keep two (B, T) fp32 buffers of every call alive
    for good (the cyclic collector cannot see into the nodes), a leak of GPU memory on every micro-batch."""
    lines = run_interpreter_check(__file__, "--buffers-freed", timeout=300)
    assert lines[-3:] == ["forward freed=True", "loss_backward freed=True", "split_backward freed=True"]


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_gpu_two_million_tokens_match_float64_twin(mode):
    from stepsearch.kernels import ppo_loss as kernels

    case = _make_case("gpu", 512, 4096, seed=10, mode=mode)
    case = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    result = _forward_backward(kernels.ppo_loss, case)
    reference = _forward_backward(twin_ppo_loss, case, dtype=torch.float64)
    for index, field in enumerate(PPOLossOutput._fields):
        _assert_close(result["outputs"][index], reference["outputs"][index], 1e-5, field, floor=1.0)
    smooth = ~_kink_tokens(case, reference)
    assert (~smooth).sum() <= 1e-4 * smooth.numel(), f"{int((~smooth).sum())} tokens on a kink"
    for name in _DIFFERENTIABLE:
        _assert_close(result[f"grad_{name}"][smooth], reference[f"grad_{name}"][smooth], 1e-5, name)
    assert torch.equal(_forward_backward(kernels.ppo_loss, case)["outputs"], result["outputs"])


if __name__ == "__main__":
    if sys.argv[1:] == ["--compile-for-hopper"]:
        _compile_for_hopper_main()
    elif sys.argv[1:] == ["--buffers-freed"]:
        _buffers_freed_main()
    else:
        _interpreter_main(*sys.argv[1:])
