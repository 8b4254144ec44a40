"""The trainer with the Triton kernels (`kernels.impl=triton`) at their real call sites, on CPU under the interpreter.

A child process (TRITON_INTERPRET=1 must be set before triton is imported, and must not leak into this process) builds
the toy run twice from the same seed, once with the torch twins and once with the kernels: the fused log-prob and
entropy of the actor and reference, the fused reward scatter + KL + GAE, and the fused PPO loss with the actor and
critic parts backpropagated by separate calls, as on a GPU. The first step's rollout is the same in both, so its
losses and diagnostics agree to fp32 rounding; a second step with the kernels must move every trainable parameter
and leave no more live tensors behind than the first (a call that keeps its buffers would add some every step).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# One process, no warm start, evaluation or report; learning rates that move every parameter within two steps.
TRAINING = (
    "ppo.actor_lr=1e-3",
    "ppo.critic_lr=1e-3",
    "ppo.entropy_coef=0.01",
    "trainer.warm_start_steps=0",
    "trainer.eval_max_questions=0",
    "trainer.report=false",
    "deepspeed.enabled='off'",
)
COMPARED = ("loss/policy", "loss/value", "loss/entropy", "loss/approx_kl", "loss/clip_frac", "kl", "reward/outcome")

_CHILD = """
import gc, json, sys, torch
from stepsearch import train as trainer
from stepsearch.config import load_config
from stepsearch.trainer.build import build_run

preset, out_dir, *overrides = sys.argv[1:]
result = {}
for impl in ("torch", "triton"):
    run = build_run(load_config(preset, [*overrides, f"trainer.output_dir={out_dir}/{impl}", f"kernels.impl={impl}"]))
    engines = (("actor", run.models.actor), ("critic", run.models.critic))
    before = {f"{role}.{name}": p.detach().clone() for role, engine in engines
              for name, p in engine.module.named_parameters() if p.requires_grad}
    metrics, live_tensors = [], []
    for _ in range(2 if impl == "triton" else 1):
        values, _details = trainer.train_step(run)
        run.state.step += 1
        run.state.data_position += run.ctx.cfg.ppo.rollout_batch_size
        metrics.append({key: float(value) for key, value in values.items()})
        del values, _details
        gc.collect()
        live_tensors.append(sum(isinstance(obj, torch.Tensor) for obj in gc.get_objects()))
    after = {f"{role}.{name}": p.detach() for role, engine in engines
             for name, p in engine.module.named_parameters() if p.requires_grad}
    result[impl] = {"metrics": metrics, "unchanged": [n for n in before if torch.equal(before[n], after[n])],
                    "parameters": len(before), "live_tensors": live_tensors}
print("RESULT " + json.dumps(result))
"""


def test_the_trainer_runs_on_the_kernels_like_on_the_twins(tmp_path, toy_overrides):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("STEPSEARCH_KERNELS", None)
    completed = subprocess.run(
        [sys.executable, "-c", _CHILD, "configs/tiny_cpu.yaml", str(tmp_path), *toy_overrides, *TRAINING],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    # The first step: the same rollout, so the same losses and diagnostics to fp32 rounding (the policy loss is a
    # mean of O(1) terms that nearly cancel: 4e-7 apart here, hence the absolute floor).
    torch_step, triton_step = result["torch"]["metrics"][0], result["triton"]["metrics"][0]
    for key in COMPARED:
        assert math.isfinite(triton_step[key]), key
        assert triton_step[key] == pytest.approx(torch_step[key], rel=1e-4, abs=2e-6), key
    # Two steps with the kernels move every trainable parameter.
    triton = result["triton"]
    assert triton["parameters"] > 0
    assert not triton["unchanged"], f"parameters that never changed: {triton['unchanged']}"
    assert all(math.isfinite(triton["metrics"][1][key]) for key in COMPARED)
    assert triton["live_tensors"][1] == triton["live_tensors"][0], triton["live_tensors"]
