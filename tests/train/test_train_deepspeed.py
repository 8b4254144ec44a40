"""Two-process DeepSpeed ZeRO-3 on CPU (gloo) through the deepspeed launcher: the trainer runs, checkpoints every
rank's shards, resumes, and its metrics are finite; the rollout engine gets the gathered actor weights."""
from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from stepsearch.trainer.run_dir import read_metrics

pytestmark = pytest.mark.distributed

DEEPSPEED_RUN = ["ppo.actor_lr=1e-3", "ppo.critic_lr=1e-3", "trainer.warm_start_steps=2",
                 "trainer.eval_max_questions=2", "trainer.save_every=1", "trainer.keep_checkpoints=1"]


LAUNCH_HANG_GUARD_S = 600  # a hang guard, not a speed limit: one launch takes ~1 min on a quiet 2-core machine


def launch(tmp_path, toy_overrides: list[str], steps: int, *extra: str,
           env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    launcher = shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher is not installed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env_extra or {}))
    command = [launcher, "--num_gpus", "2", "--master_port", str(29600 + os.getpid() % 300), "stepsearch/train.py",
               "--config", "configs/tiny_cpu.yaml", *toy_overrides, *DEEPSPEED_RUN, f"trainer.output_dir={tmp_path}",
               f"trainer.total_steps={steps}", *extra]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_HANG_GUARD_S)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.mark.timeout(2 * LAUNCH_HANG_GUARD_S + 1200)  # two launches, and the comm op's first build (conftest)
def test_zero3_two_ranks_train_checkpoint_and_resume(tmp_path, toy_overrides, deepspeed_cpu_comm_op):
    launch(tmp_path, toy_overrides, steps=2)
    run_dir = tmp_path / "tiny_cpu"
    checkpoint = run_dir / "checkpoints" / "step_00000002"
    shards = sorted(p.name for p in (checkpoint / "actor" / "ds").iterdir())
    assert any("rank_0" in name for name in shards) and any("rank_1" in name for name in shards)
    assert (checkpoint / "state_rank00001.pt").is_file()

    result = launch(tmp_path, toy_overrides, steps=3)
    assert "resumed from" in result.stdout + result.stderr
    rows = read_metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:
        for key in ("loss/policy", "loss/value", "kl", "grad_norm/actor", "grad_norm/critic", "reward/outcome"):
            assert row[key] is not None and math.isfinite(row[key]), (row["step"], key)
        assert row["update/skipped"] == 0
    assert (run_dir / "eval_after" / "results.json").is_file()
    assert (run_dir / "final" / "config.json").is_file() and (run_dir / "report" / "index.html").is_file()

    # The exported model is the rollout copy, refreshed from the gathered ZeRO-3 actor before every rollout: it
    # must differ from the warm start it was copied from.
    final = load_file(run_dir / "final" / "model.safetensors")
    initial = load_file(run_dir / "warm_start" / "model.safetensors")
    assert final.keys() == initial.keys()
    assert any(not torch.equal(final[k], initial[k]) for k in final)


@pytest.mark.timeout(LAUNCH_HANG_GUARD_S + 1200)
def test_zero3_two_ranks_on_the_triton_kernels(tmp_path, toy_overrides, deepspeed_cpu_comm_op):
    """The GPU path's code on CPU: ZeRO-3 (packed rows, the LM head gathered for the fused log-prob kernel) with every
    Triton kernel under the interpreter, the actor and critic backpropagated by their own engines, and as in the GPU
    presets DeepSpeed's bf16 mode and activation checkpointing (the partitioned layers gathered again for the
    recompute)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    launch(tmp_path, toy_overrides, 2, "kernels.impl=triton", "trainer.report=false", "model.dtype=bfloat16",
           "model.gradient_checkpointing=true", env_extra={"TRITON_INTERPRET": "1"})
    rows = read_metrics(tmp_path / "tiny_cpu")
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        for key in ("loss/policy", "loss/value", "kl", "grad_norm/actor", "grad_norm/critic"):
            assert row[key] is not None and math.isfinite(row[key]), (row["step"], key)
        assert row["update/skipped"] == 0
    assert rows[-1]["grad_norm/actor"] > 0 and rows[-1]["grad_norm/critic"] > 0
