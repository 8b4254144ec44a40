"""The run directory's readers: one torn-line rule for every row file, atomic truncation, typed paths."""

from __future__ import annotations

import json

import pytest

from stepsearch.trainer.run_dir import (
    RunDir,
    append_jsonl,
    read_eval,
    read_jsonl,
    read_metrics,
    read_trajectories,
    truncate_jsonl,
)


def test_paths_are_the_documented_layout(tmp_path):
    paths = RunDir(tmp_path)
    assert paths.metrics == tmp_path / "metrics.jsonl" and paths.trajectories == tmp_path / "trajectories.jsonl"
    assert paths.eval_results("after") == tmp_path / "eval_after" / "results.json"
    assert paths.checkpoints == tmp_path / "checkpoints" and paths.final == tmp_path / "final"


def test_a_torn_last_line_is_left_out_and_anything_else_malformed_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"step": 1, "a": 1.5}\n\n{"step": 2, "a": 2.5}\n{"step": 3, "a"')
    rows, raw = read_jsonl(path, "metrics")
    assert rows == [{"step": 1, "a": 1.5}, {"step": 2, "a": 2.5}]
    assert raw == ['{"step": 1, "a": 1.5}\n', '{"step": 2, "a": 2.5}\n']
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: malformed trajectory row"):
        read_jsonl(path, "trajectory")
    path.write_text('{"step": 1}\n{"step": true}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: a metrics row must be a JSON object with an integer 'step'"):
        read_jsonl(path, "metrics")
    path.write_text('{"step": 1}\n{"step": 2}')  # a complete last row without its newline is a row
    assert [row["step"] for row in read_jsonl(path, "metrics")[0]] == [1, 2]


def test_truncation_keeps_the_chosen_rows_drops_a_torn_line_and_appending_continues_cleanly(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    append_jsonl(path, [{"step": 1, "q": "é"}, {"step": 2, "q": "b"}, {"step": 3, "q": "c"}])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"step": 4, "q": "d')
    truncate_jsonl(path, "trajectory", lambda row: row["step"] <= 2)
    append_jsonl(path, [{"step": 3, "q": "again"}])
    assert path.read_text(encoding="utf-8").splitlines() == [
        json.dumps({"step": 1, "q": "é"}, ensure_ascii=False),
        '{"step": 2, "q": "b"}',
        '{"step": 3, "q": "again"}',
    ]
    assert [row["q"] for row in read_trajectories(tmp_path)] == ["é", "b", "again"]
    assert not list(tmp_path.glob("*.tmp-*"))
    truncate_jsonl(tmp_path / "absent.jsonl", "metrics", lambda row: True)
    assert not (tmp_path / "absent.jsonl").exists()


def test_readers_of_a_run_directory(tmp_path):
    append_jsonl(tmp_path / "metrics.jsonl", [{"step": 1, "kl": 0.5}])
    assert read_metrics(tmp_path) == read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "kl": 0.5}]
    assert read_trajectories(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no evaluation 'before'"):
        read_eval(tmp_path, "before")
    RunDir(tmp_path).eval_dir("before").mkdir()
    RunDir(tmp_path).eval_results("before").write_text('{"datasets": {}, \n"average": }')
    with pytest.raises(ValueError, match=r"results.json:2: not valid JSON"):
        read_eval(tmp_path, "before")
