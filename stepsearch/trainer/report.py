"""The run report: `run_dir/report/metrics.png` (learning curves) and `run_dir/report/index.html` (self-contained).

Inputs, read with the run directory's own readers (`stepsearch.trainer.run_dir`); a missing or malformed part
becomes a note in the page, never an error:
- `metrics.jsonl`: a metric is plotted when it names one of `KEY_METRICS` as itself, its last `/`-part
  (`reward/info_gain`), or its parts joined either way (`loss/policy` -> `policy_loss`, `response/length` ->
  `response_length`), plus the `eval/avg/*` columns.
- `eval_before/results.json` and `eval_after/results.json` (`stepsearch.eval.write_results`): `{"datasets": {name:
  {"em", "f1", …, "per_hop": {hop: {…}}}}, "average": {…}, "per_hop": {…}}`; every numeric field becomes a row of
  the before/after table.
- `timings.json` (`stepsearch.trainer.run_dir.write_timings`): wall seconds per stage of the whole job, shown as
  a table with each stage's share, next to the mean seconds per StePPO step of each step stage (`time/*_s`).
- The learning curve (`report/learning_curve.png`): the training outcome reward per step, and held-out F1 at
  every evaluation: before training (step 0), every `trainer.eval_every` steps (`eval/avg/f1`), and after.
- `trajectories.jsonl`: rows `{"step", "question", "answers", "response", "outcome", "f1", "em", "key_reward",
  "queries", "retrieved" (doc ids per round), "gains", "penalties", "step_scores"}` (the per-round lists are
  parallel). The last few steps are shown, each search round colour-coded by its gain, redundancy and reward.

The trainer calls `write_report(run_dir)` at the end of a run (`trainer.report`); it can be rerun on any run dir.
"""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any

from stepsearch.trainer.run_dir import RunDir, read_eval, read_metrics, read_timings, read_trajectories

KEY_METRICS = (
    "outcome_reward",
    "f1",
    "em",
    "key_reward",
    "info_gain",
    "redundancy",
    "step_reward",
    "kl",
    "policy_loss",
    "value_loss",
    "entropy",
    "clip_frac",
    "approx_kl",
    "explained_variance",
    "response_length",
    "turns",
    "tokens_per_s",
)


def write_report(run_dir: str | os.PathLike, *, last_steps: int = 3, trajectories_per_step: int = 8) -> Path:
    """Write `report/metrics.png` and `report/index.html` for a run directory; returns the HTML page's path.

    Shows the trajectories of the `last_steps` most recent logged steps, at most `trajectories_per_step` of each.
    """
    paths = RunDir(Path(run_dir))
    out = paths.report
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    rows = _read(paths, paths.metrics, notes, read_metrics, paths, note_missing=True) or []
    columns = _plotted_columns(rows)
    png = out / "metrics.png"
    _plot_metrics(rows, columns, png)
    evals = {
        label: _read(paths, paths.eval_results(label), notes, read_eval, paths, label) for label in ("before", "after")
    }
    by_step: dict[int, list[dict[str, Any]]] = {}
    for row in _read(paths, paths.trajectories, notes, read_trajectories, paths) or []:
        by_step.setdefault(row["step"], []).append(row)
    trajectories = (
        [
            (step, [_rounds(row) for row in by_step[step][:trajectories_per_step]])
            for step in sorted(by_step)[-last_steps:]
        ]
        if last_steps > 0
        else []
    )

    curve = out / "learning_curve.png"
    _plot_learning_curve(rows, _held_out_f1(rows, evals), curve)
    timings = _read(paths, paths.timings, notes, read_timings, paths) or {}

    image = base64.b64encode(png.read_bytes()).decode("ascii")
    curve_image = base64.b64encode(curve.read_bytes()).decode("ascii")
    body = [
        f"<h1>StepSearch run: {_e(paths.root.name)}</h1>",
        "<h2>Learning curve</h2>",
        f'<p><a href="learning_curve.png"><img alt="learning curve" src="data:image/png;base64,{curve_image}"></a></p>',
        _summary_html(rows, columns),
        "<h2>Where the time went</h2>",
        _timings_html(timings, rows),
        "<h2>All metrics</h2>",
        f'<p><a href="metrics.png"><img alt="metrics" src="data:image/png;base64,{image}"></a></p>',
        "<h2>Evaluation before and after training</h2>",
        _eval_html(evals["before"], evals["after"]),
        "<h2>Trajectories</h2>",
        _legend_html(),
        *(_step_html(step, rows_of_step) for step, rows_of_step in trajectories),
    ]
    if not trajectories:
        body.append(f"<p class=note>No trajectories logged ({_e(paths.trajectories.name)}).</p>")
    if notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(note)}</li>" for note in notes) + "</ul>")
    page = out / "index.html"
    page.write_text(_PAGE.format(title=_e(paths.root.name), body="\n".join(body)), encoding="utf-8")
    return page


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _read(paths: RunDir, path: Path, notes: list[str], reader, *args: Any, note_missing: bool = False) -> Any:
    """`reader(*args)`, which reads `path`; None when the file is missing (noted if `note_missing`) or malformed
    (noted)."""
    name = path.relative_to(paths.root)
    if not path.is_file():
        if note_missing:
            notes.append(f"{name}: not found")
        return None
    try:
        return reader(*args)
    except (ValueError, UnicodeDecodeError) as exc:
        notes.append(f"{name}: not read ({exc})")
        return None


def _rounds(row: dict[str, Any]) -> dict[str, Any]:
    """The row with its parallel per-round lists zipped into `rounds` (doc ids stand for titles)."""

    def column(name: str) -> list[Any]:
        value = row.get(name)
        return value if isinstance(value, list) else []

    queries, retrieved = column("queries"), column("retrieved")
    gains, penalties, rewards = column("gains"), column("penalties"), column("step_scores")
    count = max(len(queries), len(retrieved), len(gains), len(penalties), len(rewards))

    def at(values: list[Any], index: int) -> Any:
        return values[index] if index < len(values) else None

    rounds = [
        {
            "query": at(queries, t) or "",
            "docs": at(retrieved, t) or [],
            "gain": at(gains, t),
            "redundancy": at(penalties, t),
            "step_reward": at(rewards, t),
        }
        for t in range(count)
    ]
    return {**row, "rounds": rounds}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _plotted_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Metric columns to plot, in KEY_METRICS order (see the module docstring for the matching), then eval/avg/*."""
    names = sorted({key for row in rows for key, value in row.items() if key != "step" and _number(value) is not None})
    columns = []
    for key in KEY_METRICS:
        columns += [
            name for name in names if key in _aliases(name) and name not in columns and not name.startswith("eval/")
        ]
    return columns + [name for name in names if name.startswith("eval/avg/")]


def _aliases(name: str) -> set[str]:
    parts = name.split("/")
    return {name, parts[-1], "_".join(parts), "_".join(reversed(parts))}


def _plot_metrics(rows: list[dict[str, Any]], columns: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, max(1, len(columns)))
    nrows = max(1, math.ceil(len(columns) / ncols))
    figure, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.8 * nrows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= len(columns):
            axis.axis("off")
            continue
        name = columns[index]
        points = [(row["step"], _number(row.get(name))) for row in rows if isinstance(row.get("step"), int)]
        points = [(step, value) for step, value in points if value is not None]
        steps = [step for step, _ in points]
        values = [value for _, value in points]
        axis.plot(
            steps,
            values,
            color="#4c78a8",
            alpha=0.45 if len(values) > 10 else 1.0,
            marker="." if len(values) <= 30 else None,
            linewidth=1,
        )
        if len(values) > 10:
            axis.plot(steps, _moving_average(values, max(2, len(values) // 10)), color="#1f3b73", linewidth=1.8)
        axis.set_title(name, fontsize=9)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    if not columns:
        axes.flat[0].text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
    figure.tight_layout()
    figure.savefig(png, dpi=90)
    plt.close(figure)


def _held_out_f1(rows: list[dict[str, Any]], evals: dict[str, dict[str, Any] | None]) -> list[tuple[int, float]]:
    """(step, held-out F1) at every evaluation: before (step 0), during (`eval/avg/f1` rows) and after."""
    points = []
    before, after = evals.get("before"), evals.get("after")
    if before and _number(before.get("average", {}).get("f1")) is not None:
        points.append((0, float(before["average"]["f1"])))
    points += [
        (row["step"], value)
        for row in rows
        if isinstance(row.get("step"), int) and (value := _number(row.get("eval/avg/f1"))) is not None
    ]
    steps = [row["step"] for row in rows if isinstance(row.get("step"), int)]
    if after and _number(after.get("average", {}).get("f1")) is not None:
        points.append((max(steps, default=0), float(after["average"]["f1"])))
    return points


def _plot_learning_curve(rows: list[dict[str, Any]], held_out: list[tuple[int, float]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (reward_axis, f1_axis) = plt.subplots(1, 2, figsize=(9.5, 3.2))
    points = [
        (row["step"], value)
        for row in rows
        if isinstance(row.get("step"), int) and (value := _number(row.get("reward/outcome"))) is not None
    ]
    if points:
        steps, values = zip(*points)
        reward_axis.plot(steps, values, color="#4c78a8", alpha=0.45, marker=".", linewidth=1)
        reward_axis.plot(
            steps,
            _moving_average(list(values), max(2, len(values) // 6)),
            color="#1f3b73",
            linewidth=1.8,
            label="moving average",
        )
        reward_axis.legend(fontsize=7)
    reward_axis.set_title("training outcome reward (sampled rollouts)", fontsize=9)
    if held_out:
        steps, values = zip(*held_out)
        f1_axis.plot(steps, values, color="#e45756", marker="o", linewidth=1.8)
        for step, value in held_out:
            f1_axis.annotate(
                f"{value:.3f}", (step, value), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7
            )
    f1_axis.set_title("held-out F1 (greedy)", fontsize=9)
    for axis in (reward_axis, f1_axis):
        axis.set_xlabel("StePPO step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png, dpi=90)
    plt.close(figure)


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points (shorter at the start, so the curve starts at the first step)."""
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


# ---------------------------------------------------------------------------------------------------------------
# HTML


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "-" if value is None else _e(value)
    if isinstance(value, int) or number.is_integer() and abs(number) >= 1:
        return f"{number:.0f}"
    return f"{number:.4g}"


def _summary_html(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "<p class=note>No metrics logged.</p>"
    lines = ["<table><tr><th>metric</th><th>first</th><th>last</th></tr>"]
    for name in columns:
        values = [v for row in rows if (v := _number(row.get(name))) is not None]
        if values:
            lines.append(f"<tr><td>{_e(name)}</td><td>{_fmt(values[0])}</td><td>{_fmt(values[-1])}</td></tr>")
    lines.append("</table>")
    steps = [row["step"] for row in rows if isinstance(row.get("step"), int)]
    head = f"<p>{len(rows)} metric rows, steps {min(steps)}–{max(steps)}.</p>" if steps else ""
    return head + "".join(lines)


def _timings_html(timings: dict[str, float], rows: list[dict[str, Any]]) -> str:
    """The whole job's stages with their shares, and the mean seconds of each stage of a StePPO step."""
    parts = []
    total = sum(timings.values())
    if timings:
        lines = ["<table><tr><th>stage</th><th>seconds</th><th>share</th></tr>"]
        lines += [
            f"<tr><td>{_e(name)}</td><td>{seconds:.1f}</td><td>{100 * seconds / max(total, 1e-9):.1f}%</td></tr>"
            for name, seconds in timings.items()
        ]
        lines.append(f"<tr><th>total</th><th>{total:.1f}</th><th></th></tr></table>")
        parts.append("".join(lines))
    else:
        parts.append("<p class=note>No stage timings (timings.json).</p>")
    stages = [name for name in (rows[-1] if rows else {}) if name.startswith("time/") and name != "time/step_s"]
    if stages:
        means = {
            name: sum(v for row in rows if (v := _number(row.get(name))) is not None) / len(rows) for name in stages
        }
        step_total = sum(means[name] for name in stages if name != "time/segmenter_s")
        lines = [
            "<p>Mean seconds per StePPO step:</p><table><tr><th>step stage</th><th>seconds</th><th>share</th></tr>"
        ]
        lines += [
            f"<tr><td>{_e(name)}</td><td>{value:.2f}</td><td>{100 * value / max(step_total, 1e-9):.1f}%</td></tr>"
            for name, value in means.items()
        ]
        parts.append("".join(lines) + "</table>")
    return "".join(parts)


def _eval_rows(result: dict[str, Any] | None) -> dict[tuple[str, str], float]:
    """(section, metric) -> number for every numeric field of an evaluation result, per-hop rows included."""
    flat: dict[tuple[str, str], float] = {}
    if result is None:
        return flat

    def add(section: str, fields: Any) -> None:
        if not isinstance(fields, dict):
            return
        for key, value in fields.items():
            if isinstance(value, dict) and key == "per_hop":
                for hop, hop_fields in value.items():
                    add(f"{section} / {hop}-hop", hop_fields)
            elif _number(value) is not None:
                flat[(section, str(key))] = float(value)

    datasets = result.get("datasets")
    if isinstance(datasets, dict):
        for name, fields in datasets.items():
            add(str(name), fields)
    add("average", result.get("average"))
    add("all", {"per_hop": result["per_hop"]} if isinstance(result.get("per_hop"), dict) else None)
    return flat


def _eval_html(before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    before_rows, after_rows = _eval_rows(before), _eval_rows(after)
    keys = list(dict.fromkeys([*before_rows, *after_rows]))
    if not keys:
        return "<p class=note>No evaluation results (eval_before/results.json, eval_after/results.json).</p>"
    lines = ["<table><tr><th>dataset</th><th>metric</th><th>before</th><th>after</th><th>change</th></tr>"]
    for section, metric in keys:
        old, new = before_rows.get((section, metric)), after_rows.get((section, metric))
        change = "" if old is None or new is None else f"{new - old:+.4g}"
        colour = "" if not change or new == old else (' class="up"' if new > old else ' class="down"')
        lines.append(
            f"<tr><td>{_e(section)}</td><td>{_e(metric)}</td><td>{_fmt(old)}</td><td>{_fmt(new)}</td>"
            f"<td{colour}>{change}</td></tr>"
        )
    return "".join(lines) + "</table>"


def _legend_html() -> str:
    return (
        '<p class=legend>Search rounds: <span style="background:'
        + _shade(0.8, positive=True)
        + '">gain / positive step reward</span> <span style="background:'
        + _shade(0.8, positive=False)
        + '">redundancy / negative step reward</span>; stronger colour = larger magnitude.</p>'
    )


def _shade(magnitude: float, *, positive: bool) -> str:
    alpha = min(1.0, max(0.0, abs(magnitude))) * 0.75
    return f"rgba(46,160,67,{alpha:.2f})" if positive else f"rgba(218,54,51,{alpha:.2f})"


def _cell(value: Any, kind: str) -> str:
    number = _number(value)
    if number is None:
        return f"<td>{_fmt(value)}</td>"
    positive = number >= 0 if kind == "reward" else kind == "gain"
    return f'<td style="background:{_shade(number, positive=positive)}">{_fmt(number)}</td>'


def _step_html(step: int, rows: list[dict[str, Any]]) -> str:
    parts = [f"<h3>Step {step}</h3>"]
    if not rows:
        parts.append("<p class=note>No rows.</p>")
    for row in rows:
        answers = row.get("answers")
        answers = ", ".join(map(str, answers)) if isinstance(answers, list) else answers
        scores = " ".join(
            f"<span class=score>{name} {_fmt(row.get(name))}</span>"
            for name in ("outcome", "f1", "em", "key_reward")
            if name in row
        )
        parts.append(
            f"<div class=traj><p><b>Q:</b> {_e(row.get('question', ''))}<br><b>Gold:</b> "
            f"{_e(answers if answers is not None else '')}<br>{scores}</p>"
        )
        rounds = row.get("rounds") if isinstance(row.get("rounds"), list) else []
        if rounds:
            parts.append(
                "<table><tr><th>#</th><th>query</th><th>retrieved</th><th>gain</th><th>redundancy</th>"
                "<th>step reward</th></tr>"
            )
            for index, search in enumerate(rounds, start=1):
                search = search if isinstance(search, dict) else {}
                docs = search.get("docs") if isinstance(search.get("docs"), list) else []
                titles = "<br>".join(_e(doc) for doc in docs)
                parts.append(
                    f"<tr><td>{index}</td><td>{_e(search.get('query', ''))}</td><td>{titles}</td>"
                    f"{_cell(search.get('gain'), 'gain')}{_cell(search.get('redundancy'), 'penalty')}"
                    f"{_cell(search.get('step_reward'), 'reward')}</tr>"
                )
            parts.append("</table>")
        else:
            parts.append("<p class=note>No search rounds.</p>")
        parts.append(f"<details><summary>response</summary><pre>{_e(row.get('response', ''))}</pre></details></div>")
    return "\n".join(parts)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>StepSearch report: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1300px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; vertical-align: top; text-align: left; }}
img {{ max-width: 100%; }}
pre {{ white-space: pre-wrap; background: #f6f8fa; padding: 0.6em; font-size: 0.85em; }}
.traj {{ border-left: 3px solid #4c78a8; padding-left: 0.8em; margin: 1em 0; }}
.score {{ background: #eef; padding: 1px 6px; margin-right: 6px; border-radius: 3px; }}
.note {{ color: #777; }} .up {{ color: #1a7f37; }} .down {{ color: #cf222e; }}
</style></head><body>
{body}
</body></html>
"""
