"""The StePPO loop end to end on a tiny model (one process): every trainable parameter of actor and critic moves,
metrics are finite, a resumed run continues exactly, and a non-finite loss skips the update with a logged reason."""
from __future__ import annotations

import html
import logging
import math
from dataclasses import replace

import torch

from stepsearch import experiment
from stepsearch import train as trainer
from stepsearch.trainer.build import build_run
from stepsearch.trainer.metrics import MetricsLogger
from stepsearch.trainer.run_dir import read_eval, read_metrics, read_timings, read_trajectories

TOY_TRAINING = ["ppo.actor_lr=1e-3", "ppo.critic_lr=1e-3", "ppo.entropy_coef=0.01", "trainer.warm_start_steps=0",
                "trainer.eval_max_questions=0", "trainer.report=false", "deepspeed.enabled='off'"]
VOLATILE = ("time/", "throughput/")


def run_step(run):
    values, details = trainer.train_step(run)
    run.state.step += 1
    run.state.data_position += run.ctx.cfg.ppo.rollout_batch_size
    return values, details


def trainable(models):
    engines = (("actor", models.actor), ("critic", models.critic))
    return {f"{role}.{name}": p.detach().clone() for role, engine in engines
            for name, p in engine.module.named_parameters() if p.requires_grad}


def test_every_trainable_parameter_moves_and_metrics_are_finite(tmp_path, toy_config):
    run = build_run(toy_config(tmp_path, *TOY_TRAINING))
    models = run.models
    before = trainable(models)
    for _ in range(2):
        values, details = run_step(run)
    after = trainable(models)
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters that never changed: {unchanged}"
    assert any(name.startswith("critic.value_head") for name in before)
    reference = dict(models.reference.named_parameters())
    assert all(not p.requires_grad for p in reference.values())
    row = MetricsLogger(tmp_path / "m", tensorboard=False).log(run.state.step, values)
    for key in ("reward/outcome", "reward/f1", "reward/em", "reward/key_reward", "reward/info_gain",
                "reward/redundancy", "reward/step_reward", "kl", "loss/policy", "loss/value", "loss/entropy",
                "loss/clip_frac", "loss/approx_kl", "value/explained_variance", "response/length", "response/turns",
                "throughput/tokens_per_s", "time/rollout_s", "time/update_s"):
        assert row[key] is not None and math.isfinite(row[key]), key
    assert row["update/skipped"] == 0
    # one process: the HF rollout engine samples from the actor itself, so its log-probs are the actor's
    assert 0 <= row["rollout/logp_mismatch"] < 1e-4, row["rollout/logp_mismatch"]
    assert len(details) == 8 and {"gains", "penalties", "step_scores", "outcome"} <= set(details[0])


def test_nan_loss_skips_the_update_with_a_logged_reason(tmp_path, monkeypatch, caplog, toy_config):
    run = build_run(toy_config(tmp_path, *TOY_TRAINING))
    models = run.models
    original = trainer.advantage_stage

    def poisoned(ctx, rollout, scores, rewards):
        result = original(ctx, rollout, scores, rewards)
        return replace(result, advantages=torch.full_like(result.advantages, float("nan")))

    monkeypatch.setattr(trainer, "advantage_stage", poisoned)
    before = trainable(models)
    with caplog.at_level(logging.WARNING, logger="stepsearch.train"):
        values, _ = run_step(run)
    assert "update skipped: non-finite loss" in caplog.text
    assert run.state.skipped_updates == 2  # both mini-batches of the step
    after = trainable(models)
    assert all(torch.equal(before[name], after[name]) for name in before), "a skipped update changed weights"
    assert float(values["update/skipped"]) == 1.0

    monkeypatch.setattr(trainer, "advantage_stage", original)
    run_step(run)  # the gradients of the skipped step were discarded: training goes on normally
    moved = trainable(models)
    assert all(torch.isfinite(p).all() for p in moved.values())
    assert any(not torch.equal(after[name], moved[name]) for name in after)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, toy_config):
    common = [*TOY_TRAINING, "trainer.save_every=2", "trainer.keep_checkpoints=1"]
    straight = trainer.train(toy_config(tmp_path / "a", "trainer.total_steps=4", *common))
    trainer.train(toy_config(tmp_path / "b", "trainer.total_steps=2", *common))
    resumed = trainer.train(toy_config(tmp_path / "b", "trainer.total_steps=4", "trainer.resume=auto", *common))

    def stable(rows):
        return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]

    rows_straight, rows_resumed = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4]
    assert stable(rows_resumed) == stable(rows_straight)
    assert (resumed / "final" / "config.json").is_file()
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000004"]


def test_resume_after_a_crash_mid_write_drops_the_torn_last_lines(tmp_path, toy_config):
    """A crash while appending leaves a torn last line in metrics.jsonl and trajectories.jsonl; resuming truncates
    both after the checkpoint's step and continues (the ablation's reader and the report read them too)."""
    common = [*TOY_TRAINING, "trainer.save_every=1", "trainer.keep_checkpoints=1"]
    run_dir = trainer.train(toy_config(tmp_path, "trainer.total_steps=1", *common))
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": 2, "kl": 0.0')
    with open(run_dir / "trajectories.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": 2, "question": "Who')
    assert [row["step"] for row in experiment.read_metrics(run_dir)] == [1]
    assert {row["step"] for row in read_trajectories(run_dir)} == {1}

    trainer.train(toy_config(tmp_path, "trainer.total_steps=2", "trainer.resume=auto", *common))
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2]
    assert sorted({row["step"] for row in read_trajectories(run_dir)}) == [1, 2]
    assert all(line.endswith("}") for line in (run_dir / "trajectories.jsonl").read_text().splitlines())


def test_the_report_the_trainer_writes_shows_its_own_metrics_evaluations_and_trajectories(tmp_path, toy_config):
    run_dir = trainer.train(toy_config(tmp_path, *TOY_TRAINING, "trainer.total_steps=2", "trainer.report=true",
                                       "trainer.eval_max_questions=2"))
    text = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert (run_dir / "report" / "metrics.png").read_bytes().startswith(b"\x89PNG")
    assert "<h1>StepSearch run: tiny_cpu</h1>" in text and "Notes" not in text
    rows = read_metrics(run_dir)
    assert "2 metric rows, steps 1–2." in text
    for column in ("reward/outcome", "loss/policy", "loss/value", "kl", "response/length"):
        assert f"<td>{column}</td>" in text, column
    # the summary's first/last column of the policy loss are the logged values
    policy = [row["loss/policy"] for row in rows]
    assert f"<td>loss/policy</td><td>{policy[0]:.4g}</td><td>{policy[1]:.4g}</td>" in text
    # the before/after table from eval_before/ and eval_after/, the test file's dataset and its average
    before, after = read_eval(run_dir, "before"), read_eval(run_dir, "after")
    assert "<td>test</td><td>em</td>" in text and "<td>average</td><td>f1</td>" in text
    assert before["datasets"]["test"]["num_questions"] == after["datasets"]["test"]["num_questions"] == 2
    # both steps' trajectories, as logged
    trajectories = read_trajectories(run_dir)
    assert "Step 1</h3>" in text and "Step 2</h3>" in text
    for row in trajectories:
        assert html.escape(row["question"], quote=True) in text
    assert len(trajectories) == 2 * 8
    # where the time went: every stage of the job, timed, and the learning curve with held-out F1 before and after
    timings = read_timings(run_dir)
    assert list(timings)[:6] == ["setup", "data", "retriever", "tokenizer", "warm_start", "models"]
    assert {"eval_before", "steppo", "eval_after", "export", "report"} <= set(timings)
    assert all(seconds >= 0 for seconds in timings.values())
    assert "Where the time went" in text and "<td>steppo</td>" in text and "<td>time/rollout_s</td>" in text
    assert (run_dir / "report" / "learning_curve.png").read_bytes().startswith(b"\x89PNG")


def test_advantage_placement_separates_search_ends_from_the_last_token():
    advantages = torch.tensor([[1.0, -2.0, 3.0, 0.5, 9.0], [4.0, 0.0, -1.0, 7.0, 7.0]])  # (B, T)
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0, 0.0]])  # padding and a retrieved token
    step_ends = torch.tensor([[1, -1], [-1, -1]])  # row 0 closed a search at token 1; row 1 never searched
    placement = trainer.advantage_placement(advantages, step_ends, mask)
    assert placement["advantage/abs_at_search_end"].item() == 2.0
    assert placement["advantage/abs_at_last_token"].item() == (0.5 + 1.0) / 2  # last generated token of each row
    assert math.isclose(placement["advantage/abs_all_tokens"].item(), (1 + 2 + 3 + 0.5 + 4 + 1) / 6, rel_tol=1e-6)
    none = trainer.advantage_placement(advantages, torch.full((2, 1), -1), mask)
    assert none["advantage/abs_at_search_end"].item() == 0.0  # present on every rank, even without a step
