"""The one toy training configuration every trainer-level test starts from.

`configs/tiny_cpu.yaml` shrunk until a StePPO step takes a second on one CPU core: a 1-layer 32-wide model, 24
synthetic questions, 2-turn 64-token responses, 8 trajectories per step in two mini-batches of micro-batches of 2.
Tests add what they are about (warm start, evaluation, checkpoints, report) as overrides.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from stepsearch.config import Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY_PRESET = "configs/tiny_cpu.yaml"
TOY_OVERRIDES = (
    "model.tiny_hidden_size=32", "model.tiny_num_layers=1", "model.tiny_num_heads=2", "model.tiny_num_kv_heads=1",
    "model.tiny_intermediate_size=48", "model.tiny_vocab_size=400",
    "data.synth_num_train=24", "data.synth_num_test=4", "data.max_prompt_tokens=1024",
    "rollout.max_turns=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens_per_turn=12",
    "rollout.max_information_tokens=24", "rollout.max_response_tokens=64",
    "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
    "trainer.tensorboard=false", "trainer.device=cpu",
)


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
