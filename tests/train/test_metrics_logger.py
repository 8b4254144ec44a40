"""MetricsLogger: JSONL rows with tensors resolved in one sync, null for non-finite, resume truncation, TensorBoard."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from stepsearch.trainer import metrics as metrics_module
from stepsearch.trainer.metrics import MetricsLogger
from stepsearch.trainer.run_dir import read_metrics


def test_rows_hold_sorted_keys_with_tensors_and_numbers_resolved(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        returned = logger.log(3, {"policy_loss": torch.tensor(0.25), "turns": torch.tensor(4), "lr": 1e-6,
                                  "count": 7, "entropy": torch.tensor([1.5], dtype=torch.float64)})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert list(json.loads(lines[0])) == ["step", "count", "entropy", "lr", "policy_loss", "turns"]
    row = read_metrics(tmp_path)[0]
    assert row == {"step": 3, "count": 7, "entropy": 1.5, "lr": 1e-6, "policy_loss": 0.25, "turns": 4}
    assert isinstance(row["turns"], int)
    assert returned == {key: value for key, value in row.items() if key != "step"}


def test_tensors_are_fetched_with_one_tolist_per_call(tmp_path, monkeypatch):
    calls = []
    original = torch.Tensor.tolist

    def counting_tolist(self):
        calls.append(self.shape)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("log() must not call .item()"))
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(0, {f"m{i}": torch.tensor(float(i)) for i in range(10)})
    assert calls == [torch.Size([10])]


def test_non_finite_values_become_null_and_the_file_stays_valid_json(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"a": float("nan"), "b": torch.tensor(float("inf")), "c": 2.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"step": 1, "a": None, "b": None, "c": 2.0}


def test_resume_drops_rows_after_the_checkpoint_so_the_file_equals_an_uninterrupted_run(tmp_path):
    def values(step):
        return {"reward": step / 10, "kl": torch.tensor(step * 0.5)}

    uninterrupted = tmp_path / "uninterrupted"
    with MetricsLogger(uninterrupted, tensorboard=False) as logger:
        for step in range(1, 7):
            logger.log(step, values(step))

    resumed = tmp_path / "resumed"
    with MetricsLogger(resumed, tensorboard=False) as logger:
        for step in range(1, 6):  # checkpoint at 3, crash after logging 5
            logger.log(step, values(step))
    with open(resumed / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "rew')  # torn row of the crash
    with MetricsLogger(resumed, tensorboard=False, resume_step=3) as logger:
        assert [row["step"] for row in read_metrics(resumed)] == [1, 2, 3]
        for step in range(4, 7):
            logger.log(step, values(step))
    assert (resumed / "metrics.jsonl").read_text() == (uninterrupted / "metrics.jsonl").read_text()


def test_a_fresh_run_replaces_an_old_file(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"a": 1.0})
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"a": 2.0})
    assert read_metrics(tmp_path) == [{"step": 1, "a": 2.0}]


def test_non_main_ranks_write_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir, tensorboard=True, is_main=False) as logger:
        assert logger.log(1, {"a": torch.tensor(1.0)}) == {}
    assert not run_dir.exists()


def test_bad_values_and_rows_are_named(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(TypeError, match="'name'"):
            logger.log(1, {"name": "text"})
        with pytest.raises(ValueError, match="'vec'.*shape"):
            logger.log(1, {"vec": torch.ones(3)})
        with pytest.raises(ValueError, match="'step'"):
            logger.log(1, {"step": 1})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_metrics(bad)


def test_tensorboard_gets_finite_scalars_and_resume_purges_later_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as logger:
        for step in range(1, 5):
            logger.log(step, {"reward": torch.tensor(float(step)), "bad": float("nan")})
    with MetricsLogger(tmp_path, resume_step=2) as logger:
        logger.log(3, {"reward": 30.0, "bad": 1.0})
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    rewards = {event.step: event.value for event in accumulator.Scalars("reward")}
    assert rewards == {1: 1.0, 2: 2.0, 3: 30.0}
    assert [(event.step, event.value) for event in accumulator.Scalars("bad")] == [(3, 1.0)]


def test_missing_tensorboard_warns_once_and_logging_continues(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(metrics_module, "_warned_no_tensorboard", False)
    with pytest.warns(UserWarning, match="pip install tensorboard"):
        MetricsLogger(tmp_path / "a").close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MetricsLogger(tmp_path / "b") as logger:
            logger.log(1, {"x": 1.0})
    assert caught == []
    assert read_metrics(tmp_path / "b") == [{"step": 1, "x": 1.0}]


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="wandb_project"):
        MetricsLogger(tmp_path, tensorboard=False, wandb_project="proj")


def test_read_metrics_ignores_only_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "a": 1.5}\n{"step": 2, "a"')
    assert read_metrics(path) == [{"step": 1, "a": 1.5}]
