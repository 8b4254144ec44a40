"""Atomic checkpoints: exact round trip (model, AdamW, LambdaLR, RNG), torn writes ignored, pruning, HF export."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from stepsearch.trainer.checkpoint import (
    capture_rng_state,
    checkpoint_dir,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_hf_model,
)


def _make(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler) -> float:
    # inputs from torch, targets from numpy, loss scale from python: each RNG must be restored for equal losses
    inputs = torch.randn(16, 4)  # B=16
    targets = torch.from_numpy(np.random.rand(16, 1)).float()
    loss = (model(inputs) - targets).pow(2).mean() * random.uniform(0.5, 1.5)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.item()


def _save(run_dir, step, model, optimizer, scheduler, keep=3, **extra):
    state = {"step": step, "data_position": 10 * step, "rng": capture_rng_state(), **extra}
    return save_checkpoint(run_dir, step, models={"actor": model}, optimizers={"actor": optimizer},
                           schedulers={"actor": scheduler}, state=state, keep=keep)


def test_round_trip_continues_exactly_like_an_uninterrupted_run(tmp_path):
    model, optimizer, scheduler = _make(0)
    for _ in range(3):
        _train_step(model, optimizer, scheduler)
    path = _save(tmp_path, 3, model, optimizer, scheduler)
    assert path == checkpoint_dir(tmp_path, 3) and path.name == "step_00000003"
    expected_losses = [_train_step(model, optimizer, scheduler) for _ in range(3)]
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    expected_weights = [p.detach().clone() for p in model.parameters()]

    fresh_model, fresh_optimizer, fresh_scheduler = _make(1)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    state = load_checkpoint(find_latest_checkpoint(tmp_path), models={"actor": fresh_model},
                            optimizers={"actor": fresh_optimizer}, schedulers={"actor": fresh_scheduler})
    assert state["step"] == 3 and state["data_position"] == 30
    restore_rng_state(state["rng"])
    assert fresh_scheduler.last_epoch == 3
    assert [_train_step(fresh_model, fresh_optimizer, fresh_scheduler) for _ in range(3)] == expected_losses
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == expected_draws
    for got, want in zip(fresh_model.parameters(), expected_weights):
        assert torch.equal(got, want)


def test_a_torn_write_is_ignored_and_cleaned_by_the_next_save(tmp_path):
    model, optimizer, scheduler = _make(0)
    _save(tmp_path, 1, model, optimizer, scheduler)
    root = tmp_path / "checkpoints"
    (root / "step_00000002.tmp-999").mkdir()  # crash before rename
    (root / "step_00000002.tmp-999" / "state_rank00000.pt").write_bytes(b"partial")
    (root / "step_00000003").mkdir()  # a directory without its COMPLETE marker
    assert find_latest_checkpoint(tmp_path) == root / "step_00000001"
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        load_checkpoint(root / "step_00000003", models={}, optimizers={}, schedulers={})
    _save(tmp_path, 4, model, optimizer, scheduler)
    assert not (root / "step_00000002.tmp-999").exists()
    assert find_latest_checkpoint(tmp_path) == root / "step_00000004"
    marker = json.loads((root / "step_00000004" / "COMPLETE").read_text())
    assert marker["step"] == 4 and marker["world_size"] == 1


def test_pruning_keeps_the_most_recent_complete_checkpoints(tmp_path):
    model, optimizer, scheduler = _make(0)
    for step in (5, 10, 15, 20, 25):
        _save(tmp_path, step, model, optimizer, scheduler, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000020", "step_00000025"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000020", "step_00000025"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    model, optimizer, scheduler = _make(0)
    _save(tmp_path, 7, model, optimizer, scheduler, note="first")
    _save(tmp_path, 7, model, optimizer, scheduler, note="second")
    state = load_checkpoint(checkpoint_dir(tmp_path, 7), models={}, optimizers={}, schedulers={})
    assert state["note"] == "second"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000007"]


def test_missing_component_is_named(tmp_path):
    model, optimizer, scheduler = _make(0)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    with pytest.raises(FileNotFoundError, match="model 'critic'"):
        load_checkpoint(path, models={"critic": model}, optimizers={}, schedulers={})


def test_tied_weights_round_trip_and_hf_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    path = save_checkpoint(tmp_path, 1, models={"actor": model}, optimizers={}, schedulers={}, state={}, keep=1)
    torch.manual_seed(1)
    restored = transformers.Qwen2ForCausalLM(config)
    load_checkpoint(path, models={"actor": restored}, optimizers={}, schedulers={})
    assert restored.lm_head.weight is restored.model.embed_tokens.weight
    for (name, got), want in zip(restored.state_dict().items(), model.state_dict().values()):
        assert torch.equal(got, want), name

    out = save_hf_model(model, None, tmp_path / "hf")
    save_hf_model(model, None, tmp_path / "hf")  # replacing an export works
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3]])  # B=1, T=3
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "hf"]


DEEPSPEED_WORKER = '''
import os, sys, torch, deepspeed, transformers
from stepsearch.trainer.checkpoint import (capture_rng_state, find_latest_checkpoint, load_checkpoint,
                                           restore_rng_state, save_checkpoint, save_hf_model)

deepspeed.init_distributed(dist_backend="gloo")
run_dir = sys.argv[1]


def build(seed):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}}
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                           config=ds_config)
    return engine, optimizer, scheduler


def step(engine):
    ids = torch.randint(0, 64, (2, 5))  # B=2, T=5, different on each rank (per-rank RNG)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


torch.manual_seed(100 + torch.distributed.get_rank())
engine, optimizer, scheduler = build(0)
for _ in range(2):
    step(engine)
items = dict(models={"actor": engine}, optimizers={"actor": optimizer}, schedulers={"actor": scheduler})
save_checkpoint(run_dir, 2, **items, state={"rng": capture_rng_state(), "rank": torch.distributed.get_rank()},
                keep=1)
expected = [step(engine) for _ in range(2)]

engine, optimizer, scheduler = build(1)
items = dict(models={"actor": engine}, optimizers={"actor": optimizer}, schedulers={"actor": scheduler})
state = load_checkpoint(find_latest_checkpoint(run_dir), **items)
assert state["rank"] == torch.distributed.get_rank()
restore_rng_state(state["rng"])
got = [step(engine) for _ in range(2)]
assert got == expected, (got, expected)
save_hf_model(engine, None, os.path.join(run_dir, "hf"))
open(os.path.join(run_dir, f"ok_rank{torch.distributed.get_rank()}"), "w").close()
'''


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_zero3_two_ranks_round_trip_and_hf_export(tmp_path):
    import os
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("deepspeed")
    worker = tmp_path / "worker.py"
    worker.write_text(DEEPSPEED_WORKER)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(29900 + os.getpid() % 90), str(worker), str(tmp_path / "run")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / "run" / "ok_rank0").is_file() and (tmp_path / "run" / "ok_rank1").is_file()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    shards = sorted(p.name for p in (checkpoint / "actor" / "ds").iterdir())
    assert any("rank_0" in name for name in shards) and any("rank_1" in name for name in shards)
    assert (checkpoint / "state_rank00001.pt").is_file() and not list((tmp_path / "run" / "checkpoints").glob("*.tmp*"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert reloaded.lm_head.weight.shape == (64, 16)
