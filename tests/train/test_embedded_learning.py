"""The embedded default's claim at toy size: a warm start on demonstrations from the warm-start region of the world
answers held-out questions, and a few StePPO steps move the outcome reward (both in the default CPU set).

One module-scoped run builds the toy world, tokenizer and warm-started policy; the tests share it. The held-out
questions' entities never occur in the demonstrations (`data.synth_num_warm_start` draws them from another region).
"""

from __future__ import annotations

import pytest
import torch

from stepsearch import train as trainer
from stepsearch.eval import evaluate
from stepsearch.trainer.build import build_run

WARM_TOY = (
    "model.tiny_hidden_size=64",
    "model.tiny_num_layers=2",
    "model.tiny_num_heads=4",
    "model.tiny_num_kv_heads=2",
    "model.tiny_intermediate_size=128",
    "model.tiny_vocab_size=700",
    "data.synth_num_train=8",
    "data.synth_num_test=40",
    "data.synth_num_warm_start=500",
    "rollout.max_turns=2",
    "rollout.samples_per_prompt=8",
    "rollout.max_new_tokens_per_turn=48",
    "rollout.max_information_tokens=80",
    "rollout.max_response_tokens=320",
    "trainer.warm_start_steps=200",
    "trainer.warm_start_lr=1e-2",
    "trainer.warm_start_batch_size=16",
    "trainer.warm_start_reading_weight=0.5",
    "trainer.warm_start_question_first=true",
    "trainer.warm_start_detour_prob=0.0",
    "trainer.eval_max_questions=0",
    "trainer.report=false",
    "ppo.rollout_batch_size=4",
    "ppo.mini_batch_size=16",
    "ppo.micro_batch_size=16",
    "ppo.actor_lr=2e-3",
    "ppo.critic_lr=3e-3",
    "deepspeed.enabled='off'",
)


@pytest.fixture(scope="module")
def warm_run(tmp_path_factory, toy_config):
    torch.manual_seed(0)
    return build_run(toy_config(tmp_path_factory.mktemp("embedded"), *WARM_TOY))


def test_the_warm_started_policy_answers_held_out_two_hop_questions(warm_run):
    cfg = warm_run.ctx.cfg
    two_hop = [r for r in warm_run.data.tests["test"] if r.hops == 2]
    assert len(two_hop) >= 10
    result = evaluate(
        warm_run.models.rollout,
        warm_run.retriever,
        warm_run.tokenizer,
        {"test": two_hop},
        cfg.rollout,
        cfg.retriever.topk,
        progress=False,
        reward_cfg=cfg.reward,
    )
    scores = result.datasets["test"]
    assert scores.valid_format_rate >= 0.8
    assert scores.em > 0 and scores.f1 >= 0.1, (scores.em, scores.f1)


def test_a_few_steppo_steps_raise_the_outcome_reward(warm_run):
    outcomes = []
    for _ in range(6):
        values, _ = trainer.train_step(warm_run)
        warm_run.state.step += 1  # the 8 training questions come round again every two steps
        warm_run.state.data_position += warm_run.ctx.cfg.ppo.rollout_batch_size
        outcomes.append(float(values["reward/outcome"]))
    first, last = sum(outcomes[:2]) / 2, sum(outcomes[-2:]) / 2
    assert last > first, outcomes
