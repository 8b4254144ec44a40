"""The StePPO loop end to end on a tiny model (one process): every trainable parameter of actor and critic moves,
metrics are finite, a resumed run continues exactly, and a non-finite loss skips the update with a logged reason."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from stepsearch import train as trainer
from stepsearch.config import load_config
from stepsearch.trainer.metrics import read_metrics

TINY = [
    "model.tiny_hidden_size=32", "model.tiny_num_layers=1", "model.tiny_num_heads=2", "model.tiny_num_kv_heads=1",
    "model.tiny_intermediate_size=48", "model.tiny_vocab_size=400",
    "data.synth_num_train=24", "data.synth_num_test=4", "data.max_prompt_tokens=1024",
    "rollout.max_turns=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens_per_turn=12",
    "rollout.max_information_tokens=24", "rollout.max_response_tokens=64",
    "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
    "ppo.actor_lr=1e-3", "ppo.critic_lr=1e-3", "ppo.entropy_coef=0.01",
    "trainer.warm_start_steps=0", "trainer.eval_max_questions=0", "trainer.tensorboard=false",
    "trainer.report=false", "trainer.device=cpu", "deepspeed.enabled='off'",
]
VOLATILE = ("time/", "throughput/")


def tiny_config(tmp_path, *extra: str):
    return load_config("configs/tiny_cpu.yaml", TINY + [f"trainer.output_dir={tmp_path}", *extra])


def build_pipeline(cfg):
    ctx = trainer.setup(cfg)
    data = trainer.prepare_data(ctx)
    retriever = trainer.prepare_retriever(ctx, data)
    tokenizer = trainer.prepare_tokenizer(ctx, data)
    actor_lm = trainer.prepare_policy(ctx, data, retriever, tokenizer)
    models = trainer.build_models(ctx, actor_lm, tokenizer)
    from stepsearch.rollout.segmenter import TagTable

    cursor = trainer.DataCursor(data.train, cfg.data.shuffle_seed, ctx.rank, ctx.world_size)
    return ctx, models, retriever, tokenizer, TagTable.from_tokenizer(tokenizer), cursor


def run_step(pipeline, state):
    ctx, models, retriever, tokenizer, table, cursor = pipeline
    values, details = trainer.train_step(ctx, models, retriever, tokenizer, table, cursor, state)
    state.step += 1
    state.data_position += ctx.cfg.ppo.rollout_batch_size
    return values, details


def trainable(models):
    return {f"{role}.{name}": p.detach().clone() for role, engine in (("actor", models.actor), ("critic", models.critic))
            for name, p in engine.module.named_parameters() if p.requires_grad}


def test_every_trainable_parameter_moves_and_metrics_are_finite(tmp_path):
    pipeline = build_pipeline(tiny_config(tmp_path))
    models = pipeline[1]
    before = trainable(models)
    state = trainer.TrainState()
    for _ in range(2):
        values, details = run_step(pipeline, state)
    after = trainable(models)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters that never changed: {unchanged}"
    assert any(name.startswith("critic.value_head") for name in before)
    reference = dict(models.reference.named_parameters())
    assert all(not p.requires_grad for p in reference.values())
    row = trainer.MetricsLogger(tmp_path / "m", tensorboard=False).log(state.step, values)
    for key in ("reward/outcome", "reward/f1", "reward/em", "reward/key_reward", "reward/info_gain",
                "reward/redundancy", "reward/step_reward", "kl", "loss/policy", "loss/value", "loss/entropy",
                "loss/clip_frac", "loss/approx_kl", "value/explained_variance", "response/length", "response/turns",
                "throughput/tokens_per_s", "time/rollout_s", "time/update_s"):
        assert row[key] is not None and math.isfinite(row[key]), key
    assert row["update/skipped"] == 0
    assert len(details) == 8 and {"gains", "penalties", "step_scores", "outcome"} <= set(details[0])


def test_nan_loss_skips_the_update_with_a_logged_reason(tmp_path, monkeypatch, caplog):
    pipeline = build_pipeline(tiny_config(tmp_path))
    models = pipeline[1]
    original = trainer.advantage_stage

    def poisoned(ctx, experience):
        original(ctx, experience)
        experience.advantages = torch.full_like(experience.advantages, float("nan"))

    monkeypatch.setattr(trainer, "advantage_stage", poisoned)
    before = trainable(models)
    state = trainer.TrainState()
    with caplog.at_level(logging.WARNING, logger="stepsearch.train"):
        values, _ = run_step(pipeline, state)
    assert "update skipped: non-finite loss" in caplog.text
    assert state.skipped_updates == 2  # both mini-batches of the step
    after = trainable(models)
    assert all(torch.equal(before[name], after[name]) for name in before), "a skipped update changed weights"
    assert float(values["update/skipped"]) == 1.0

    monkeypatch.setattr(trainer, "advantage_stage", original)
    run_step(pipeline, state)  # the gradients of the skipped step were discarded: training goes on normally
    moved = trainable(models)
    assert all(torch.isfinite(p).all() for p in moved.values())
    assert any(not torch.equal(after[name], moved[name]) for name in after)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    common = ["trainer.save_every=2", "trainer.keep_checkpoints=1"]
    straight = trainer.train(tiny_config(tmp_path / "a", "trainer.total_steps=4", *common))
    trainer.train(tiny_config(tmp_path / "b", "trainer.total_steps=2", *common))
    resumed = trainer.train(tiny_config(tmp_path / "b", "trainer.total_steps=4", "trainer.resume=auto", *common))

    def stable(rows):
        return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]

    rows_straight, rows_resumed = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4]
    assert stable(rows_resumed) == stable(rows_straight)
    assert (resumed / "final" / "config.json").is_file()
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000004"]
