"""`stepsearch data convert` through a subprocess: hostile rows end in one line naming file:line, nothing partial is
written, and `--skip-bad-rows` reports every skipped row by kind."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stepsearch.data import cli as data_cli
from stepsearch.data.loaders import load_records

GOOD = json.dumps({"question": "Who?", "final_answer": "Ann"})
HANG_GUARD_S = 300  # a hang guard, not a speed limit: a busy machine must not fail the test


def convert(tmp_path: Path, lines: list[str], *extra: str, name: str = "rows.jsonl") -> subprocess.CompletedProcess:
    source = tmp_path / name
    source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    command = [sys.executable, "-m", "stepsearch.cli", "data", "convert", "--input", str(source),
               "--out", str(tmp_path / "out.jsonl"), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=tmp_path)


def assert_one_line_failure(result: subprocess.CompletedProcess, message: str, tmp_path: Path) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"stepsearch data convert: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]  # no output, no temp file


@pytest.mark.parametrize("bad_line, message", [
    ('{"question": "Who?", "final_answer": ' + "[" * 20000 + "]" * 20000 + "}", "invalid JSON (nested too deeply)"),
    ('{"question": "Who \\ud800?", "final_answer": "Ann"}',
     "not valid Unicode: field 'question' holds the lone surrogate \\ud800"),
    ('{"question": "Who?", "final_answer": "Ann", "sub_support_docs": [{"title": "\\udc00"}]}',
     "not valid Unicode: field 'sub_support_docs[0].title' holds the lone surrogate \\udc00"),
    ('{"question": "Who?", "final_answer": NaN}', "invalid JSON (NaN is not a JSON value)"),
    ('{"question": "Who?", "final_answer": -Infinity}', "invalid JSON (-Infinity is not a JSON value)"),
    ('{"question": "Who?", "final_answer": "Ann", "hops": true}',
     "stepsearch row: field 'hops' must be a positive integer, got True"),
    ('{"question": "Who?", "final_answer": "Ann"', "invalid JSON (Expecting ',' delimiter, column 43)"),
    ('{"question": "Who?", "final_answer": "Ann", "sub_searchs": [["a b", {"q": 1}]]}',
     "stepsearch row: field 'sub_searchs[0][1]' must be a string, got dict"),
])
def test_a_bad_row_is_one_line_naming_file_and_line_and_nothing_is_written(tmp_path, bad_line, message):
    result = convert(tmp_path, [GOOD, bad_line])
    assert_one_line_failure(result, f"{tmp_path / 'rows.jsonl'}:2: {message}", tmp_path)


def test_skip_bad_rows_counts_every_kind_with_its_first_rows(tmp_path):
    truncated = ['{"question": "Who?", "final_answer": "' + "x" * n + '"' for n in (1, 22, 333, 4444)]
    lines = [GOOD, truncated[0], truncated[1], '{"question": "Who?"}', truncated[2], "[1, 2]", truncated[3], GOOD]
    result = convert(tmp_path, lines, "--skip-bad-rows")
    assert result.returncode == 0, result.stderr
    rows = tmp_path / "rows.jsonl"
    assert result.stderr.splitlines() == [
        f"skipped 6 bad rows of {rows}:",
        f"  4 x {rows}:2: invalid JSON (Expecting ',' delimiter, column 41); also {rows}:3, {rows}:5 and 1 more",
        f"  1 x {rows}:4: stepsearch row: missing field 'final_answer' (or 'answer')",
        f"  1 x {rows}:6: expected a JSON object, got list",
    ]
    assert result.stdout == f"wrote 2 records to {tmp_path / 'out.jsonl'}\n"


def test_a_run_that_skips_every_row_fails(tmp_path):
    result = convert(tmp_path, ['{"question": "Who?", "final_answer": NaN}', "{", GOOD.replace("Ann", "")],
                     "--skip-bad-rows")
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == f"skipped 3 bad rows of {tmp_path / 'rows.jsonl'}:"
    assert result.stderr.splitlines()[-1] == (f"stepsearch data convert: {tmp_path / 'rows.jsonl'}: no records to "
                                              f"write (all 3 rows are bad)")
    assert not (tmp_path / "out.jsonl").exists()
    assert_one_line_failure(convert(tmp_path, []), f"{tmp_path / 'rows.jsonl'}: no records to write (it holds no "
                                                   f"rows)", tmp_path)


def test_a_first_row_that_is_an_array_honours_skip_bad_rows(tmp_path):
    result = convert(tmp_path, ["[1, 2]", GOOD], "--skip-bad-rows")
    assert result.returncode == 0, result.stderr
    assert f"1 x {tmp_path / 'rows.jsonl'}:1: expected a JSON object, got list" in result.stderr
    assert [r.answers for r in load_records(tmp_path / "out.jsonl").records] == [["Ann"]]


def test_a_json_list_file_with_nan_or_a_lone_surrogate_is_named(tmp_path):
    result = convert(tmp_path, ['[{"question": "Who?", "final_answer": Infinity}]'], name="rows.json")
    assert result.returncode == 1
    rows = tmp_path / "rows.json"
    assert result.stderr == f"stepsearch data convert: {rows}: invalid JSON (Infinity is not a JSON value)\n"
    result = convert(tmp_path, ['[' + GOOD + ', {"question": "\\ud800", "final_answer": "Ann"}]'], name="rows.json")
    assert result.returncode == 1
    assert result.stderr == (f"stepsearch data convert: {tmp_path / 'rows.json'}[1]: not valid Unicode: field "
                             f"'question' holds the lone surrogate \\ud800\n")


def test_a_failed_write_leaves_neither_a_partial_output_nor_a_temp_file(tmp_path, monkeypatch, capsys):
    source = tmp_path / "rows.jsonl"
    source.write_text(GOOD + "\n" + GOOD.replace("Ann", "Bob") + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("the previous output\n", encoding="utf-8")
    real_dumps = json.dumps

    def dumps_until_the_disk_is_full(obj, *args, **kwargs):
        if obj.get("final_answer") == "Bob":
            raise OSError(28, "No space left on device")
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(data_cli.json, "dumps", dumps_until_the_disk_is_full)
    assert data_cli.main(["convert", "--input", str(source), "--out", str(out)]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "the previous output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "rows.jsonl"]
