"""stepsearch.ops: the implementation switch (config, environment override, device) and dispatch to the twins."""

from __future__ import annotations

import pytest
import torch

from stepsearch import ops
from stepsearch.algo.gae import compute_gae, scatter_rewards_and_gae
from stepsearch.algo.logprob import logprob_entropy
from stepsearch.algo.ppo_loss import ppo_loss


@pytest.fixture(autouse=True)
def _restore_switch(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield
    ops.configure("auto")


def test_auto_runs_the_twins_on_cpu():
    assert ops.current_impl() == "auto"
    assert ops.backend_for(torch.zeros(1)) == "torch"


def test_configure_and_environment_override(monkeypatch):
    ops.configure("torch")
    assert ops.current_impl() == "torch"
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    assert ops.current_impl() == "triton"
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        ops.backend_for(torch.zeros(1))
    monkeypatch.setenv(ops.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="STEPSEARCH_KERNELS"):
        ops.current_impl()
    with pytest.raises(ValueError, match="kernels.impl"):
        ops.configure("fast")


def test_dispatch_matches_the_twins():
    generator = torch.Generator().manual_seed(0)
    batch, length = 3, 11
    rewards, values = torch.randn(batch, length, generator=generator), torch.randn(batch, length, generator=generator)
    mask = torch.rand(batch, length, generator=generator) < 0.7
    for got, want in zip(ops.compute_gae(rewards, values, mask, 0.99, 0.95),
                         compute_gae(rewards, values, mask, 0.99, 0.95)):
        assert torch.equal(got, want)
    args = (torch.randn(batch, generator=generator), torch.randn(batch, 1, generator=generator),
            torch.tensor([[3], [-1], [0]]), rewards, values, values, mask, 0.1, 1.0, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(ops.scatter_rewards_and_gae(*args, return_rewards=True),
                                                  scatter_rewards_and_gae(*args, return_rewards=True)))
    settings = dict(clip_ratio=0.2, value_clip=0.5, vf_coef=1.0, entropy_coef=0.0)
    tensors = (rewards, values, rewards, values, rewards, values, mask)
    assert all(torch.equal(a, b) for a, b in zip(ops.ppo_loss(*tensors, **settings), ppo_loss(*tensors, **settings)))
    actor = ops.policy_loss(rewards, values, rewards, mask, clip_ratio=0.2)
    critic = ops.value_loss(values, rewards, values, mask, value_clip=0.5)
    assert torch.allclose(actor.loss + critic.loss, ppo_loss(*tensors, **settings).loss)
    hidden, weight = torch.randn(5, 8, generator=generator), torch.randn(13, 8, generator=generator)
    targets = torch.randint(0, 13, (5,), generator=generator)
    for got, want in zip(ops.logprob_entropy(hidden, weight, targets, chunk_size=4),
                         logprob_entropy(hidden, weight, targets, chunk_size=4)):
        assert torch.equal(got, want)
