"""Run report: PNG of the learning curves and a self-contained, escaped HTML page of evals and trajectories."""
from __future__ import annotations

import json

from stepsearch.trainer.report import write_report


def _fake_run(run_dir):
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as handle:
        for step in range(1, 13):
            handle.write(json.dumps({"step": step, "reward/outcome": 0.1 * step, "kl": 0.01,
                                     "loss/policy": None if step == 4 else -0.5, "time/rollout_s": 1.0}) + "\n")
    for which, em, f1, hop_em in (("before", 0.125, 0.25, 0.5), ("after", 0.375, 0.5, 0.75)):
        (run_dir / f"eval_{which}").mkdir()
        (run_dir / f"eval_{which}" / "results.json").write_text(json.dumps(
            {"datasets": {"musique": {"em": em, "f1": f1, "per_hop": {"2": {"n": 3, "em": hop_em}}}},
             "average": {"em": em, "f1": f1}}))
    with open(run_dir / "trajectories.jsonl", "w") as handle:
        for step in (2, 10, 11, 12):
            handle.write(json.dumps({
                "step": step, "question": f"Who founded <Acme & Sons> (step {step})?", "answers": ['Ada "Lovelace"'],
                "response": "<think>plan</think><search>acme founder</search><answer>Ada</answer>",
                "outcome": 0.75, "f1": 0.6667, "em": 0, "key_reward": 0.5,
                "queries": ["acme <founder>", "acme again"], "retrieved": [["Acme & Co", "Ada <b>"], ["Acme & Co"]],
                "gains": [0.4321, 0.0], "penalties": [0.0, 1.0], "step_scores": [0.4321, -1.0]}) + "\n")
        handle.write('{"step": 13, "question": "torn')  # a crash mid-write: the torn last line is skipped
    return run_dir


def test_report_writes_a_png_and_an_escaped_html_page(tmp_path):
    run_dir = _fake_run(tmp_path / "run <1>")
    page = write_report(run_dir)
    assert page == run_dir / "report" / "index.html"
    png = (run_dir / "report" / "metrics.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    text = page.read_text(encoding="utf-8")
    assert "data:image/png;base64," in text
    # escaped user content, never raw tags from the data
    assert "Who founded &lt;Acme &amp; Sons&gt; (step 12)?" in text
    assert "acme &lt;founder&gt;" in text and "Ada &lt;b&gt;" in text and "Acme &amp; Co" in text
    assert "&lt;think&gt;plan&lt;/think&gt;" in text and "Ada &quot;Lovelace&quot;" in text
    assert "<b>\"" not in text and "<Acme" not in text and "<search>" not in text
    assert "run &lt;1&gt;" in text
    # the last three steps only, numbers shown
    assert "Step 12" in text and "Step 10" in text and "Step 2<" not in text
    assert "0.4321" in text and "-1" in text and "0.75" in text and "0.6667" in text
    # eval table: before, after and the change
    assert "musique" in text and "0.125" in text and "0.375" in text and "+0.25" in text
    assert "musique / 2-hop" in text
    # curves summary; the torn last trajectory line is not a row
    # timings are not curves: they appear once, in the table of where a step's time went
    assert "reward/outcome" in text and "<td>kl</td>" in text and text.count("time/rollout") == 1
    assert "<td>time/rollout_s</td><td>1.00</td><td>100.0%</td>" in text
    assert (run_dir / "report" / "learning_curve.png").stat().st_size > 0
    assert "Step 13" not in text and "Notes" not in text


def test_a_malformed_file_becomes_a_note_naming_the_line(tmp_path):
    run_dir = _fake_run(tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write("not json\n")
    text = write_report(run_dir).read_text()
    assert "metrics.jsonl: not read" in text and "metrics.jsonl:13: malformed metrics row" in text


def test_report_of_an_empty_run_dir_still_writes_both_files(tmp_path):
    page = write_report(tmp_path)
    assert (tmp_path / "report" / "metrics.png").read_bytes().startswith(b"\x89PNG")
    text = page.read_text()
    assert "No metrics logged" in text and "No evaluation results" in text and "No trajectories logged" in text


def test_report_shows_where_the_time_went_and_held_out_f1_at_every_evaluation(tmp_path):
    from stepsearch.trainer.report import _held_out_f1
    from stepsearch.trainer.run_dir import read_timings, write_timings

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [{"step": 1, "reward/outcome": -0.5, "time/rollout_s": 3.0, "time/update_s": 1.0},
            {"step": 2, "reward/outcome": 0.25, "eval/avg/f1": 0.3, "time/rollout_s": 5.0, "time/update_s": 1.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_timings(run_dir, {"warm_start": 30.0, "steppo": 10.0})
    assert read_timings(run_dir) == {"warm_start": 30.0, "steppo": 10.0}
    evals = {"before": {"average": {"f1": 0.1}}, "after": {"average": {"f1": 0.35}}}
    assert _held_out_f1(rows, evals) == [(0, 0.1), (2, 0.3), (2, 0.35)]
    text = (write_report(run_dir)).read_text()
    assert "<td>warm_start</td><td>30.0</td><td>75.0%</td>" in text and "<th>total</th><th>40.0</th>" in text
    assert "<td>time/rollout_s</td><td>4.00</td><td>80.0%</td>" in text  # mean per step, share of a step
