"""Tests for the pure-torch log-prob + entropy twin (`stepsearch.algo.logprob`) against a float64 referee."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepsearch.algo.logprob import logprob_entropy, logprob_entropy_materialized


def _make_inputs(n_rows, hidden_size, vocab, *, dtype=torch.float32, seed=0, logit_scale=0.5):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, hidden_size, generator=generator).to(dtype)  # (N, H)
    weight = (torch.randn(vocab, hidden_size, generator=generator) * logit_scale).to(dtype)  # (V, H)
    targets = torch.randint(0, vocab, (n_rows,), generator=generator)  # (N,)
    if n_rows >= 2:
        targets[0], targets[1] = 0, vocab - 1  # vocabulary edges
    grad_logp = torch.randn(n_rows, generator=generator)  # (N,) non-unit upstream gradients
    grad_entropy = torch.randn(n_rows, generator=generator)  # (N,)
    return hidden, weight, targets, grad_logp, grad_entropy


def _forward_backward(fn, hidden, weight, targets, grad_logp, grad_entropy, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logp, entropy = fn(hidden, weight, targets, **kwargs)
    loss = (logp * grad_logp.to(logp.dtype)).sum() + (entropy * grad_entropy.to(entropy.dtype)).sum()
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return logp.detach(), entropy.detach(), grad_hidden, grad_weight


def _float64_reference(hidden, weight, targets, grad_logp, grad_entropy, temperature=1.0):
    return _forward_backward(
        logprob_entropy_materialized, hidden.double(), weight.double(), targets, grad_logp.double(),
        grad_entropy.double(), temperature=temperature,
    )


def _max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_size", [1, 64, 300, 4096])
def test_fp32_twin_matches_float64_reference(chunk_size, temperature):
    inputs = _make_inputs(37, 48, 300)
    ours = _forward_backward(logprob_entropy, *inputs, chunk_size=chunk_size, temperature=temperature)
    reference = _float64_reference(*inputs, temperature=temperature)
    for name, actual, expected in zip(("logp", "entropy", "grad_hidden", "grad_weight"), ours, reference):
        assert actual.dtype == (torch.float32 if name in ("logp", "entropy") else inputs[0].dtype)
        assert _max_relative_error(actual, expected) < 1e-5, name


def test_float64_twin_passes_gradcheck_with_both_outputs():
    hidden, weight, targets, _, _ = _make_inputs(5, 6, 23, dtype=torch.float64, seed=3)
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: logprob_entropy(h, w, targets, chunk_size=7, temperature=0.9), (hidden, weight)
    )


def test_bf16_twin_within_issue_tolerances():
    inputs = _make_inputs(37, 64, 500, dtype=torch.bfloat16, seed=1)
    logp, entropy, grad_hidden, grad_weight = _forward_backward(logprob_entropy, *inputs, chunk_size=128)
    ref_logp, ref_entropy, ref_grad_hidden, ref_grad_weight = _float64_reference(*inputs)
    assert (logp.double() - ref_logp).abs().max() < 1e-3
    assert (entropy.double() - ref_entropy).abs().max() < 5e-3
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    assert _max_relative_error(grad_hidden, ref_grad_hidden) < 1e-2
    assert _max_relative_error(grad_weight, ref_grad_weight) < 1e-2


@pytest.mark.parametrize("logit_scale", [0.01, 0.5, 30.0])
def test_logp_and_entropy_bounds(logit_scale):
    vocab = 257
    hidden, weight, targets, _, _ = _make_inputs(40, 32, vocab, logit_scale=logit_scale, seed=2)
    logp, entropy = logprob_entropy(hidden, weight, targets, chunk_size=50)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    assert (logp <= 0).all()
    assert (entropy >= 0).all()
    # Near-uniform rows sit within fp32 rounding of log V.
    assert (entropy <= math.log(vocab) * (1 + 1e-6)).all()


def test_peaked_distribution_keeps_entropy_accurate():
    """Logits in the hundreds: lse - E[z] would lose everything below the logits' ulp (~1.5e-5 at 200).

    Keeping the statistics relative to the running max makes near-one-hot rows come out as tiny non-negative
    entropies instead of rounding noise of either sign.
    """
    inputs = _make_inputs(16, 32, 300, logit_scale=40.0, seed=4)
    logp, entropy, _, _ = _forward_backward(logprob_entropy, *inputs, chunk_size=64)
    ref_logp, ref_entropy, _, _ = _float64_reference(*inputs)
    assert (entropy >= 0).all()
    assert (entropy.double() - ref_entropy).abs().max() < 5e-5  # a few ulps of the fp32 logits
    near_one_hot = ref_entropy < 1e-8
    assert near_one_hot.sum() >= 4
    assert (entropy[near_one_hot] < 1e-7).all()
    assert (logp.double() - ref_logp).abs().max() < 1e-3 * ref_logp.abs().max()


def test_single_output_gradients_and_frozen_weight():
    hidden, weight, targets, _, grad_entropy = _make_inputs(9, 16, 40, dtype=torch.float64, seed=5)
    hidden.requires_grad_()
    _, entropy = logprob_entropy(hidden, weight, targets, chunk_size=16)
    (grad_hidden,) = torch.autograd.grad((entropy * grad_entropy.double()).sum(), (hidden,))
    ref_hidden = hidden.detach().clone().requires_grad_()
    _, ref_entropy = logprob_entropy_materialized(ref_hidden, weight, targets)
    (ref_grad,) = torch.autograd.grad((ref_entropy * grad_entropy.double()).sum(), (ref_hidden,))
    torch.testing.assert_close(grad_hidden, ref_grad)


def test_empty_rows():
    hidden, weight, targets, grad_logp, grad_entropy = _make_inputs(0, 8, 20)
    logp, entropy, grad_hidden, grad_weight = _forward_backward(
        logprob_entropy, hidden, weight, targets, grad_logp, grad_entropy
    )
    assert logp.shape == entropy.shape == (0,)
    assert grad_hidden.shape == (0, 8)
    assert (grad_weight == 0).all()


def test_never_saves_vocabulary_sized_activations():
    """Backward recomputes logits: the graph holds only the inputs and (N,) statistics, never (N, V)."""
    n_rows, hidden_size, vocab = 33, 16, 1000
    hidden, weight, targets, _, _ = _make_inputs(n_rows, hidden_size, vocab)
    hidden.requires_grad_()
    saved_numel = []

    def pack(tensor):
        saved_numel.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logprob_entropy(hidden, weight, targets, chunk_size=128)
    assert max(saved_numel) <= vocab * hidden_size
    assert sum(saved_numel) <= n_rows * hidden_size + vocab * hidden_size + 3 * n_rows


@settings(max_examples=25, deadline=None)
@given(
    n_rows=st.integers(1, 12),
    hidden_size=st.integers(1, 9),
    vocab=st.integers(1, 70),
    chunk_size=st.integers(1, 80),
    temperature=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**16),
)
def test_twin_matches_materialized_for_any_shape(n_rows, hidden_size, vocab, chunk_size, temperature, seed):
    inputs = _make_inputs(n_rows, hidden_size, vocab, dtype=torch.float64, seed=seed, logit_scale=2.0)
    ours = _forward_backward(logprob_entropy, *inputs, chunk_size=chunk_size, temperature=temperature)
    reference = _float64_reference(*inputs, temperature=temperature)
    for actual, expected in zip(ours, reference):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("hidden_shape", "weight_shape", "targets", "kwargs", "message"),
    [
        ((4, 8), (10, 7), [0, 1, 2, 3], {}, "hidden size mismatch"),
        ((4, 8), (10, 8), [0, 1, 2], {}, "targets must be"),
        ((4, 8), (10, 8), [0, 1, 2, 10], {}, r"targets must lie in \[0, 10\)"),
        ((4, 8), (10, 8), [0, 1, 2, -1], {}, r"targets must lie in \[0, 10\)"),
        ((4, 8), (10, 8), [0, 1, 2, 3], {"temperature": 0.0}, "temperature must be"),
        ((4, 8), (10, 8), [0, 1, 2, 3], {"chunk_size": 0}, "chunk_size must be"),
        ((4, 8, 1), (10, 8), [0, 1, 2, 3], {}, r"hidden must be \(N, H\)"),
        ((4, 8), (0, 8), [0, 1, 2, 3], {}, "empty vocabulary"),
    ],
)
def test_bad_inputs_raise_clear_errors(hidden_shape, weight_shape, targets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        logprob_entropy(torch.zeros(hidden_shape), torch.zeros(weight_shape), torch.tensor(targets), **kwargs)


def test_dtype_mismatch_is_rejected():
    with pytest.raises(ValueError, match="must match"):
        logprob_entropy(torch.zeros(2, 4), torch.zeros(5, 4, dtype=torch.bfloat16), torch.tensor([0, 1]))
