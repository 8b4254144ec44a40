"""The ablation end to end at toy sizes: one warm start, three variants × one seed, a table and curves."""
import json

import pytest

from stepsearch.config import load_config
from stepsearch.experiment import VARIANTS, run_ablation

ABLATION = ["trainer.warm_start_steps=2", "trainer.total_steps=2", "trainer.save_every=0",
            "trainer.eval_max_questions=4", "trainer.report=false", "deepspeed.enabled='off'"]


def test_ablation_runs_every_variant_from_one_warm_start(tmp_path, toy_config):
    cfg = toy_config(tmp_path, *ABLATION)
    out = run_ablation(cfg, seeds=[0], out_dir=tmp_path)

    table = (out / "ablation.md").read_text()
    for variant in VARIANTS:
        assert f"| {variant} | 1 |" in table
    assert "| start (no RL) |" in table
    summary = json.loads((out / "ablation.json").read_text())
    assert set(summary["results"]) == set(VARIANTS)
    assert (out / "ablation_curves.png").read_bytes()[:4] == b"\x89PNG"

    warm = out / "warm_start" / "warm_start"
    for variant in VARIANTS:
        run = load_config(out / f"{variant}-seed0" / "config.yaml")
        assert run.model.actor_path == str(warm) and run.trainer.warm_start_steps == 0
        assert (run.reward.key_weight > 0) == (variant != "outcome")
        assert (run.reward.step_weight > 0) == (variant == "full")
        rows = [json.loads(line) for line in (out / f"{variant}-seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2]
        for row in rows:
            if variant == "outcome":  # format penalty 0, no key term: outcome = valid * F1 <= F1
                assert row["reward/outcome"] <= row["reward/f1"] + 1e-6
            if variant != "full":  # no step reward reaches the tokens
                assert row["reward/step_reward"] == 0.0


@pytest.mark.slow
def test_full_cpu_ablation_from_scratch(tmp_path):
    """The CPU experiment as documented (warm start included, 3 variants x 3 seeds); tens of minutes on 2 cores."""
    cfg = load_config("configs/tiny_cpu.yaml", ["trainer.total_steps=6", "ppo.rollout_batch_size=4",
                                                "ppo.mini_batch_size=16", "trainer.eval_max_questions=30",
                                                "trainer.report=false", "trainer.save_every=0"])
    out = run_ablation(cfg, seeds=[0, 1, 2], out_dir=tmp_path)
    summary = json.loads((out / "ablation.json").read_text())
    assert all(len(runs) == 3 for runs in summary["results"].values())
    assert summary["baseline"]["questions"] == 30
