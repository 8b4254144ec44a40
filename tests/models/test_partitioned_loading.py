"""Under a ZeRO-3 config, actor, reference and critic backbone are built partitioned (`partitioned_loading`):
every parameter is a ZeRO parameter from construction, with no full local copy, and gathering it gives back the
checkpoint's values. Runs in a child process with a one-rank gloo group on the CPU accelerator."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")

CHILD = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from stepsearch.config import ModelConfig
    from stepsearch.models.actor_critic import build_critic, build_reference, load_causal_lm, partitioned_loading
    from stepsearch.models.tiny import build_tiny_model
    from stepsearch.models.tokenizer import train_tokenizer

    out = sys.argv[1]
    tokenizer = train_tokenizer([f"doc {i} <search>q {i}</search>" for i in range(40)], vocab_size=320, out_dir=out)
    cfg = ModelConfig(tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2, tiny_num_kv_heads=1,
                      tiny_intermediate_size=48, tiny_copy_circuit=False)
    saved = build_tiny_model(cfg, tokenizer, seed=3)
    saved.save_pretrained(out)
    dist.init_process_group("gloo", rank=0, world_size=1)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
    with partitioned_loading(ds_config):
        actor = load_causal_lm(out, torch.float32, "sdpa")
        reference = build_reference(None, 64, path=out, dtype=torch.float32)
        critic = build_critic(ModelConfig(), None, torch.float32, "sdpa", seed=0, initial_path=out)
    import deepspeed
    for name, module in (("actor", actor), ("reference", reference.lm), ("critic", critic.backbone)):
        params = list(module.parameters())
        assert all(hasattr(p, "ds_id") for p in params), name
        assert all(p.numel() == 0 for p in params), name  # the local tensor is empty: only the shard exists
    weight = actor.model.embed_tokens.weight
    with deepspeed.zero.GatheredParameters([weight]):
        assert torch.equal(weight.detach().clone(), saved.model.embed_tokens.weight.detach())
    plain = load_causal_lm(out, torch.float32, "sdpa")  # after the block: plain loading again
    assert not any(hasattr(p, "ds_id") for p in plain.parameters())
    with partitioned_loading({"zero_optimization": {"stage": 2}}):
        assert not any(hasattr(p, "ds_id") for p in load_causal_lm(out, torch.float32, "sdpa").parameters())
    print("PARTITIONED OK")
""")


def test_models_are_built_partitioned_under_zero3(tmp_path):
    port = 29000 + os.getpid() % 500
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
               LOCAL_RANK="0", WORLD_SIZE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0 and "PARTITIONED OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
