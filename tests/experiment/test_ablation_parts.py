"""The ablation's bookkeeping: which reward terms each variant switches on, and the mean ± std table."""
import json
import math

import pytest

from stepsearch.config import load_config
from stepsearch.experiment import (
    diagnostics_table,
    markdown_table,
    mean_std,
    plot_curves,
    summarise_eval,
    variant_config,
    with_held_out_ends,
)
from stepsearch.trainer.run_dir import read_eval


def test_variants_switch_exactly_the_reward_terms():
    base = load_config(None, ["reward.key_weight=0.5", "reward.step_weight=1.6", "trainer.warm_start_steps=7"])
    outcome = variant_config(base, "outcome", 3, "o")
    key = variant_config(base, "key", 3, "k")
    full = variant_config(base, "full", 3, "f")
    assert (outcome.reward.key_weight, outcome.reward.step_weight) == (0.0, 0.0)
    assert (key.reward.key_weight, key.reward.step_weight) == (0.5, 0.0)
    assert (full.reward.key_weight, full.reward.step_weight) == (0.5, 1.6)
    for cfg, name in ((outcome, "o"), (key, "k"), (full, "f")):
        assert cfg.trainer.seed == 3 and cfg.trainer.run_name == name and cfg.trainer.warm_start_steps == 0
        assert cfg.ppo == base.ppo and cfg.rollout == base.rollout  # same samples, same optimiser
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config(base, "steps-only", 0, "x")


def evaluation(f1_by_hop, em, f1, n):
    return {"num_questions": n, "em": em, "f1": f1, "searches_per_question": 2.0, "valid_format_rate": 1.0,
            "info_gain_per_search": 0.5, "redundancy_per_search": None,
            "per_hop": {str(h): {"n": n / 2, "em": em, "f1": v} for h, v in f1_by_hop.items()}}


def test_summary_pools_files_by_question_count(tmp_path):
    result = {"datasets": {"a": evaluation({2: 0.2, 3: 0.4}, 0.1, 0.3, 10),
                           "b": evaluation({2: 0.6}, 0.4, 0.6, 30)}}
    (tmp_path / "eval_after").mkdir()
    (tmp_path / "eval_after" / "results.json").write_text(json.dumps(result))
    row = summarise_eval(read_eval(tmp_path, "after"))
    assert row["em"] == pytest.approx((0.1 * 10 + 0.4 * 30) / 40)
    assert row["f1"] == pytest.approx((0.3 * 10 + 0.6 * 30) / 40)
    assert row["f1_2hop"] == pytest.approx((0.2 * 5 + 0.6 * 15) / 20)
    assert row["f1_3hop"] == pytest.approx(0.4)
    assert math.isnan(row["redundancy"]) and row["questions"] == 40
    with pytest.raises(FileNotFoundError, match="eval_before.*no evaluation 'before'"):
        read_eval(tmp_path, "before")


def test_mean_std_is_the_sample_std_and_ignores_nan():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
    assert mean_std([5.0, float("nan")]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([float("nan")]))


def test_table_has_one_row_per_variant_with_mean_and_std(tmp_path):
    rows = {"outcome": [{"em": 0.1, "f1": 0.2, "f1_2hop": 0.3}, {"em": 0.3, "f1": 0.4, "f1_2hop": 0.5}],
            "full": [{"em": 0.5, "f1": 0.6, "f1_2hop": 0.7}]}
    table = markdown_table(rows, baseline={"em": 0.05, "f1": 0.1})
    lines = table.strip().splitlines()
    assert lines[0].startswith("| variant | seeds | em | f1 | f1 2hop |")
    assert lines[2].startswith("| start (no RL) |")
    assert "| outcome | 2 | 20.0 ± 14.1 | 30.0 ± 14.1 | 40.0 ± 14.1 |" in table
    assert "| full | 1 | 50.0 ± 0.0 |" in table


def test_curves_plot_writes_a_png(tmp_path):
    curves = {"outcome": [[{"step": 1, "reward/f1": 0.1}, {"step": 2, "reward/f1": 0.2}]],
              "full": [[{"step": 1, "reward/f1": 0.3}]]}
    path = plot_curves(curves, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves({"outcome": [[{"step": 1}]]}, tmp_path / "none.png") is None


def test_held_out_f1_curve_starts_at_the_shared_start_and_ends_at_the_final_evaluation():
    rows = [{"step": 10, "eval/avg/f1": 0.2, "reward/step_reward": 0.5}, {"step": 20, "reward/step_reward": 0.7}]
    curve = with_held_out_ends(rows, start_f1=0.125, end_f1=0.3, last_step=30)
    assert [(r["step"], r.get("eval/avg/f1")) for r in curve] == [(0, 0.125), (10, 0.2), (20, None), (30, 0.3)]
    # the added ends carry no reward terms, so the diagnostics average only the logged steps
    assert "| 0.600 |" in diagnostics_table({"full": [curve]})


def test_paired_table_compares_each_variant_with_outcome_seed_by_seed():
    from stepsearch.experiment import paired_table

    rows = {"outcome": [{"f1": 0.10}, {"f1": 0.20}], "key": [{"f1": 0.10}, {"f1": 0.25}],
            "full": [{"f1": 0.30}, {"f1": 0.30}]}
    table = paired_table(rows, [0, 1])
    assert "| 0 | 10.0 | 10.0 | 30.0 | +0.0 | +20.0 |" in table
    assert "| 1 | 20.0 | 25.0 | 30.0 | +5.0 | +10.0 |" in table
    # mean ± sample std of the differences, and the seeds where the variant beat outcome
    assert "key − outcome: +2.5 ± 3.5 F1 points, better in 1 of 2 seeds" in table
    assert "full − outcome: +15.0 ± 7.1 F1 points, better in 2 of 2 seeds" in table
    assert paired_table({"full": [{"f1": 0.3}]}, [0]) == ""  # nothing to pair without the outcome variant


def test_diagnostics_table_averages_reward_scales_and_advantage_placement_over_steps_and_seeds():
    curves = {"outcome": [[{"step": 1, "reward/outcome": 0.2, "advantage/abs_at_search_end": 0.5},
                           {"step": 2, "reward/outcome": 0.4, "advantage/abs_at_search_end": 0.7}],
                          [{"step": 1, "reward/outcome": 0.6}]],
              "full": [[{"step": 1, "reward/outcome": 0.0, "reward/step_reward": 0.3}]]}
    table = diagnostics_table(curves)
    assert table.splitlines()[0] == (
        "| variant | outcome reward | step reward per trajectory | \\|A\\| at `</search>` |")
    assert "| outcome | 0.400 | n/a | 0.600 |" in table and "| full | 0.000 | 0.300 | n/a |" in table
    assert diagnostics_table({"outcome": [[{"step": 1}]]}) == ""
