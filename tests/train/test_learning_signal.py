"""StePPO moves the outcome reward: after a few updates on one rollout batch of a toy policy briefly warm-started
on its own training questions, the policy puts more probability on the trajectories that scored well.

The expected outcome reward of the updated policy on the batch is estimated by self-normalised importance
sampling over the trajectories the old policy sampled: weight w_b proportional to pi_new(tau_b) / pi_old(tau_b),
E_new[R] ~ sum_b w_b R_b. Unlike the mean reward of a fresh rollout, this does not depend on sampling luck, so
the test can demand an increase.
"""

from __future__ import annotations

import torch

from stepsearch import train as trainer
from stepsearch.trainer.build import build_run
from stepsearch.trainer.metrics import StepMetrics

WARM_STARTED_TOY = [
    "data.synth_num_warm_start=0",
    "trainer.warm_start_steps=150",
    "trainer.warm_start_first_turn_steps=0",
    "trainer.warm_start_lr=1e-2",
    # the restated question and no answer slips, unlike the preset: taught the preset's demonstrations, this
    # 150-step toy policy scored -1 (invalid format) in 12 of the batch's 16 trajectories and -0.88 to -0.97 in the
    # rest, outcomes too alike to learn from
    "trainer.warm_start_restate_question=true",
    "trainer.warm_start_bridge_answer_prob=0",
    "trainer.eval_max_questions=0",
    "trainer.report=false",
    "deepspeed.enabled='off'",
    "ppo.rollout_batch_size=8",
    "ppo.mini_batch_size=16",
    "ppo.micro_batch_size=16",
    "ppo.ppo_epochs=3",
    "ppo.actor_lr=3e-3",
    # room for a whole answer: the toy turn budget cuts every answer short
    "model.tiny_hidden_size=64",
    "model.tiny_intermediate_size=96",
    "rollout.max_new_tokens_per_turn=96",
    "rollout.max_information_tokens=32",
    "rollout.max_response_tokens=320",
]


def sequence_logp(scores, mask: torch.Tensor) -> torch.Tensor:
    return (scores.old_logp * mask).sum(dim=1)  # (B,)


def test_a_few_steppo_updates_raise_the_expected_outcome_reward_on_their_batch(tmp_path, toy_config):
    run = build_run(toy_config(tmp_path, *WARM_STARTED_TOY))
    ctx, models, cfg = run.ctx, run.models, run.ctx.cfg
    records = run.cursor.take(0, cfg.ppo.rollout_batch_size)
    rollout = trainer.rollout_stage(ctx, models, run.retriever, run.tokenizer, run.tag_table, records, step=0)
    sequences = trainer.segment_stage(rollout, run.tokenizer)
    mask = rollout.loss_mask.to(ctx.device)
    before = trainer.score_tokens_stage(ctx, models, sequences, rollout.loss_mask)
    rewards = trainer.reward_stage(ctx, rollout, records, StepMetrics())
    outcome = rewards.outcome.to(ctx.device)  # (B,)
    assert outcome.std() > 0.1, f"the toy policy's outcomes do not differ, nothing to learn from: {outcome.tolist()}"

    advantages = trainer.advantage_stage(ctx, rollout, before, rewards)
    experience = trainer.experience_of(ctx, sequences, rollout.loss_mask, before, advantages)
    assert trainer.update_stage(ctx, models, experience, 0, StepMetrics()) == 0
    after = trainer.score_tokens_stage(ctx, models, sequences, rollout.loss_mask)

    weights = torch.softmax(sequence_logp(after, mask) - sequence_logp(before, mask), dim=0)  # (B,)
    expected_after = (weights * outcome).sum().item()
    expected_before = outcome.mean().item()
    assert expected_after > expected_before + 0.05, (expected_before, expected_after, outcome.tolist())
