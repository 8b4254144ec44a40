"""Fixtures shared across test directories.

The one toy training configuration every trainer-level test starts from: `configs/tiny_cpu.yaml` shrunk until a
StePPO step takes a second on one CPU core: a 1-layer 32-wide model, 24 synthetic questions, 2-turn 64-token
responses, 8 trajectories per step in two mini-batches of micro-batches of 2. Tests add what they are about (warm
start, evaluation, checkpoints, report) as overrides.

`deepspeed_cpu_comm_op`: DeepSpeed on the CPU accelerator JIT-compiles its shared-memory collective op
(`deepspeed_shm_comm`) the first time a process group starts, into torch's extension cache
(TORCH_EXTENSIONS_DIR, ~/.cache/torch_extensions by default). On a fresh machine that compile ran inside the first
launched test and ate its hang guard; this fixture builds (or finds cached) the op once per test session, before
any DeepSpeed launch, so the launches only load it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stepsearch.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_PRESET = "configs/tiny_cpu.yaml"
TOY_OVERRIDES = (
    "model.tiny_hidden_size=32",
    "model.tiny_num_layers=1",
    "model.tiny_copy_circuit=false",
    "model.tiny_num_heads=2",
    "model.tiny_num_kv_heads=1",
    "model.tiny_intermediate_size=48",
    "model.tiny_vocab_size=400",
    "data.synth_num_train=24",
    "data.synth_num_test=4",
    "data.max_prompt_tokens=1024",
    "rollout.max_turns=2",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens_per_turn=12",
    "rollout.max_information_tokens=24",
    "rollout.max_response_tokens=64",
    "ppo.rollout_batch_size=4",
    "ppo.mini_batch_size=4",
    "ppo.micro_batch_size=2",
    "trainer.tensorboard=false",
    "trainer.device=cpu",
)
BUILD_HANG_GUARD_S = 900  # a cold C++ compile on a busy 2-core machine takes minutes

_BUILD_SHM_OP = """
import deepspeed.ops
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    builder.load(verbose=False)
    print("built", builder.NAME)
else:
    print("not used on this machine")
"""


@pytest.fixture
def toy_overrides() -> list[str]:
    """`section.field=value` strings of the toy configuration (for a command line)."""
    return list(TOY_OVERRIDES)


@pytest.fixture
def toy_config():
    """`toy_config(output_dir, *extra)`: the toy configuration writing under `output_dir`, `extra` applied last."""

    def make(output_dir: Path, *extra: str) -> Config:
        return load_config(REPO_ROOT / TOY_PRESET, [*TOY_OVERRIDES, f"trainer.output_dir={output_dir}", *extra])

    return make


@pytest.fixture(scope="session")
def deepspeed_cpu_comm_op() -> str:
    """Build DeepSpeed's CPU shared-memory comm op once (a no-op when cached); returns what happened."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    result = subprocess.run(
        [sys.executable, "-c", _BUILD_SHM_OP], env=env, capture_output=True, text=True, timeout=BUILD_HANG_GUARD_S
    )
    assert result.returncode == 0, (
        f"building deepspeed_shm_comm failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return result.stdout.strip().splitlines()[-1]
