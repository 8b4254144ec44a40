"""`model.packing=true` trains exactly as padded: on one real rollout of the toy run, the scoring stage gives the same
log-probs and values, GAE the same advantages and returns, and the PPO update the same losses and gradients (to
fp32 rounding), for a token mean and a per-sequence mean; and a packed run takes full steps end to end."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from stepsearch import train as trainer
from stepsearch.trainer.build import build_run
from stepsearch.trainer.metrics import StepMetrics

# One mini-batch of four micro-batches: gradients accumulate over micro-batches, and one optimiser step follows.
TOY_TRAINING = [
    "ppo.entropy_coef=0.01",
    "ppo.mini_batch_size=8",
    "trainer.warm_start_steps=0",
    "trainer.eval_max_questions=0",
    "trainer.report=false",
    "deepspeed.enabled='off'",
]


def ragged(rollout, lengths: list[int], pad_id: int):
    """The rollout with response b cut to lengths[b] tokens and a retrieved-looking block (loss mask 0) inside the
    longest ones: an untrained toy policy writes every response to the same budget, a searching policy does not."""
    keep = torch.arange(rollout.response_ids.shape[1]) < torch.tensor(lengths)[:, None]  # (B, T)
    loss_mask = rollout.loss_mask * keep
    loss_mask[keep.sum(dim=1) > 8, 3:6] = 0
    step_ends = torch.where(rollout.step_ends < torch.tensor(lengths)[:, None], rollout.step_ends, -1)
    return dataclasses.replace(
        rollout,
        response_ids=torch.where(keep, rollout.response_ids, pad_id),
        response_mask=rollout.response_mask * keep,
        loss_mask=loss_mask,
        step_ends=step_ends,
    )


def one_update(run, rollout, sequences, rewards, packing: bool):
    """Scores, advantages, the gradients the optimiser steps with, and the update's loss metrics."""
    ctx, models = run.ctx, run.models
    ctx.cfg.model.packing = packing
    scores = trainer.score_tokens_stage(ctx, models, sequences, rollout.loss_mask)
    advantages = trainer.advantage_stage(ctx, rollout, scores, rewards)
    experience = trainer.experience_of(ctx, sequences, rollout.loss_mask, scores, advantages)
    assert (experience.token_offsets is not None) == packing
    gradients = {}
    for role in ("actor", "critic"):
        engine = getattr(models, role)
        step = engine.step

        def record_then_step(engine=engine, step=step, role=role):
            for name, parameter in engine.module.named_parameters():
                if parameter.grad is not None:
                    gradients[f"{role}.{name}"] = parameter.grad.detach().clone()
            return step()

        engine.step = record_then_step
    metrics = StepMetrics()
    try:
        assert trainer.update_stage(ctx, models, experience, 0, metrics) == 0
    finally:
        del models.actor.step, models.critic.step
    losses = {name: float(value) for name, value in metrics.means().items() if name.startswith("loss/")}
    return scores, advantages, gradients, losses


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_packed_scoring_and_update_equal_padded(tmp_path, toy_config, loss_agg_mode):
    run = build_run(toy_config(tmp_path, *TOY_TRAINING, f"ppo.loss_agg_mode={loss_agg_mode}"))
    ctx, models = run.ctx, run.models
    records = run.cursor.take(0, ctx.cfg.ppo.rollout_batch_size)
    rollout = trainer.rollout_stage(ctx, models, run.retriever, run.tokenizer, run.tag_table, records, 0)
    rewards = trainer.reward_stage(ctx, rollout, records, StepMetrics())
    assert rollout.response_mask.sum(dim=1).min() >= 12
    rollout = ragged(rollout, [12, 2, 12, 1, 9, 12, 3, 10], run.tokenizer.pad_token_id)
    sequences = trainer.segment_stage(rollout, run.tokenizer)
    start = [
        (engine, copy.deepcopy(engine.module.state_dict()), copy.deepcopy(engine.optimizer.state_dict()))
        for engine in (models.actor, models.critic)
    ]
    padded = one_update(run, rollout, sequences, rewards, packing=False)
    for engine, weights, optimizer in start:
        engine.module.load_state_dict(weights)
        engine.optimizer.load_state_dict(optimizer)
    packed = one_update(run, rollout, sequences, rewards, packing=True)

    mask = rollout.loss_mask.bool()
    for name in ("old_logp", "ref_logp", "values"):
        want, got = getattr(padded[0], name), getattr(packed[0], name)
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5, msg=name)
    for name in ("advantages", "returns", "token_rewards"):
        want, got = getattr(padded[1], name), getattr(packed[1], name)
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-5, msg=name)
    assert padded[2].keys() == packed[2].keys() and any(name.startswith("actor.") for name in padded[2])
    for name, want in padded[2].items():
        torch.testing.assert_close(packed[2][name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert padded[3].keys() == packed[3].keys() and "loss/policy" in padded[3]
    for name, want in padded[3].items():
        assert math.isclose(packed[3][name], want, rel_tol=1e-4, abs_tol=1e-6), (name, packed[3][name], want)


def test_a_packed_run_takes_full_steps(tmp_path, toy_config):
    run = build_run(toy_config(tmp_path, *TOY_TRAINING, "model.packing=true"))
    values, _ = trainer.train_step(run)
    for key in ("loss/policy", "loss/value", "kl", "value/explained_variance", "time/update_s"):
        assert math.isfinite(float(values[key])), key
    assert float(values["update/skipped"]) == 0
