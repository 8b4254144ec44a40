"""`stepsearch train` through a subprocess: every user error is one line on stderr and exit status 2, found before
set-up where it can be; `--debug` / STEPSEARCH_DEBUG=1 show the traceback; a bug keeps its traceback; a damaged or
hostile checkpoint is named (and a damaged one is skipped for the previous one)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
HANG_GUARD_S = 600  # a hang guard, not a speed limit: a busy machine must not fail the test
TINY = [
    "model.tiny_hidden_size=32", "model.tiny_num_layers=1", "model.tiny_copy_circuit=false",
    "model.tiny_num_heads=2", "model.tiny_num_kv_heads=1",
    "model.tiny_intermediate_size=48", "model.tiny_vocab_size=400",
    "data.synth_num_train=24", "data.synth_num_test=4", "data.max_prompt_tokens=1024",
    "rollout.max_turns=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens_per_turn=12",
    "rollout.max_information_tokens=24", "rollout.max_response_tokens=64",
    "ppo.rollout_batch_size=4", "ppo.mini_batch_size=4", "ppo.micro_batch_size=2",
    "trainer.warm_start_steps=0", "trainer.eval_max_questions=0", "trainer.tensorboard=false",
    "trainer.report=false", "trainer.device=cpu", "deepspeed.enabled=off",
    "trainer.save_every=1", "trainer.keep_checkpoints=2",
]
ERROR_PREFIX = "stepsearch train: error: "


def run_train(output_dir: Path, *overrides: str, config: str | Path = "configs/tiny_cpu.yaml", flags: tuple = (),
              env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    argv = ["--config", str(config), *flags, *TINY, f"trainer.output_dir={output_dir}", *overrides]
    environment = {k: v for k, v in os.environ.items() if k != "STEPSEARCH_DEBUG"}
    environment.update(OMP_NUM_THREADS="1", **(env or {}))
    command = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "stepsearch.train", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=REPO, env=environment)


def assert_user_error(result: subprocess.CompletedProcess, needle: str, after_setup: bool = False) -> str:
    """Exit 2 and one error line holding `needle`: the only line on stderr, or after set-up (whose progress bars
    and logs come first) the last one, with no traceback anywhere; returns that line."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 or (after_setup and "Traceback" not in result.stderr), result.stderr[-3000:]
    assert lines[-1].startswith(ERROR_PREFIX) and needle in lines[-1], lines[-1]
    return lines[-1]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the probe is closed


def _a_file(tmp_path: Path) -> Path:
    (tmp_path / "a-file").write_text("not a directory")
    return tmp_path / "a-file"


# Every other invalid value takes the same path (load_config), tested in-process in tests/config.
@pytest.mark.parametrize("overrides, needle", [
    (["ppo.micro_batch_size=0"], "ppo.micro_batch_size must be >= 1, got 0"),
    (["model.tiny_num_heads=0"], "model.tiny_num_heads must be >= 1, got 0"),
    (["model.tiny_num_layers=0"], "model.tiny_num_layers must be >= 1, got 0"),
    (["ppo.kl_coef=.nan"], "ppo.kl_coef: expected a finite number, got nan"),
    (["trainer.resume=sometimes"], "trainer.resume='sometimes': not 'auto', 'never' or an existing checkpoint"),
    (["trainer.resume={tmp}"], "not a complete checkpoint (no COMPLETE marker)"),
    (["data.train_path={tmp}/missing.jsonl"], "data.train_path={tmp}/missing.jsonl: no such file"),
    (["data.train_path={file}", "trainer.warm_start_fresh_names=true"],
     "trainer.warm_start_fresh_names=true: renames the synthetic world's made-up names"),
    (["ppo.rollout_batch_size=3"], "must be a multiple of the per-rank mini-batch (4)"),
    (["retriever.index_dir={tmp}/no-index"], "retriever.index_dir={tmp}/no-index: no such directory"),
    (["model.actor_path={tmp}"], "model.actor_path={tmp}: no config.json, so not an HF model directory"),
    (["trainer.output_dir={file}/runs"], "cannot write {file}/runs/tiny_cpu (Not a directory)"),
    (["retriever.url=http://127.0.0.1:{port}"], "retriever.url=http://127.0.0.1:{port}: cannot connect to "
                                                "127.0.0.1:{port} (Connection refused); is the server running?"),
])
def test_a_user_error_is_one_line_and_exit_2(tmp_path, overrides, needle):
    values = {"tmp": tmp_path, "file": _a_file(tmp_path), "port": closed_port()}
    result = run_train(tmp_path, *[o.format(**values) for o in overrides])
    assert_user_error(result, needle.format(**values))


def test_unusable_config_files_are_one_line_errors(tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(b"trainer:\n  run_name: caf\xe9\n")
    deep = tmp_path / "deep.yaml"
    deep.write_text("ppo: " + "[" * 5000 + "]" * 5000 + "\n")
    twice = tmp_path / "twice.yaml"
    twice.write_text("ppo:\n  kl_coef: 0.1\n  kl_coef: 0.2\n")
    for config, needle in [(tmp_path, "is a directory, not a YAML file"),
                           (latin, "latin1.yaml:2: not valid UTF-8 (invalid continuation byte at byte 24)"),
                           (deep, "deep.yaml: invalid YAML: nested too deeply"),
                           (twice, "twice.yaml:3:3: invalid YAML: duplicate key 'kl_coef' (first at line 2)")]:
        assert_user_error(run_train(tmp_path, config=config), needle)


@pytest.mark.parametrize("flags, env", [(("--debug",), {}), ((), {"STEPSEARCH_DEBUG": "1"})])
def test_debug_shows_the_traceback_of_a_user_error(tmp_path, flags, env):
    result = run_train(tmp_path, "trainer.resume=sometimes", flags=flags, env=env)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("stepsearch.config.ConfigError: trainer.resume=")


def test_a_bug_keeps_its_traceback(tmp_path):
    code = "import sys, stepsearch.train as t; t.train = lambda cfg: 1 // 0; sys.exit(t.main(sys.argv[1:]))"
    result = run_train(tmp_path, code=code)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr and "ZeroDivisionError" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# checkpoints met on resume=auto


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny two-step run with checkpoints after steps 1 and 2 (copied by each test that damages it)."""
    output_dir = tmp_path_factory.mktemp("trained")
    result = run_train(output_dir, "trainer.total_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def _copy_of(trained_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    output_dir = tmp_path / "out"
    shutil.copytree(trained_run, output_dir)
    return output_dir, output_dir / "tiny_cpu" / "checkpoints"


class _OpensAFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_callable_in_the_state_file_is_refused_on_resume_auto(trained_run, tmp_path):
    output_dir, checkpoints = _copy_of(trained_run, tmp_path)
    newest = checkpoints / "step_00000002"
    witness = tmp_path / "code-ran"
    state = torch.load(newest / "state_rank00000.pt", weights_only=True)
    torch.save({**state, "payload": _OpensAFile(witness)}, newest / "state_rank00000.pt")
    marker = json.loads((newest / "COMPLETE").read_text())  # the manifest is rewritten to match, as an attacker would
    data = (newest / "state_rank00000.pt").read_bytes()
    marker["files"]["state_rank00000.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "COMPLETE").write_text(json.dumps(marker))

    result = run_train(output_dir, "trainer.total_steps=3")
    assert_user_error(result, f"{newest / 'state_rank00000.pt'}: refused: it holds more than tensors and plain "
                              f"data (the pickled global io.open)", after_setup=True)
    assert not witness.exists()


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(trained_run, tmp_path):
    output_dir, checkpoints = _copy_of(trained_run, tmp_path)
    weights = checkpoints / "step_00000002" / "models" / "actor.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40
    weights.write_bytes(bytes(data))

    result = run_train(output_dir, "trainer.total_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{weights}: damaged (its SHA-256 differs from the manifest's)" in result.stderr
    assert f"falling back to checkpoint {checkpoints / 'step_00000001'}" in result.stderr
    assert f"resumed from {checkpoints / 'step_00000001'} (step 1)" in result.stderr
    rows = [json.loads(line) for line in (output_dir / "tiny_cpu" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]  # step 2 trained again from step 1


def test_no_usable_checkpoint_is_one_error(trained_run, tmp_path):
    output_dir, checkpoints = _copy_of(trained_run, tmp_path)
    (checkpoints / "step_00000001" / "state_rank00000.pt").write_bytes(b"")
    (checkpoints / "step_00000002" / "optimizers" / "actor.pt").write_bytes(b"\0" * 10)
    result = run_train(output_dir, "trainer.total_steps=3")
    last = assert_user_error(result, f"no usable checkpoint in {checkpoints}: ", after_setup=True)
    assert "step_00000002/optimizers/actor.pt: truncated" in last and "step_00000001/state_rank00000.pt: empty" in last
