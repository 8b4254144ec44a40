"""Run report: PNG of the learning curves and a self-contained, escaped HTML page of evals and trajectories."""
from __future__ import annotations

import json

from stepsearch.trainer.report import write_report


def _fake_run(run_dir):
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as handle:
        for step in range(1, 13):
            handle.write(json.dumps({"step": step, "rollout/outcome_reward": 0.1 * step, "ppo/kl": 0.01,
                                     "policy_loss": None if step == 4 else -0.5, "time/rollout": 1.0}) + "\n")
    (run_dir / "eval_before.json").write_text(json.dumps(
        {"datasets": {"musique": {"em": 0.125, "f1": 0.25, "per_hop": {"2": {"n": 3, "em": 0.5}}}},
         "average": {"em": 0.125, "f1": 0.25}}))
    (run_dir / "eval_after.json").write_text(json.dumps(
        {"datasets": {"musique": {"em": 0.375, "f1": 0.5, "per_hop": {"2": {"n": 3, "em": 0.75}}}},
         "average": {"em": 0.375, "f1": 0.5}}))
    trajectories = run_dir / "trajectories"
    trajectories.mkdir()
    for step in (2, 10, 11, 12):
        row = {"step": step, "question": f"Who founded <Acme & Sons> (step {step})?", "answers": ["Ada \"Lovelace\""],
               "response_text": "<think>plan</think><search>acme founder</search><answer>Ada</answer>",
               "outcome_reward": 0.75, "f1": 0.6667, "em": 0, "key_reward": 0.5,
               "rounds": [{"query": "acme <founder>", "docs": [{"id": "d1", "title": "Acme & Co", "text": "..."},
                                                             {"id": "d2", "title": "Ada <b>", "text": "..."}],
                           "gain": 0.4321, "redundancy": 0.0, "step_reward": 0.4321},
                          {"query": "acme again", "docs": [{"id": "d1", "title": "Acme & Co", "text": "..."}],
                           "gain": 0.0, "redundancy": 1.0, "step_reward": -1.0}]}
        (trajectories / f"step_{step}.jsonl").write_text(json.dumps(row) + "\n" + "{torn\n")
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
    # curves summary and notes on malformed lines
    assert "rollout/outcome_reward" in text and "ppo/kl" in text and "time/rollout" not in text
    assert "malformed" in text


def test_report_of_an_empty_run_dir_still_writes_both_files(tmp_path):
    page = write_report(tmp_path)
    assert (tmp_path / "report" / "metrics.png").read_bytes().startswith(b"\x89PNG")
    text = page.read_text()
    assert "No metrics logged" in text and "No evaluation results" in text and "No trajectories logged" in text


def test_report_reads_the_trainers_single_trajectory_file_and_eval_directories(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as handle:
        for step in (1, 2):
            handle.write(json.dumps({"step": step, "reward/outcome": 0.5, "loss/policy": -0.1, "response/length": 40,
                                     "response/turns": 2.0, "throughput/tokens_per_s": 900.0}) + "\n")
    (tmp_path / "eval_after").mkdir()
    (tmp_path / "eval_after" / "results.json").write_text(json.dumps(
        {"datasets": {"synthetic_test": {"em": 0.3125, "f1": 0.4375}}, "average": {"em": 0.3125, "f1": 0.4375}}))
    with open(tmp_path / "trajectories.jsonl", "w") as handle:
        for step in (1, 2):
            handle.write(json.dumps({"step": step, "question": f"q{step} <x>", "answers": ["a"],
                                     "response": "<answer>a</answer>", "queries": ["first query", "second"],
                                     "retrieved": [["doc-7", "doc-8"], ["doc-7"]], "gains": [0.625, 0.0],
                                     "penalties": [0.0, 1.0], "step_scores": [0.625, -1.0], "outcome": 0.875,
                                     "f1": 1.0, "em": 1.0, "key_reward": 0.25}) + "\n")
    text = write_report(tmp_path, last_steps=1).read_text()
    assert "q2 &lt;x&gt;" in text and "q1 &lt;x&gt;" not in text
    assert "first query" in text and "doc-7<br>doc-8" in text and "0.625" in text and "-1" in text
    assert "outcome_reward 0.875" in text and "&lt;answer&gt;a&lt;/answer&gt;" in text
    assert "synthetic_test" in text and "0.3125" in text and "0.4375" in text
    for column in ("reward/outcome", "loss/policy", "response/length", "response/turns", "throughput/tokens_per_s"):
        assert f"<td>{column}</td>" in text
