"""The paper's central ablation, runnable in miniature on a CPU and at full scale on a cluster.

`stepsearch experiment ablation --config configs/tiny_cpu.yaml --seeds 3 [--steps N] [--out DIR] [k=v ...]`

From ONE warm-started checkpoint, with the same number of steps, questions and samples, it trains three reward
variants (StepSearch's Table 3 rows):

    outcome   answer F1 (+ format penalty) only            reward.key_weight=0     reward.step_weight=0
    key       outcome + search-key reward                  reward.key_weight=cfg   reward.step_weight=0
    full      outcome + search-key + step rewards (StePPO) reward.key_weight=cfg   reward.step_weight=cfg

(`cfg` = the preset's own values, so `--config configs/parity.yaml` ablates the released code's semantics.) Each
variant × seed is evaluated greedily on the held-out questions; the report gives mean ± std over seeds of EM, F1,
searches per question, information gain and redundancy per search, F1 per hop count, and a PNG of the training
curves. With a real preset (`model.actor_path` set, `data.train_path`/`data.test_paths` given) there is no warm
start: every variant starts from the given checkpoint, which is how the paper's ablation is run on a cluster.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from stepsearch.config import Config, load_config
from stepsearch.trainer.run_dir import read_eval, read_metrics

VARIANTS = ("outcome", "key", "full")


def variant_config(base: Config, variant: str, seed: int, run_name: str) -> Config:
    """The base config with the reward terms of `variant` switched on and the run's identity set."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant '{variant}' (choose from {', '.join(VARIANTS)})")
    reward = replace(
        base.reward,
        key_weight=0.0 if variant == "outcome" else base.reward.key_weight,
        step_weight=base.reward.step_weight if variant == "full" else 0.0,
    )
    trainer = replace(base.trainer, seed=seed, run_name=run_name, warm_start_steps=0, eval_before=False)
    return replace(base, reward=reward, trainer=trainer)


def summarise_eval(result: dict[str, Any]) -> dict[str, float]:
    """Flatten one evaluation (all test files pooled by question count) to the ablation's scalar columns."""
    datasets = list(result["datasets"].values())
    total = sum(d["num_questions"] for d in datasets) or 1

    def pooled(key: str) -> float:
        values = [(d[key], d["num_questions"]) for d in datasets if d.get(key) is not None]
        weight = sum(n for _, n in values)
        return sum(v * n for v, n in values) / weight if weight else float("nan")

    row = {"em": pooled("em"), "f1": pooled("f1"), "searches": pooled("searches_per_question"),
           "info_gain": pooled("info_gain_per_search"), "redundancy": pooled("redundancy_per_search"),
           "questions": float(total)}
    hops: dict[str, list[tuple[float, float]]] = {}
    for d in datasets:
        for hop, values in d.get("per_hop", {}).items():
            hops.setdefault(str(hop), []).append((values["f1"], values["n"]))
    for hop, values in sorted(hops.items()):
        weight = sum(n for _, n in values)
        row[f"f1_{hop}hop"] = sum(f * n for f, n in values) / weight if weight else float("nan")
    return row


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def markdown_table(rows: dict[str, list[dict[str, float]]], baseline: dict[str, float] | None) -> str:
    """Mean ± std over seeds; percentages for EM/F1."""
    columns = ["em", "f1"] + sorted({k for runs in rows.values() for r in runs for k in r if k.startswith("f1_")}) + [
        "searches", "info_gain", "redundancy"]
    percent = {c for c in columns if c == "em" or c.startswith("f1")}
    header = "| variant | seeds | " + " | ".join(c.replace("_", " ") for c in columns) + " |"
    lines = [header, "|---|---|" + "---|" * len(columns)]

    def cell(column: str, values: list[float]) -> str:
        mean, std = mean_std(values)
        scale = 100.0 if column in percent else 1.0
        return "n/a" if math.isnan(mean) else f"{scale * mean:.1f} ± {scale * std:.1f}" if scale == 100.0 \
            else f"{mean:.3f} ± {std:.3f}"

    if baseline is not None:
        lines.append("| start (no RL) | - | " + " | ".join(cell(c, [baseline.get(c, float('nan'))])
                                                             for c in columns) + " |")
    for variant, runs in rows.items():
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cell(c, [r.get(c, float('nan')) for r in runs])
                                                              for c in columns) + " |")
    return "\n".join(lines) + "\n"


def paired_table(rows: dict[str, list[dict[str, float]]], seeds: list[int], reference: str = "outcome") -> str:
    """Per seed, each variant's held-out F1 and its difference from `reference` trained with the same seed (same
    start, data order and samples up to the reward), then the mean ± std of the differences and the win count."""
    others = [v for v in rows if v != reference]
    if reference not in rows or not others:
        return ""
    header = "| seed | " + " | ".join(f"F1 {v}" for v in rows) + " | " + " | ".join(
        f"{v} − {reference}" for v in others) + " |"
    lines = [header, "|---|" + "---|" * (len(rows) + len(others))]
    deltas: dict[str, list[float]] = {v: [] for v in others}
    for index, seed in enumerate(seeds):
        f1 = {v: rows[v][index]["f1"] for v in rows if index < len(rows[v])}
        if reference not in f1:
            continue
        for v in others:
            if v in f1:
                deltas[v].append(f1[v] - f1[reference])
        lines.append(f"| {seed} | " + " | ".join(f"{100 * f1[v]:.1f}" if v in f1 else "n/a" for v in rows) + " | "
                     + " | ".join(f"{100 * (f1[v] - f1[reference]):+.1f}" if v in f1 else "n/a" for v in others)
                     + " |")
    summary = []
    for v in others:
        mean, std = mean_std(deltas[v])
        wins = sum(d > 0 for d in deltas[v])
        summary.append(f"{v} − {reference}: {100 * mean:+.1f} ± {100 * std:.1f} F1 points, better in {wins} of "
                       f"{len(deltas[v])} seeds")
    return "\n".join(lines) + "\n\n" + "; ".join(summary) + ".\n"


DIAGNOSTIC_KEYS = (("reward/outcome", "outcome reward"), ("reward/key_reward", "search-key reward r_key"),
                   ("reward/step_reward", "step reward per trajectory"), ("reward/info_gain", "gain per search"),
                   ("reward/redundancy", "redundancy per search"),
                   # escaped pipes: |A| inside a markdown table cell
                   ("advantage/abs_at_search_end", "\\|A\\| at `</search>`"),
                   ("advantage/abs_at_last_token", "\\|A\\| at last token"),
                   ("advantage/abs_all_tokens", "\\|A\\| all tokens"))


def diagnostics_table(curves: dict[str, list[list[dict[str, Any]]]]) -> str:
    """Mean over steps and seeds of each reward term's scale and of the advantage reaching search-step tokens vs
    the last token: why a reward term does or does not move the policy."""
    present = [(k, label) for k, label in DIAGNOSTIC_KEYS
               if any(k in row for runs in curves.values() for rows in runs for row in rows)]
    if not present:
        return ""
    lines = ["| variant | " + " | ".join(label for _, label in present) + " |", "|---|" + "---|" * len(present)]
    for variant, runs in curves.items():
        cells = []
        for key, _ in present:
            values = [float(row[key]) for rows in runs for row in rows
                      if isinstance(row.get(key), (int, float)) and not math.isnan(float(row[key]))]
            cells.append(f"{sum(values) / len(values):.3f}" if values else "n/a")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CURVE_KEYS = (("reward/outcome", "train outcome reward"), ("eval/avg/f1", "held-out F1"),
              ("reward/f1", "train answer F1"), ("reward/key_reward", "search-key reward"),
              ("reward/info_gain", "information gain per search"), ("reward/redundancy", "redundancy per search"),
              ("response/turns", "searches per trajectory"), ("kl", "KL(actor || ref)"))


def with_held_out_ends(rows: list[dict[str, Any]], start_f1: float, end_f1: float,
                       last_step: int) -> list[dict[str, Any]]:
    """A run's metric rows plus its held-out F1 at step 0 (the shared start) and at its last step (`eval_after`):
    the rows log only the evaluations in between, so the F1 curve would otherwise miss where it starts and ends."""
    return [{"step": 0, "eval/avg/f1": start_f1}, *rows, {"step": last_step, "eval/avg/f1": end_f1}]


def plot_curves(curves: dict[str, list[list[dict[str, Any]]]], out_path: Path) -> Path | None:
    """One panel per metric; each variant's mean over seeds with a ±std band. None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    present = [(k, label) for k, label in CURVE_KEYS
               if any(k in row for runs in curves.values() for rows in runs for row in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], present):
        for variant, runs in curves.items():
            by_step: dict[int, list[float]] = {}
            for rows in runs:
                for row in rows:
                    value = row.get(key)
                    if value is not None and not (isinstance(value, float) and math.isnan(value)):
                        by_step.setdefault(int(row["step"]), []).append(float(value))
            if not by_step:
                continue
            steps = np.array(sorted(by_step))
            mean = np.array([np.mean(by_step[s]) for s in steps])
            std = np.array([np.std(by_step[s]) for s in steps])
            ax.plot(steps, mean, label=variant)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(label)
        ax.set_xlabel("step")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def run_ablation(base: Config, seeds: list[int], out_dir: Path, variants: tuple[str, ...] = VARIANTS) -> Path:
    """Warm start once (tiny default), train every variant × seed from it, write ablation.{md,json,png}."""
    from stepsearch.train import train

    out_dir.mkdir(parents=True, exist_ok=True)
    base = replace(base, trainer=replace(base.trainer, output_dir=str(out_dir)))
    baseline = None
    if base.model.actor_path is None:
        if base.trainer.warm_start_steps <= 0:
            raise ValueError("the tiny ablation needs trainer.warm_start_steps > 0 (all variants start from it)")
        warm_cfg = replace(base, trainer=replace(base.trainer, run_name="warm_start", total_steps=0,
                                                 eval_before=False))
        warm_dir = train(warm_cfg)
        checkpoint = warm_dir / "warm_start"
        base = replace(base, model=replace(base.model, actor_path=str(checkpoint), tokenizer_path=str(checkpoint)))
        baseline = summarise_eval(read_eval(warm_dir, "after"))
    else:  # every variant starts from the given checkpoint: evaluate it once
        start_cfg = replace(base, trainer=replace(base.trainer, run_name="start", total_steps=0, eval_before=False))
        baseline = summarise_eval(read_eval(train(start_cfg), "after"))

    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    curves: dict[str, list[list[dict[str, Any]]]] = {v: [] for v in variants}
    for seed in seeds:
        for variant in variants:
            run_dir = train(variant_config(base, variant, seed, f"{variant}-seed{seed}"))
            results[variant].append(summarise_eval(read_eval(run_dir, "after")))
            curves[variant].append(with_held_out_ends(read_metrics(run_dir), baseline["f1"], results[variant][-1]["f1"],
                                                      base.trainer.total_steps))

    table = markdown_table(results, baseline)
    paired = paired_table(results, seeds)
    diagnostics = diagnostics_table(curves)
    plot = plot_curves(curves, out_dir / "ablation_curves.png")
    (out_dir / "ablation.json").write_text(json.dumps(
        {"seeds": seeds, "baseline": baseline, "results": results}, indent=2), encoding="utf-8")
    ppo = base.ppo
    body = [f"# Reward ablation ({len(seeds)} seed(s), {base.trainer.total_steps} steps each)", "", table]
    if paired:
        body += ["", "## Paired by seed (held-out F1, points)", "", paired]
    if diagnostics:
        body += ["", f"## Reward scale and where the advantage lands (γ = {ppo.gamma}, λ = {ppo.lam}, means over "
                     "steps and seeds)", "", diagnostics]
    if plot is not None:
        body += ["", f"![training curves]({plot.name})"]
    (out_dir / "ablation.md").write_text("\n".join(body) + "\n", encoding="utf-8")
    print(table)
    if paired:
        print(paired)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stepsearch experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=["ablation"], help="the experiment to run")
    parser.add_argument("--config", required=True, help="YAML preset (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (0, 1, ... N-1)")
    parser.add_argument("--steps", type=int, default=None, help="StePPO steps per run (default: the preset's)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of outcome,key,full")
    parser.add_argument("--out", default="runs/ablation", help="directory for all runs and the report")
    parser.add_argument("overrides", nargs="*", help="section.field=value config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    overrides = list(args.overrides) + ([f"trainer.total_steps={args.steps}"] if args.steps is not None else [])
    cfg = load_config(args.config, overrides)
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    run_ablation(cfg, list(range(args.seeds)), Path(args.out), variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
