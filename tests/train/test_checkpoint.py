"""Atomic checkpoints: exact round trip (model, AdamW, LambdaLR, RNG), torn writes ignored, pruning, HF export;
data-only loading, per-file checksums, fallback from a damaged checkpoint, a full disk."""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re

import numpy as np
import pytest
import torch

from stepsearch.trainer.checkpoint import (
    CheckpointError,
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
    with pytest.raises(CheckpointError, match="COMPLETE"):
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
    with pytest.raises(CheckpointError, match="model 'critic'"):
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
@pytest.mark.timeout(1800)  # the launch, and the comm op's first build (conftest)
def test_deepspeed_zero3_two_ranks_round_trip_and_hf_export(tmp_path, deepspeed_cpu_comm_op):
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
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)  # a hang guard
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / "run" / "ok_rank0").is_file() and (tmp_path / "run" / "ok_rank1").is_file()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    shards = sorted(p.name for p in (checkpoint / "actor" / "ds").iterdir())
    assert any("rank_0" in name for name in shards) and any("rank_1" in name for name in shards)
    assert (checkpoint / "state_rank00001.pt").is_file() and not list((tmp_path / "run" / "checkpoints").glob("*.tmp*"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert reloaded.lm_head.weight.shape == (64, 16)


# ---------------------------------------------------------------------------------------------------------------
# data-only loading, the manifest, damaged checkpoints, a full disk


class _OpensAFile:
    """Pickles as a call to `open(path, "w")`: loading it with full unpickling would create `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _rewrite_manifest_entry(checkpoint, relative):
    """What an attacker who replaced a file would also do: make the manifest match it."""
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    data = (checkpoint / relative).read_bytes()
    marker["files"][relative] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


def test_a_pickled_callable_in_the_state_file_is_refused_and_never_runs(tmp_path):
    model, optimizer, scheduler = _make(0)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    witness = tmp_path / "code-ran"
    torch.save({"step": 1, "data_position": 10, "payload": _OpensAFile(witness)}, path / "state_rank00000.pt")
    _rewrite_manifest_entry(path, "state_rank00000.pt")
    assert find_latest_checkpoint(tmp_path) == path  # the manifest matches: the refusal comes from the loader
    with pytest.raises(CheckpointError, match=r"state_rank00000\.pt: refused: it holds more than tensors") as info:
        load_checkpoint(path, models={"actor": model}, optimizers={"actor": optimizer},
                        schedulers={"actor": scheduler})
    assert str(info.value).endswith("(the pickled global io.open)")
    assert not witness.exists()


def test_a_checkpoint_holds_only_data_and_its_manifest_lists_every_file(tmp_path):
    model, optimizer, scheduler = _make(0)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    files = json.loads((path / "COMPLETE").read_text())["files"]
    assert sorted(files) == ["models/actor.pt", "optimizers/actor.pt", "schedulers/actor.pt", "state_rank00000.pt"]
    for relative, entry in files.items():
        data = (path / relative).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        torch.load(path / relative, weights_only=True)  # every file loads data-only


def _flip_middle_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


def _truncate(file):
    file.write_bytes(file.read_bytes()[:-7])


@pytest.mark.parametrize("relative, damage, problem", [
    ("models/actor.pt", _flip_middle_byte, "damaged (its SHA-256 differs from the manifest's)"),
    ("optimizers/actor.pt", _flip_middle_byte, "damaged"),
    ("schedulers/actor.pt", _truncate, "truncated"),
    ("state_rank00000.pt", lambda file: file.write_bytes(b""), "empty (0 bytes"),
    ("models/actor.pt", lambda file: file.unlink(), "missing"),
    ("COMPLETE", lambda file: file.write_text("{not json"), "unreadable manifest"),
])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, caplog, relative, damage,
                                                                         problem):
    model, optimizer, scheduler = _make(0)
    first = _save(tmp_path, 1, model, optimizer, scheduler)
    _train_step(model, optimizer, scheduler)
    newest = _save(tmp_path, 2, model, optimizer, scheduler)
    damage(newest / relative)
    with caplog.at_level(logging.WARNING, logger="stepsearch.checkpoint"):
        assert find_latest_checkpoint(tmp_path) == first
    assert f"{newest / relative}: {problem}" in caplog.text
    assert f"falling back to checkpoint {first}" in caplog.text
    with pytest.raises(CheckpointError, match=re.escape(f"{newest / relative}: {problem}")):
        load_checkpoint(newest, models={"actor": model}, optimizers={}, schedulers={})
    assert load_checkpoint(first, models={"actor": model}, optimizers={"actor": optimizer},
                           schedulers={"actor": scheduler})["step"] == 1


def test_no_usable_checkpoint_is_one_error_naming_every_problem(tmp_path):
    model, optimizer, scheduler = _make(0)
    first = _save(tmp_path, 1, model, optimizer, scheduler)
    second = _save(tmp_path, 2, model, optimizer, scheduler)
    _flip_middle_byte(first / "models" / "actor.pt")
    (second / "state_rank00000.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        find_latest_checkpoint(tmp_path)
    message = str(info.value)
    assert message.startswith(f"no usable checkpoint in {tmp_path / 'checkpoints'}: ")
    assert f"{second / 'state_rank00000.pt'}: empty" in message
    assert f"{first / 'models' / 'actor.pt'}: damaged" in message


def test_a_checkpoint_written_before_checksums_loads_with_a_warning(tmp_path, caplog):
    model, optimizer, scheduler = _make(0)
    path = _save(tmp_path, 1, model, optimizer, scheduler)
    (path / "COMPLETE").write_text(json.dumps({"step": 1, "time": 0.0, "world_size": 1}))
    with caplog.at_level(logging.WARNING, logger="stepsearch.checkpoint"):
        assert find_latest_checkpoint(tmp_path) == path
    assert "no file checksums" in caplog.text
    assert load_checkpoint(path, models={"actor": model}, optimizers={}, schedulers={})["step"] == 1


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer, scheduler = _make(0)
    first = _save(tmp_path, 1, model, optimizer, scheduler)
    real_save = torch.save

    def save_until_the_disk_is_full(obj, handle, *args, **kwargs):
        if str(handle.name).endswith("state_rank00000.pt"):  # models and optimizers were written already
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(CheckpointError) as info:
        _save(tmp_path, 2, model, optimizer, scheduler)
    temp = tmp_path / "checkpoints" / f"step_00000002.tmp-{os.getpid()}"
    assert str(info.value) == f"no space left writing {temp}/state_rank00000.pt"
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000001"]  # the partial checkpoint is gone
    monkeypatch.setattr(torch, "save", real_save)
    assert find_latest_checkpoint(tmp_path) == first
