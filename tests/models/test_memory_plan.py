"""The memory plan of docs/gpu.md: parameter and KV-cache sizes of Qwen2.5-3B/7B against their published figures,
each component of a toy plan against hand arithmetic, and the GPU presets fit on 8 x 80 GB and 8 x 141 GB with a
KV cache that holds a rank's whole rollout."""
from __future__ import annotations

from pathlib import Path

import pytest

from stepsearch.config import load_config
from stepsearch.models.memory_plan import (
    CARDS,
    GIB,
    QWEN25_3B,
    QWEN25_7B,
    ModelShape,
    RunShape,
    plan,
    preset_run_shape,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_published_sizes():
    assert QWEN25_3B.causal_lm_params == pytest.approx(3.09e9, rel=0.01)  # Qwen2.5-3B: 3.09B, tied embeddings
    assert QWEN25_7B.causal_lm_params == pytest.approx(7.61e9, rel=0.01)  # Qwen2.5-7B: 7.61B
    assert QWEN25_3B.kv_bytes_per_token == 2 * 36 * 2 * 128 * 2 == 36864
    assert QWEN25_7B.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57344


def test_a_toy_plan_by_hand():
    toy = ModelShape("toy", vocab=100, hidden=8, layers=2, heads=2, kv_heads=1, intermediate=16, tied_embeddings=False)
    # layer: q 64 + o 64 + k 32 + v 32 + biases 8 + 4 + 4, MLP 3 * 8 * 16 = 384, norms 16 -> 608
    assert toy.layer_params == 608
    assert toy.backbone_params == 800 + 2 * 608 + 8 == 2024 and toy.causal_lm_params == 2824
    run = RunShape(gpus=2, gpu_gib=1.0, rows=3, seq_len=10, mem_fraction=0.5, bucket_mb=256, logprob_chunk=4,
                   runtime_gib=0.25, sglang_overhead_gib=0.125)
    out = plan(toy, run)
    assert out["actor_shards"] * GIB == pytest.approx(20 * 2824 / 2)
    assert out["critic_shards"] * GIB == pytest.approx(20 * (2024 + 9) / 2)
    assert out["reference_shards"] * GIB == pytest.approx(2 * 2824 / 2)
    assert out["kv_cache"] == pytest.approx(0.5 - 2 * 2824 / GIB)
    assert out["checkpointed_activations"] * GIB == pytest.approx(2 * 30 * 8 * 2 * 2)
    assert out["layer_recompute"] * GIB == pytest.approx(30 * 2 * (48 + 8 + 64) * 2)
    assert out["logprob_chunk"] * GIB == pytest.approx(2 * 30 * 4 * 4)
    persistent = out["actor_shards"] + out["critic_shards"] + out["reference_shards"] + 0.25
    assert out["phase_rollout"] == pytest.approx(persistent + 0.5 + 0.125)
    assert out["phase_weight_sync"] == pytest.approx(persistent + 2 * 2824 / GIB + 0.25)
    assert out["peak"] == max(out["phase_rollout"], out["phase_weight_sync"], out["phase_training"])


@pytest.mark.parametrize("name, model", [("3b", QWEN25_3B), ("7b", QWEN25_7B)])
@pytest.mark.parametrize("card", list(CARDS))
def test_the_gpu_presets_fit_with_room_for_a_ranks_rollout(name, model, card):
    path = CONFIGS / f"stepsearch_qwen2.5_{name}.yaml"
    cfg = load_config(path)
    run = preset_run_shape(str(path), gpus=8, gpu_gib=CARDS[card])
    out = plan(model, run)
    assert out["peak"] <= 0.92 * CARDS[card], out
    rollout_tokens = cfg.ppo.rollout_batch_size * cfg.rollout.samples_per_prompt // 8 * run.seq_len
    assert out["kv_cache_tokens"] >= rollout_tokens
    assert cfg.trainer.device == "cuda" and cfg.deepspeed.offload_optimizer is False
    assert cfg.rollout.sglang_release_memory is True
