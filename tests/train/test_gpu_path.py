"""The GPU path's start-up and bookkeeping, pinned on the CPU: a missing GPU is an error, never a CPU run; the
process-group timeout is the configured one; no JIT-built optimizer by default; one process trains 16-bit models
with fp32 parameters; the rollout engine starts before any model and, under ZeRO-3, the models are loaded inside
`partitioned_loading`; scoring uses the update's micro-batch; evaluation is sharded over the ranks."""
from __future__ import annotations

import contextlib
import datetime
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import stepsearch.eval
from stepsearch import train as trainer
from stepsearch.config import ConfigError, ModelConfig
from stepsearch.models import actor_critic
from stepsearch.models.tiny import build_tiny_model
from stepsearch.models.tokenizer import train_tokenizer
from stepsearch.rollout import engine as rollout_engine
from stepsearch.seeds import derive_seed
from stepsearch.trainer import build, engines, ranks
from stepsearch.trainer.build import Context
from stepsearch.trainer.engines import LocalTrainEngine, check_optimizer, deepspeed_config

# ---------------------------------------------------------------------------------------------------------------
# device, timeout, optimizer


def test_cuda_without_a_gpu_is_an_error_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match="trainer.device=cuda, but this torch is a CPU-only build"):
        build.resolve_device("cuda", None)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ConfigError, match=r"built for CUDA 12.8\) finds no usable GPU; check the driver"):
        build.resolve_device("cuda", 0)
    assert build.resolve_device("auto", 0) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert build.resolve_device("cuda", 1) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="local rank 3 has no GPU"):
        build.resolve_device("cuda", 3)


def test_setup_stops_before_anything_runs_when_cuda_is_missing(tmp_path, toy_config, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.device=cuda"):
        build.setup(toy_config(tmp_path, "trainer.device=cuda", "deepspeed.enabled='off'"))
    assert not (tmp_path / "tiny_cpu").exists()


def test_the_process_group_gets_the_configured_timeout(monkeypatch):
    seen = {}
    fake = types.ModuleType("deepspeed")
    fake.init_distributed = lambda **kwargs: seen.update(kwargs)
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    assert ranks.init_process_group(7) == (0, 0, 1)
    assert seen["timeout"] == datetime.timedelta(minutes=7)


def test_deepspeed_trains_in_bf16_where_the_model_dtype_says_so(tmp_path, toy_config):
    def bf16(dtype, on_gpu):
        cfg = toy_config(tmp_path, f"model.dtype={dtype}")
        return deepspeed_config(cfg, lr=1e-6, train=True, on_gpu=on_gpu, dp_size=2)["bf16"]["enabled"]

    assert bf16("auto", on_gpu=True) and not bf16("auto", on_gpu=False)
    assert bf16("bfloat16", on_gpu=True) and bf16("bfloat16", on_gpu=False)  # an explicit choice holds on CPU
    assert not bf16("float32", on_gpu=True) and not bf16("float32", on_gpu=False)


def test_no_jit_built_optimizer_unless_asked_and_then_checked_early(tmp_path, toy_config, monkeypatch):
    cfg = toy_config(tmp_path)
    params = deepspeed_config(cfg, lr=1e-6, train=True, on_gpu=True, dp_size=8)["optimizer"]["params"]
    assert params["torch_adam"] is True  # FusedAdam would be compiled with nvcc at the first step
    fused = toy_config(tmp_path, "deepspeed.optimizer=fused")
    assert deepspeed_config(fused, lr=1e-6, train=True, on_gpu=True, dp_size=8)["optimizer"]["params"][
        "torch_adam"] is False
    pytest.importorskip("deepspeed")
    import deepspeed.git_version_info
    import torch.utils.cpp_extension

    monkeypatch.setattr(deepspeed.git_version_info, "installed_ops", {}, raising=False)
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", None)
    with pytest.raises(ConfigError, match=r"deepspeed.optimizer=fused: DeepSpeed's fused_adam .*nvcc"):
        check_optimizer(fused.deepspeed, on_gpu=True)
    check_optimizer(cfg.deepspeed, on_gpu=True)  # torch's AdamW: nothing to check


# ---------------------------------------------------------------------------------------------------------------
# one process: fp32 parameters for a 16-bit model


def test_a_bf16_model_trained_without_deepspeed_moves_at_a_tiny_learning_rate():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1)).to(torch.bfloat16)
    inputs = torch.randn(8, 16)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1)).to(torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    before = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    engine = LocalTrainEngine(model, lr=1e-6, weight_decay=0.0, warmup_steps=0, grad_clip=0.0)
    out = engine(inputs)
    assert out.dtype == torch.bfloat16  # forward under bf16 autocast
    engine.backward(out.float().pow(2).mean())
    engine.step()
    for name, p in model.named_parameters():
        assert bool((p.detach() != before[name]).all()), name  # every single weight moved
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(state["exp_avg"].dtype == torch.float32 for state in engine.optimizer.state.values())

    # what the engine prevents: AdamW on the bf16 parameters themselves rounds the update away (all but the
    # weights within ~5e-4 of zero, where bf16's spacing is finer than 1e-6)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-6, weight_decay=0.0)
    plain(inputs.to(torch.bfloat16)).float().pow(2).mean().backward()
    optimizer.step()
    changed = sum(int((p.detach().float() != before[name]).sum()) for name, p in plain.named_parameters())
    assert changed < 0.02 * sum(p.numel() for p in plain.parameters())


# ---------------------------------------------------------------------------------------------------------------
# start-up order


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy")
    tokenizer = train_tokenizer([f"doc {i} <search>q {i}</search>" for i in range(40)], vocab_size=320, out_dir=out)
    cfg = ModelConfig(tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2, tiny_num_kv_heads=1,
                      tiny_intermediate_size=48, tiny_copy_circuit=False)
    build_tiny_model(cfg, tokenizer, seed=0).save_pretrained(out)
    return out, tokenizer


def record_startup(monkeypatch, events: list):
    """Record the rollout engine's start and every model load, in order."""
    def engine(rollout_cfg, model, tokenizer, device=None, **kwargs):
        events.append(("engine", kwargs))
        return types.SimpleNamespace(release_memory=lambda: None)

    def recorded(name, function):
        def load(path, *args, **kwargs):
            events.append((name, str(path)))
            return function(path, *args, **kwargs)
        return load

    monkeypatch.setattr(rollout_engine, "make_engine", engine)
    monkeypatch.setattr(build, "load_causal_lm", recorded("actor", actor_critic.load_causal_lm))
    monkeypatch.setattr(actor_critic, "load_causal_lm", recorded("reference", actor_critic.load_causal_lm))
    monkeypatch.setattr(actor_critic, "load_backbone", recorded("critic", actor_critic.load_backbone))


def test_sglang_starts_before_any_model_with_the_ranks_placement(tmp_path, toy_config, policy_dir, monkeypatch):
    directory, tokenizer = policy_dir
    events: list = []
    record_startup(monkeypatch, events)
    cfg = toy_config(tmp_path, "rollout.engine=sglang")
    ctx = Context(cfg, tmp_path, torch.device("cpu"), rank=5, local_rank=1, world_size=1)
    models = build.build_models(ctx, str(directory), tokenizer)
    assert [name for name, _ in events] == ["engine", "actor", "reference", "critic"]
    assert events[0][1] == {"model_path": str(directory), "rank": 5, "local_rank": 1,
                            "seed": derive_seed(cfg.trainer.seed, "rollout_engine", 5)}
    assert all(path == str(directory) for _, path in events[1:])
    assert models.separate_rollout_weights and models.reference.lm is not models.actor.module.lm


def test_under_zero3_the_models_are_loaded_partitioned_after_the_engine(tmp_path, toy_config, policy_dir,
                                                                        monkeypatch):
    directory, tokenizer = policy_dir
    events: list = []
    record_startup(monkeypatch, events)

    @contextlib.contextmanager
    def partitioned(ds_config):
        events.append(("partitioned", ds_config["zero_optimization"]["stage"]))
        yield
        events.append(("partitioned_end", None))

    monkeypatch.setattr(build, "partitioned_loading", partitioned)
    monkeypatch.setattr(actor_critic.PolicyModel, "register_lm_head_for_zero3",
                        lambda self: events.append(("register_lm_head", None)))
    monkeypatch.setattr(engines, "DeepSpeedTrainEngine", lambda module, config, warmup: types.SimpleNamespace(
        module=module, config=config))
    monkeypatch.setattr(engines, "DeepSpeedInferenceEngine", lambda module, config: module)
    cfg = toy_config(tmp_path, "rollout.engine=sglang")
    ctx = Context(cfg, tmp_path, torch.device("cpu"), rank=1, local_rank=1, world_size=2, distributed=True)
    models = build.build_models(ctx, str(directory), tokenizer)
    assert [name for name, _ in events] == ["engine", "partitioned", "actor", "reference", "critic",
                                            "partitioned_end", "register_lm_head", "register_lm_head"]
    assert events[1][1] == 3 and models.rollout_lm is None


# ---------------------------------------------------------------------------------------------------------------
# scoring micro-batch, sharded evaluation


def test_scoring_uses_the_updates_micro_batch(tmp_path, toy_config):
    # padded: the stand-in models count rows by the score mask (packed scoring passes none; same micro-batches)
    cfg = toy_config(tmp_path, "ppo.rollout_batch_size=64", "ppo.mini_batch_size=64", "ppo.micro_batch_size=32",
                     "model.packing=false")
    ctx = Context(cfg, tmp_path, torch.device("cpu"), world_size=8)
    assert trainer.micro_batch_rows(ctx) == 8  # 64 / 8 ranks: the update's micro-batch, not 32
    rows = []

    def policy(sequences, mask, temperature):
        rows.append(len(mask))
        return torch.zeros(mask.shape), None

    models = types.SimpleNamespace(actor=_Callable(policy), reference=_Callable(policy),
                                   critic=_Callable(lambda sequences: torch.zeros(sequences.input_ids.shape[0], 3)))
    sequences = actor_critic.build_sequences([[1, 2]] * 16, torch.ones(16, 3, dtype=torch.long),
                                             torch.ones(16, 3), pad_token_id=0)
    trainer.score_tokens_stage(ctx, models, sequences, torch.ones(16, 3))
    assert rows == [8, 8, 8, 8]  # actor and reference, two micro-batches each


class _Callable:
    def __init__(self, function):
        self.function = function

    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def eval(self):
        return self

    def train(self):
        return self


def test_evaluation_is_sharded_over_ranks_and_merged_in_file_order(tmp_path, toy_config, monkeypatch):
    cfg = toy_config(tmp_path, "trainer.eval_max_questions=5")
    records = [types.SimpleNamespace(id=f"q{i}") for i in range(7)]
    evaluated = []

    def evaluate(engine, retriever, tokenizer, shards, rollout_cfg, topk, **kwargs):
        evaluated.append([record.id for record in shards["hotpot"]])
        rows = [{"id": record.id, "em": 1.0, "f1": 1.0, "num_searches": 1, "valid_format": True, "hops": None}
                for record in shards["hotpot"]]
        return stepsearch.eval.results_from_trajectories({"hotpot": rows})

    other_rank = [{"id": f"q{i}", "em": 0.0, "f1": 0.0, "num_searches": 2, "valid_format": True, "hops": None}
                  for i in (1, 3)]
    monkeypatch.setattr(stepsearch.eval, "evaluate", evaluate)
    monkeypatch.setattr(ranks, "gather_objects", lambda mine: [mine, {"hotpot": other_rank}])
    monkeypatch.setattr(ranks, "barrier", lambda: None)
    released = []
    run = types.SimpleNamespace(
        ctx=Context(cfg, tmp_path, torch.device("cpu"), rank=0, world_size=2, distributed=True),
        models=types.SimpleNamespace(sync_rollout_weights=lambda: None,
                                     rollout=types.SimpleNamespace(release_memory=lambda: released.append(1))),
        data=types.SimpleNamespace(tests={"hotpot": records}), retriever=None, tokenizer=None)
    metrics = trainer.evaluate_stage(run, "before")
    assert evaluated == [["q0", "q2", "q4"]]  # rank 0's share of the first 5 questions
    written = (Path(tmp_path) / "eval_before" / "results.json").read_text()
    assert '"num_questions": 5' in written and released == [1]
    lines = (Path(tmp_path) / "eval_before" / "trajectories" / "hotpot.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["q0", "q1", "q2", "q3", "q4"]
    assert metrics["eval/hotpot/em"] == pytest.approx(3 / 5)


# ---------------------------------------------------------------------------------------------------------------
# on a GPU (benchmarks/gpu_check.sh runs these)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_on_a_gpu_the_automatic_attention_loads_and_one_process_bf16_training_moves(policy_dir):
    directory, _ = policy_dir
    device = build.resolve_device("cuda", None)
    attn = actor_critic.resolve_attn_implementation("auto", device, torch.bfloat16)
    lm = actor_critic.load_causal_lm(str(directory), torch.bfloat16, attn).to(device)
    policy = actor_critic.PolicyModel(lm, chunk_size=64)
    engine = LocalTrainEngine(policy, lr=1e-7, weight_decay=0.0, warmup_steps=0, grad_clip=1.0)
    sequences = actor_critic.build_sequences([[5, 6, 7]] * 4, torch.full((4, 5), 9), torch.ones(4, 5), 0).to(device)
    mask = torch.ones(4, 5, device=device)
    before = [p.detach().clone() for p in policy.parameters()]
    logp, _ = engine(sequences, mask)
    engine.backward(-(logp * mask).sum() / mask.sum())
    engine.step()
    assert torch.isfinite(logp).all() and all(p.dtype == torch.float32 for p in policy.parameters())
    assert sum(int((p.detach() != b).sum()) for p, b in zip(policy.parameters(), before)) > 0
