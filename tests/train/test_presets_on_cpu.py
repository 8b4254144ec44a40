"""The cluster preset (`configs/stepsearch_qwen2.5_3b.yaml`, which the 7B preset extends) runs end to end on CPU with
only what needs a GPU swapped out: a tiny Qwen2 checkpoint saved with `save_pretrained` in place of Qwen2.5,
transformers' `generate` in place of SGLang, the toy world's BM25 index in place of the retrieval server, one CPU
process in place of the DeepSpeed launcher, and small batches. Everything else is the preset's own: the paper's
prompt template, five search turns, 32 row groups, activation checkpointing, the reward weights and the PPO
settings. The run evaluates before and after, trains, checkpoints and writes its report, through the command users
launch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from stepsearch.config import load_config
from stepsearch.trainer.build import build_run
from stepsearch.trainer.run_dir import read_metrics

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "configs" / "stepsearch_qwen2.5_3b.yaml"
HANG_GUARD_S = 600  # a hang guard, not a speed limit


def test_the_3b_preset_trains_evaluates_and_checkpoints_on_cpu(tmp_path, toy_config):
    # The toy run writes a synthetic world with its BM25 index and a tiny model saved like a real checkpoint.
    build_run(toy_config(tmp_path / "toy", "trainer.warm_start_steps=0", "deepspeed.enabled='off'"))
    checkpoint, world = tmp_path / "toy" / "tiny_cpu" / "initial_policy", tmp_path / "toy" / "tiny_cpu" / "world"
    assert (checkpoint / "config.json").is_file() and (checkpoint / "tokenizer.json").is_file()
    swapped = [
        f"model.actor_path={checkpoint}",
        "rollout.engine=hf",
        "retriever.url=null",
        f"retriever.index_dir={world / 'index-bm25'}",
        f"data.train_path={world / 'train.jsonl'}",
        f"data.test_paths=[{world / 'test.jsonl'}]",
        "trainer.device=cpu",
        "deepspeed.enabled=off",
        f"trainer.output_dir={tmp_path / 'runs'}",
        "trainer.total_steps=1",
        "trainer.save_every=1",
        "trainer.eval_max_questions=2",
        "trainer.tensorboard=false",
        "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=4",
        "ppo.micro_batch_size=2",
    ]
    cfg = load_config(PRESET, swapped)
    assert (cfg.rollout.template, cfg.rollout.max_turns, cfg.rollout.row_groups) == ("paper", 5, 32)
    assert cfg.model.gradient_checkpointing and cfg.model.packing

    environment = dict(os.environ, OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, "-m", "stepsearch.train", "--config", str(PRESET), *swapped],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    run_dir = tmp_path / "runs" / "stepsearch_qwen2.5_3b"
    (row,) = read_metrics(run_dir)
    for key in ("loss/policy", "loss/value", "kl", "grad_norm/actor", "grad_norm/critic", "reward/outcome"):
        assert row[key] is not None and math.isfinite(row[key]), key
    assert row["update/skipped"] == 0 and row["grad_norm/actor"] > 0 and row["grad_norm/critic"] > 0
    assert load_config(run_dir / "config.yaml") == cfg  # the resolved preset is what ran
    for produced in (
        "eval_before/results.json",
        "eval_after/results.json",
        "checkpoints/step_00000001",
        "final/model.safetensors",
        "report/index.html",
    ):
        assert (run_dir / produced).exists(), produced
