"""Tests for the fused reward scatter + KL + GAE Triton kernel (`stepsearch.kernels.gae`).

CPU: the kernels run under the Triton interpreter in one child process (TRITON_INTERPRET=1 must be set before triton
is imported and must not leak into the rest of the suite). The parent builds the cases, the child runs the kernels,
the parent compares with the float64 twin (relative error < 1e-5, masked-out outputs exactly 0). Small BLOCK / chunk
overrides make the tiny shapes cross several tiles and chunks, so the carried state and the chunk-summary path are
both exercised. A second child compiles every kernel variant for sm_90 with Triton's bundled ptxas, so GPU compile
errors and register spills (read with the bundled cuobjdump) surface without a GPU. GPU (`gpu` marker): full shapes
against the twin.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from kernel_child import assert_no_spills, compile_for_hopper, compile_sm90, non_finite, run_interpreter_cases

from stepsearch.algo.gae import compute_gae as twin_compute_gae
from stepsearch.algo.gae import scatter_rewards_and_gae as twin_scatter_rewards_and_gae
from stepsearch.algo.kl import K3_CLAMP, LOG_RATIO_CLAMP


def _make_case(name, batch, length, *, fused, seed, density=0.6, gamma=0.99, lam=0.95, num_steps=3, kl_coef=0.1,
               kl_estimator="k1", block=None, chunk_len=None, mask_dtype=torch.bool, values_dtype=torch.float32,
               strided=False, out_of_range_end=False, extreme_log_ratios=False, non_finite_padding=False):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=generator) < density  # (B, T) holes everywhere
    if batch > 2:
        mask[1] = False  # an empty row
    width = length + 5 if strided else length

    def randn():
        wide = torch.randn(batch, width, generator=generator)
        return wide[:, :length]  # a row stride != T when strided

    step_ends = torch.randint(-1, max(length, 1), (batch, num_steps), generator=generator)  # (B, S)
    if batch and num_steps >= 2 and length:
        step_ends[0, 1] = step_ends[0, 0]  # two steps on one token
    if out_of_range_end:
        step_ends[-1, -1] = length + 3
    case = {
        "name": name, "fused": fused, "gamma": gamma, "lam": lam, "block": block, "chunk_len": chunk_len,
        "loss_mask": mask.to(mask_dtype), "values": randn().to(values_dtype),
        "token_rewards": randn(),
        "outcome": torch.randn(batch, generator=generator),
        "step_scores": torch.randn(batch, num_steps, generator=generator),
        "step_ends": step_ends, "kl_coef": kl_coef, "kl_estimator": kl_estimator,
        "old_logp": -torch.rand(batch, width, generator=generator)[:, :length] * 3 if kl_coef else None,
        "ref_logp": -torch.rand(batch, width, generator=generator)[:, :length] * 3 if kl_coef else None,
    }
    if non_finite_padding:  # a critic's values at pads and retrieved tokens may be anything: NaN, +inf, -inf
        padding = ~mask
        case["values"][padding] = non_finite(int(padding.sum()), values_dtype)
    if extreme_log_ratios:  # log-ratios of +40 and -40 (beyond the log-ratio clamp) and +15 (beyond k3's clamp)
        case["ref_logp"][:, 0::4] -= 40.0
        case["old_logp"][:, 1::4] -= 40.0
        case["ref_logp"][:, 2::4] -= 15.0
    return case


CASES = [
    _make_case("gae_one_chunk", 5, 37, fused=False, seed=0),
    _make_case("gae_tiles_and_chunks", 5, 37, fused=False, seed=1, block=8, chunk_len=16),
    _make_case("gae_chunk_per_tile_gamma_lam_one", 4, 41, fused=False, seed=2, gamma=1.0, lam=1.0, block=8,
               chunk_len=8),
    _make_case("gae_strided_bf16_values_float_mask", 3, 30, fused=False, seed=3, block=16, chunk_len=16,
               strided=True, values_dtype=torch.bfloat16, mask_dtype=torch.float32),
    _make_case("gae_dense_lam_zero", 2, 19, fused=False, seed=4, density=1.0, lam=0.0, block=8, chunk_len=16),
    _make_case("fused_k1_chunks", 5, 37, fused=True, seed=5, block=8, chunk_len=24),
    _make_case("fused_k3_one_chunk", 4, 45, fused=True, seed=6, kl_estimator="k3", gamma=0.9, lam=0.7),
    _make_case("fused_k2_strided_int_mask", 3, 33, fused=True, seed=7, kl_estimator="k2", block=8, chunk_len=8,
               strided=True, mask_dtype=torch.int32),
    _make_case("fused_no_kl_sparse", 4, 29, fused=True, seed=8, kl_coef=0.0, density=0.15, block=8, chunk_len=16),
    _make_case("fused_out_of_range_end_ignored", 3, 21, fused=True, seed=9, out_of_range_end=True, block=8,
               chunk_len=8),
    _make_case("fused_single_token", 1, 1, fused=True, seed=10, density=1.0, num_steps=1),
    _make_case("fused_int32_ends_no_steps", 3, 17, fused=True, seed=11, num_steps=0),
    _make_case("gae_empty_length", 2, 0, fused=False, seed=12),
    _make_case("fused_k1_log_ratio_clamped", 3, 27, fused=True, seed=13, extreme_log_ratios=True, block=8,
               chunk_len=16),
    _make_case("fused_k3_both_clamps", 3, 27, fused=True, seed=14, kl_estimator="k3", extreme_log_ratios=True),
    _make_case("fused_non_finite_padding", 4, 37, fused=True, seed=15, block=8, chunk_len=16,
               non_finite_padding=True),
    _make_case("gae_non_finite_padding", 4, 37, fused=False, seed=16, block=8, chunk_len=24,
               non_finite_padding=True),
]
for _case in CASES:
    if _case["name"] == "fused_int32_ends_no_steps":
        _case["step_ends"] = _case["step_ends"].int()


def _run_kernel(kernels, case):
    plan = {"block": case["block"], "chunk_len": case["chunk_len"]}
    if case["fused"]:
        advantages, returns, rewards = kernels._launch(
            case["values"], case["loss_mask"], case["gamma"], case["lam"], outcome=case["outcome"],
            step_scores=case["step_scores"], step_ends=case["step_ends"], old_logp=case["old_logp"],
            ref_logp=case["ref_logp"], kl_coef=case["kl_coef"], kl_estimator=case["kl_estimator"],
            return_rewards=True, **plan)
        public = kernels.scatter_rewards_and_gae(
            case["outcome"], case["step_scores"], case["step_ends"], case["old_logp"], case["ref_logp"],
            case["values"], case["loss_mask"], case["kl_coef"], case["gamma"], case["lam"], case["kl_estimator"])
        return {"advantages": advantages, "returns": returns, "token_rewards": rewards,
                "public_advantages": public.advantages, "public_rewards": public.token_rewards}
    advantages, returns, _ = kernels._launch(case["values"], case["loss_mask"], case["gamma"], case["lam"],
                                             token_rewards=case["token_rewards"], **plan)
    public_advantages, _ = kernels.compute_gae(case["token_rewards"], case["values"], case["loss_mask"],
                                               case["gamma"], case["lam"])
    return {"advantages": advantages, "returns": returns, "public_advantages": public_advantages}


def _reference(case):
    """Float64 twin; out-of-range step ends (ignored by the kernel) become 'no step' for the twin, and masked-out
    values 0 (the twin ignores them too, but computes with them: a NaN there would reach its masked-out outputs)."""
    double = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in case.items()}
    double["values"] = torch.where(case["loss_mask"] != 0, double["values"], 0.0)
    if case["fused"]:
        length = case["loss_mask"].shape[1]
        step_ends = torch.where(case["step_ends"] < length, case["step_ends"], -1)
        result = twin_scatter_rewards_and_gae(
            double["outcome"], double["step_scores"], step_ends, double["old_logp"], double["ref_logp"],
            double["values"], case["loss_mask"], case["kl_coef"], case["gamma"], case["lam"], case["kl_estimator"],
            return_rewards=True)
        return {"advantages": result.advantages, "returns": result.returns, "token_rewards": result.token_rewards}
    advantages, returns = twin_compute_gae(double["token_rewards"], double["values"], case["loss_mask"],
                                           case["gamma"], case["lam"])
    return {"advantages": advantages, "returns": returns}


def _max_relative_error(got, want):
    if want.numel() == 0:
        return 0.0
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def _interpreter_main(inputs_path: str, outputs_path: str) -> None:
    """Child-process entry point: run every case under the Triton interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from stepsearch.kernels import gae as kernels

    cases = torch.load(inputs_path, weights_only=True)
    torch.save({case["name"]: _run_kernel(kernels, case) for case in cases}, outputs_path)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    return run_interpreter_cases(__file__, CASES, tmp_path_factory.mktemp("gae_interpreter"), timeout=600)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["name"])
def test_interpreter_matches_float64_twin(interpreter_results, case):
    result = interpreter_results[case["name"]]
    reference = _reference(case)
    masked_out = case["loss_mask"] == 0
    for name, want in reference.items():
        got = result[name]
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert _max_relative_error(got, want) < 1e-5, name
        assert got[masked_out].eq(0).all(), name
    # The public functions run the default launch plan; same numbers up to the scan order.
    assert _max_relative_error(result["public_advantages"], reference["advantages"]) < 1e-5
    if case["fused"]:
        assert result["public_rewards"] is None


def test_clamp_cases_reach_the_clamps_of_algo_kl(interpreter_results):
    """The clamp cases hold log-ratios beyond LOG_RATIO_CLAMP and k3 values beyond K3_CLAMP on generated tokens, and
    the kernel's KL penalty there is -kl_coef * the clamp (tokens without a step end or the outcome)."""
    for name, estimator in (("fused_k1_log_ratio_clamped", "k1"), ("fused_k3_both_clamps", "k3")):
        case = next(c for c in CASES if c["name"] == name)
        mask = case["loss_mask"].bool()
        log_ratio = (case["old_logp"] - case["ref_logp"]).double()
        beyond = mask & (log_ratio.abs() > LOG_RATIO_CLAMP)
        assert beyond.any(), name
        rewards = interpreter_results[name]["token_rewards"].double()
        placed = torch.zeros_like(mask)  # tokens that also carry a step score or the outcome
        for row in range(mask.shape[0]):
            ends = [e for e in case["step_ends"][row].tolist() if 0 <= e < mask.shape[1]]
            placed[row, ends] = True
            generated = mask[row].nonzero()
            if len(generated):
                placed[row, generated[-1]] = True
        plain = beyond & ~placed
        assert plain.any(), name
        clamp = torch.where(log_ratio > 0, LOG_RATIO_CLAMP, -LOG_RATIO_CLAMP).double()
        kl = clamp if estimator == "k1" else torch.full_like(clamp, K3_CLAMP)  # k3 at |x| = 20 exceeds K3_CLAMP
        torch.testing.assert_close(rewards[plain], -case["kl_coef"] * kl[plain], rtol=1e-6, atol=1e-6)
        if estimator == "k3":
            inside = mask & (log_ratio.abs() < LOG_RATIO_CLAMP) & (log_ratio > 10) & ~placed
            assert inside.any()  # +15: only k3's own clamp applies
            torch.testing.assert_close(rewards[inside], torch.full_like(rewards[inside], -case["kl_coef"] * K3_CLAMP),
                                       rtol=1e-6, atol=1e-6)


def test_masked_out_garbage_does_not_leak(interpreter_results):
    """Values and rewards at masked positions never reach the outputs (cases hold random numbers there)."""
    case = next(c for c in CASES if c["name"] == "gae_tiles_and_chunks")
    masked_values = case["values"].clone()
    masked_values[case["loss_mask"] == 0] = 1e6
    reference = twin_compute_gae(case["token_rewards"].double(), masked_values.double(), case["loss_mask"],
                                 case["gamma"], case["lam"])
    assert _max_relative_error(interpreter_results[case["name"]]["advantages"], reference[0]) < 1e-5


def _compile_for_hopper_main() -> None:
    """Child-process entry point: compile every kernel variant for sm_90 (no GPU needed: Triton's bundled ptxas)."""
    from stepsearch.kernels import gae as kernels
    from stepsearch.kernels.launch import launch_options

    # At the benchmark shape (512 x 4096) every row stride, T and the chunk length are multiples of 16.
    aligned = frozenset({"stride_rewards", "stride_values", "stride_mask", "stride_old", "stride_ref", "length",
                         "chunk_len"})
    for kernel, extra in ((kernels._gae_summary_kernel, {}), (kernels._gae_chunk_kernel, {"STORE_REWARDS": True})):
        for fused, has_kl, estimator in ((False, False, 1), (True, True, 1), (True, True, 3), (True, False, 2)):
            constants = dict(FUSED=fused, HAS_KL=has_kl, KL_ESTIMATOR=estimator, BLOCK=kernels._GPU_BLOCK, STEPS=8,
                             ROW=kernels._ROW, **extra)
            compile_sm90(kernel, constants, label=f"{kernel.__name__} fused={fused} kl={has_kl}/{estimator}",
                         options=launch_options(),
                         pointer_types={"mask_ptr": "*u8", "step_ends_ptr": "*i64", "values_ptr": "*bf16"},
                         float_args=frozenset({"kl_coef", "gamma", "gamma_lam"}), aligned_ints=aligned)


def test_kernels_compile_for_hopper_without_spills():
    """Compile (not run) both kernels in every flag combination for sm_90: none may spill."""
    assert_no_spills(compile_for_hopper(__file__, timeout=600), expected_count=8)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
# The short rows take small tiles (64 and 256 tokens: 16 and 64 rows of a tile for 128 threads).
@pytest.mark.parametrize("batch, length", [(512, 4096), (4, 32768), (3, 1000), (5, 37), (7, 200)])
def test_gpu_full_shapes_match_float64_twin(batch, length):
    from stepsearch.kernels import gae as kernels

    case = _make_case("gpu", batch, length, fused=True, seed=13, num_steps=4, kl_estimator="k3")
    case = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    result = kernels.scatter_rewards_and_gae(
        case["outcome"], case["step_scores"], case["step_ends"], case["old_logp"], case["ref_logp"], case["values"],
        case["loss_mask"], case["kl_coef"], case["gamma"], case["lam"], case["kl_estimator"], return_rewards=True)
    reference = _reference(case)
    for name in ("advantages", "returns", "token_rewards"):
        assert _max_relative_error(getattr(result, name), reference[name]) < 1e-5, name
    advantages, returns = kernels.compute_gae(reference["token_rewards"].float(), case["values"], case["loss_mask"],
                                              case["gamma"], case["lam"])
    assert _max_relative_error(advantages, reference["advantages"]) < 1e-5
    again = kernels.scatter_rewards_and_gae(
        case["outcome"], case["step_scores"], case["step_ends"], case["old_logp"], case["ref_logp"], case["values"],
        case["loss_mask"], case["kl_coef"], case["gamma"], case["lam"], case["kl_estimator"])
    assert torch.equal(again.advantages, result.advantages)  # deterministic: no atomics


if __name__ == "__main__":
    if sys.argv[1:] == ["--compile-for-hopper"]:
        _compile_for_hopper_main()
    else:
        _interpreter_main(*sys.argv[1:])
