"""StePPO training, top to bottom: the order of stages is the order of the functions in this file.

    python -m stepsearch.train --config configs/tiny_cpu.yaml [section.field=value ...]
    deepspeed stepsearch/train.py --config configs/stepsearch_qwen2.5_3b.yaml [section.field=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 stepsearch/train.py --config configs/tiny_cpu.yaml

Set-up (once):
    setup            process group (under a launcher), device, seeds, run directory, resolved config saved
    prepare_data     the synthetic multi-hop world (default) or the user's files -> train / test records
    prepare_retriever  BM25 index of the synthetic corpus (built once) or the configured index / server
    prepare_tokenizer  trained offline for the tiny model, or the checkpoint's
    prepare_policy   the initial actor: a checkpoint, or the tiny Qwen2-shaped model + supervised warm start
    build_models     actor / critic engines (DeepSpeed ZeRO-3 or plain AdamW), frozen reference, rollout engine
    resume           the last complete checkpoint (trainer.resume=auto) -> step, data position, RNG

Each StePPO step (`train_step`):
    rollout          sync weights to the rollout engine; multi-turn generate <-> search      -> RolloutBatch
    segment          the C++ segmenter re-derives the step ends from the token ids (cross-check)
    score_tokens     no grad: old_logp, ref_logp (actor / reference), values (critic)        (B, T) each
    compute_rewards  outcome (F1 or format penalty + key reward) (B,), step scores (B, S)
    compute_advantages  ops.scatter_rewards_and_gae (KL penalty included), whitening          (B, T)
    update_policy    PPO epochs x mini-batches x micro-batches through ops.ppo_loss; a non-finite loss skips
                     the mini-batch's update with a logged reason
    metrics          one device-to-host transfer per step -> metrics.jsonl / TensorBoard / wandb

End: evaluation before and after (greedy, held-out questions), the final HF checkpoint, the run report.

Outputs in <trainer.output_dir>/<trainer.run_name>/: config.yaml, metrics.jsonl, tensorboard/, trajectories.jsonl,
checkpoints/, warm_start/, final/, eval_before/, eval_after/, report/.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # `deepspeed stepsearch/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stepsearch import ops  # noqa: E402
from stepsearch.algo.gae import masked_whiten  # noqa: E402
from stepsearch.algo.ppo_loss import explained_variance, loss_normalizers  # noqa: E402
from stepsearch.config import Config, ConfigError, load_config, save_config  # noqa: E402
from stepsearch.models import distributed as dist_utils  # noqa: E402
from stepsearch.models.actor_critic import (  # noqa: E402
    PolicyModel, SequenceBatch, build_critic, build_reference, build_sequences, enable_gradient_checkpointing,
    load_causal_lm, load_tokenizer, resolve_attn_implementation, resolve_dtype,
)
from stepsearch.trainer.checkpoint import (  # noqa: E402
    capture_rng_state, find_latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint, save_hf_model,
)
from stepsearch.trainer.metrics import MetricsLogger  # noqa: E402

log = logging.getLogger("stepsearch.train")


# ================================================================================================================
# set-up


@dataclass
class Context:
    cfg: Config
    run_dir: Path
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist_utils.barrier()


def setup(cfg: Config) -> Context:
    """Process group, device, seeds, run directory and the resolved config."""
    distributed = dist_utils.use_deepspeed(cfg.deepspeed)
    rank, local_rank, world = dist_utils.init_distributed() if distributed else (0, 0, 1)
    if cfg.trainer.device == "cuda" or (cfg.trainer.device == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        if distributed and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if cfg.model.packing:
        raise ConfigError("model.packing=true: padding-free packing is not implemented by this trainer yet; "
                          "set model.packing=false")
    if distributed and cfg.ppo.rollout_batch_size % world:
        raise ConfigError(f"ppo.rollout_batch_size ({cfg.ppo.rollout_batch_size}) must be a multiple of the number "
                          f"of ranks ({world})")
    trajectories = cfg.ppo.rollout_batch_size * cfg.rollout.samples_per_prompt // world
    mini_per_rank = max(cfg.ppo.mini_batch_size // world, 1)
    if trajectories % mini_per_rank or mini_per_rank % min(cfg.ppo.micro_batch_size, mini_per_rank):
        raise ConfigError(f"trajectories per rank ({trajectories} = rollout_batch_size x samples_per_prompt / "
                          f"{world} ranks) must be a multiple of the per-rank mini-batch ({mini_per_rank}), itself a "
                          f"multiple of ppo.micro_batch_size ({cfg.ppo.micro_batch_size})")
    ops.configure(cfg.kernels.impl)
    seed_everything(cfg.trainer.seed + rank)
    run_dir = cfg.trainer.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    context = Context(cfg, run_dir, device, rank, local_rank, world, distributed)
    context.barrier()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    return context


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Data:
    train: list
    tests: dict[str, list]
    corpus_path: Path | None


def prepare_data(ctx: Context) -> Data:
    """Train / test records: the user's files, or the synthetic world written under the run directory."""
    from stepsearch.data import load_or_create_world, load_records

    cfg = ctx.cfg.data
    corpus = None
    if cfg.train_path is None:
        world_dir = ctx.run_dir / "world"
        if ctx.is_main:
            load_or_create_world(world_dir, cfg.synth_seed, cfg.synth_num_train, cfg.synth_num_test)
        ctx.barrier()
        files = load_or_create_world(world_dir, cfg.synth_seed, cfg.synth_num_train, cfg.synth_num_test)
        train_path, test_paths, corpus = files.train, [files.test] if not cfg.test_paths else cfg.test_paths, files.corpus
    else:
        train_path, test_paths = cfg.train_path, cfg.test_paths
    train = load_records(train_path, cfg.format, cfg.skip_bad_rows).records
    tests = {Path(p).name.split(".")[0]: load_records(p, cfg.format, cfg.skip_bad_rows).records for p in test_paths}
    if not train:
        raise ConfigError(f"data.train_path={train_path}: no training records")
    return Data(train, tests, corpus)


def prepare_retriever(ctx: Context, data: Data):
    from stepsearch.retrieval.factory import make_retriever

    index_home = ctx.run_dir / "world"
    if ctx.is_main:
        make_retriever(ctx.cfg.retriever, data.corpus_path, index_home)
    ctx.barrier()
    return make_retriever(ctx.cfg.retriever, data.corpus_path, index_home)


def prepare_tokenizer(ctx: Context, data: Data):
    """The checkpoint's tokenizer, or a byte-level BPE trained offline on the synthetic world (tiny model)."""
    cfg = ctx.cfg.model
    path = cfg.tokenizer_path or cfg.actor_path
    if path is not None:
        return load_tokenizer(path)
    from stepsearch.models.tokenizer import train_tokenizer
    from stepsearch.rollout.prompts import TEMPLATES
    from stepsearch.trainer.warm_start import gold_turns

    out_dir = ctx.run_dir / "tokenizer"
    if ctx.is_main and not (out_dir / "tokenizer.json").is_file():
        texts = [row["contents"] for row in _read_jsonl(data.corpus_path)] if data.corpus_path else []
        texts += [r.question for r in data.train] + list(TEMPLATES.values())
        for record in data.train:
            try:
                texts += gold_turns(record)[0]
            except ValueError:
                continue
        train_tokenizer(texts, cfg.tiny_vocab_size, out_dir)
    ctx.barrier()
    return load_tokenizer(str(out_dir))


def drop_long_prompts(ctx: Context, data: Data, tokenizer) -> None:
    """Training questions whose prompt exceeds `data.max_prompt_tokens` are dropped, with a count in the log."""
    from stepsearch.rollout.prompts import build_prompt_ids

    limit, template = ctx.cfg.data.max_prompt_tokens, ctx.cfg.rollout.template
    kept = [r for r in data.train if len(build_prompt_ids(tokenizer, r.question, template)) <= limit]
    if len(kept) < len(data.train):
        log.warning("dropped %d of %d training questions whose prompt exceeds data.max_prompt_tokens=%d",
                    len(data.train) - len(kept), len(data.train), limit)
    if not kept:
        raise ConfigError(f"data.max_prompt_tokens={limit}: every training prompt is longer")
    data.train = kept


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def prepare_policy(ctx: Context, data: Data, retriever, tokenizer):
    """The initial actor (before RL): a local checkpoint, or the tiny model warm-started on gold trajectories.

    The warm start runs once (rank 0) and is saved to <run_dir>/warm_start, which every rank (and a resumed run)
    then loads, so the reference model is always this same initial policy.
    """
    cfg = ctx.cfg
    dtype = resolve_dtype(cfg.model.dtype, ctx.device)
    attn = resolve_attn_implementation(cfg.model.attn_implementation, ctx.device, dtype)
    if cfg.model.actor_path is not None:
        return load_causal_lm(cfg.model.actor_path, dtype, attn)
    from stepsearch.models.tiny import build_tiny_model

    warm_dir = ctx.run_dir / "warm_start"
    if cfg.trainer.warm_start_steps <= 0:
        return build_tiny_model(cfg.model, tokenizer, seed=cfg.trainer.seed).to(dtype)
    if ctx.is_main and not (warm_dir / "config.json").is_file():
        from stepsearch.trainer.warm_start import render_gold_examples, supervised_warm_start

        model = build_tiny_model(cfg.model, tokenizer, seed=cfg.trainer.seed).to(ctx.device)
        examples = render_gold_examples(data.train, tokenizer, retriever, cfg.rollout, cfg.retriever.topk,
                                        seed=cfg.trainer.seed)
        losses = supervised_warm_start(model, examples, tokenizer.pad_token_id, steps=cfg.trainer.warm_start_steps,
                                       lr=cfg.trainer.warm_start_lr, seed=cfg.trainer.seed)
        log.info("warm start: %d gold trajectories, loss %.3f -> %.3f", len(examples), losses[0], losses[-1])
        staging = warm_dir.with_name("warm_start.tmp")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "losses.json").write_text(json.dumps(losses), encoding="utf-8")
        os.replace(staging, warm_dir)
    ctx.barrier()
    return load_causal_lm(str(warm_dir), dtype, attn)


@dataclass
class Models:
    actor: Any  # LocalTrainEngine | DeepSpeedTrainEngine over PolicyModel
    critic: Any  # ... over Critic
    reference: Any  # PolicyModel | DeepSpeedInferenceEngine
    rollout: Any  # stepsearch.rollout.engine.Engine
    rollout_lm: Any  # the full HF model the HF rollout engine generates with (the actor itself in one process);
    #                  None for SGLang under ZeRO-3 (the engine holds its own copy)
    separate_rollout_weights: bool  # the rollout engine needs the actor's weights pushed before each rollout

    def checkpoint_items(self) -> dict[str, dict[str, Any]]:
        """models / optimizers / schedulers keyword arguments of `save_checkpoint` and `load_checkpoint`."""
        items: dict[str, dict[str, Any]] = {"models": {}, "optimizers": {}, "schedulers": {}}
        for name, engine in (("actor", self.actor), ("critic", self.critic)):
            model, optimizer, scheduler = engine.checkpoint_items()
            items["models"][name] = model
            if optimizer is not None:
                items["optimizers"][name], items["schedulers"][name] = optimizer, scheduler
        return items


def build_models(ctx: Context, actor_lm, tokenizer) -> Models:
    """Actor / critic training engines, the frozen reference and the rollout engine."""
    from stepsearch.rollout.engine import make_engine

    cfg = ctx.cfg
    dtype = resolve_dtype(cfg.model.dtype, ctx.device)
    attn = resolve_attn_implementation(cfg.model.attn_implementation, ctx.device, dtype)
    actor_lm.to(ctx.device)
    reference = build_reference(actor_lm, cfg.kernels.logprob_chunk_size)
    critic = build_critic(cfg.model, actor_lm, dtype, attn, seed=cfg.trainer.seed).to(ctx.device)
    actor = PolicyModel(actor_lm, cfg.kernels.logprob_chunk_size)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(actor)
        enable_gradient_checkpointing(critic)
    ppo = cfg.ppo
    if not ctx.distributed:
        rollout = make_engine(cfg.rollout, actor_lm, tokenizer, ctx.device, model_path=cfg.model.actor_path)
        return Models(
            dist_utils.LocalTrainEngine(actor, ppo.actor_lr, ppo.weight_decay, ppo.warmup_steps, ppo.grad_clip),
            dist_utils.LocalTrainEngine(critic, ppo.critic_lr, ppo.weight_decay, ppo.warmup_steps, ppo.grad_clip),
            reference.to(ctx.device), rollout, actor_lm, separate_rollout_weights=cfg.rollout.engine != "hf")
    # Under ZeRO-3 the actor's parameters are partitioned: the rollout engine generates with its own full copy,
    # refreshed from the gathered actor before every rollout.
    rollout_lm = copy.deepcopy(actor_lm).eval() if cfg.rollout.engine == "hf" else None
    rollout = make_engine(cfg.rollout, rollout_lm, tokenizer, ctx.device, model_path=cfg.model.actor_path)
    on_gpu = ctx.device.type == "cuda"
    if cfg.deepspeed.zero_stage == 3:
        actor.register_lm_head_for_zero3()
        reference.register_lm_head_for_zero3()

    def ds_config(lr: float, train: bool) -> dict:
        return dist_utils.deepspeed_config(cfg, lr=lr, train=train, on_gpu=on_gpu, dp_size=ctx.world_size)

    return Models(
        dist_utils.DeepSpeedTrainEngine(actor, ds_config(ppo.actor_lr, True), ppo.warmup_steps),
        dist_utils.DeepSpeedTrainEngine(critic, ds_config(ppo.critic_lr, True), ppo.warmup_steps),
        dist_utils.DeepSpeedInferenceEngine(reference, ds_config(ppo.actor_lr, False)),
        rollout, rollout_lm, separate_rollout_weights=True)


@dataclass
class TrainState:
    """What a checkpoint stores besides the engines (and RNG states)."""

    step: int = 0
    data_position: int = 0
    skipped_updates: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"step": self.step, "data_position": self.data_position, "skipped_updates": self.skipped_updates}


def resume(ctx: Context, models: Models) -> TrainState:
    """`trainer.resume`: `auto` = the last complete checkpoint of the run (if any), `never`, or a checkpoint path."""
    choice = ctx.cfg.trainer.resume
    if choice == "never":
        return TrainState()
    path = find_latest_checkpoint(ctx.run_dir) if choice == "auto" else Path(choice)
    if path is None:
        return TrainState()
    state = load_checkpoint(path, **models.checkpoint_items())
    restore_rng_state(state.pop("rng"))
    log.info("resumed from %s (step %d)", path, state["step"])
    return TrainState(**state)


def checkpoint(ctx: Context, models: Models, state: TrainState) -> None:
    save_checkpoint(ctx.run_dir, state.step, **models.checkpoint_items(),
                    state={**state.to_dict(), "rng": capture_rng_state()}, keep=ctx.cfg.trainer.keep_checkpoints)


# ================================================================================================================
# one StePPO step


class DataCursor:
    """Questions in a seeded order, reshuffled each epoch; `position` counts questions consumed by all ranks."""

    def __init__(self, records: list, seed: int, rank: int, world_size: int) -> None:
        self.records, self.seed, self.rank, self.world_size = records, seed, rank, world_size

    def take(self, position: int, count: int) -> list:
        """This rank's share of the `count` questions starting at global `position`."""
        chosen = []
        for index in range(position + self.rank, position + count, self.world_size):
            epoch, offset = divmod(index, len(self.records))
            order = torch.randperm(len(self.records), generator=torch.Generator().manual_seed(self.seed + epoch))
            chosen.append(self.records[int(order[offset])])
        return chosen


class StepMetrics:
    """Scalars of one step, kept as they come (0-d device tensors are not synchronised); repeated names average.
    The logger resolves every tensor of the row with one device-to-host transfer."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, value: Any) -> None:
        value = value.detach().float().reshape(()) if isinstance(value, torch.Tensor) else float(value)
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def update(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            self.add(name, value)

    def means(self) -> dict[str, Any]:
        return {name: total / self.counts[name] for name, total in self.sums.items()}


@dataclass
class Experience:
    """The typed batch between stages (glossary names); tensors (B, T) unless said."""

    sequences: SequenceBatch
    loss_mask: torch.Tensor
    step_ends: torch.Tensor  # (B, S)
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    outcome: torch.Tensor | None = None  # (B,)
    step_scores: torch.Tensor | None = None  # (B, S)
    token_rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    details: list[dict] = field(default_factory=list)  # per trajectory, for the report


def sync_rollout_weights(models: Models) -> None:
    """Gather the ZeRO-3 actor and load it into the rollout engine (nothing to do when they share weights)."""
    if models.separate_rollout_weights:
        models.rollout.update_weights(dist_utils.gathered_named_parameters(models.actor.module.lm))


def rollout_stage(ctx: Context, models: Models, retriever, tokenizer, records: list, step: int):
    from stepsearch.rollout.agent_loop import run_agent_loop

    sync_rollout_weights(models)
    seed = (ctx.cfg.trainer.seed * 1_000_003 + step) * ctx.world_size + ctx.rank
    with torch.no_grad():
        return run_agent_loop(models.rollout, retriever, tokenizer, records, ctx.cfg.rollout,
                              topk=ctx.cfg.retriever.topk, seed=seed, max_query_chars=ctx.cfg.retriever.max_query_chars)


def segment_stage(rollout, tag_table) -> float:
    """Fraction of trajectories whose step ends the C++ segmenter re-derives exactly from the token ids."""
    from stepsearch.rollout.segmenter import segment_batch

    lengths = rollout.response_lengths.tolist()
    segmentations = segment_batch([rollout.response_ids[b, :n] for b, n in enumerate(lengths)], tag_table)
    agree = sum(list(seg.step_ends) == [s for s in rollout.step_ends[b].tolist() if s >= 0]
                for b, seg in enumerate(segmentations))
    return agree / max(len(lengths), 1)


def _micro_batches(size: int, micro: int) -> list[slice]:
    return [slice(start, min(start + micro, size)) for start in range(0, size, micro)]


@torch.no_grad()
def score_tokens_stage(ctx: Context, models: Models, experience: Experience) -> None:
    """old_logp (actor), ref_logp (reference), values (critic) for every response token, without gradients."""
    temperature = ctx.cfg.rollout.temperature or 1.0
    models.actor.eval()
    models.critic.eval()
    old, ref, values = [], [], []
    for rows in _micro_batches(len(experience.loss_mask), ctx.cfg.ppo.micro_batch_size):
        sequences = experience.sequences.rows(rows).to(ctx.device)
        mask = experience.loss_mask[rows].to(ctx.device)
        old.append(models.actor(sequences, mask, temperature)[0])
        ref.append(models.reference(sequences, mask, temperature)[0])
        values.append(models.critic(sequences))
    experience.old_logp, experience.ref_logp, experience.values = torch.cat(old), torch.cat(ref), torch.cat(values)


def reward_stage(ctx: Context, rollout, records: list, experience: Experience, metrics: StepMetrics) -> None:
    """Outcome reward (B,) and step scores s^t = step_weight (G^t - P^t) (B, S) for every trajectory."""
    from stepsearch.rewards import outcome_reward_from_config, step_rewards_group

    reward_cfg = ctx.cfg.reward
    batch_size, num_steps = rollout.step_ends.shape
    outcome = torch.zeros(batch_size)
    step_scores = torch.zeros((batch_size, num_steps))  # (B, S)
    by_record: dict[int, list[int]] = {}
    for row, record_index in enumerate(rollout.record_indices):
        by_record.setdefault(record_index, []).append(row)
    gains_all, penalties_all, details = [], [], [None] * batch_size
    scores = [None] * batch_size
    for record_index, rows in by_record.items():
        record = records[record_index]
        rounds = [[[(doc.id, doc.text) for doc in docs] for docs in rollout.retrieved[row]] for row in rows]
        golden = [doc.text for doc in record.support_docs]
        for row, (gains, penalties) in zip(rows, step_rewards_group(rounds, golden, reward_cfg.redundancy_identity)):
            score = outcome_reward_from_config(rollout.response_texts[row], record.answers,
                                               [q for q in rollout.queries[row] if q], record.search_keys, reward_cfg)
            scores[row] = score
            outcome[row] = score.reward
            step_values = [reward_cfg.step_weight * (g - p) for g, p in zip(gains, penalties)]
            step_scores[row, :len(step_values)] = torch.tensor(step_values)
            searched = [t for t, docs in enumerate(rollout.retrieved[row]) if docs]
            if golden:
                gains_all += [gains[t] for t in searched]
                penalties_all += [penalties[t] for t in searched]
            details[row] = {"question": record.question, "answers": list(record.answers),
                            "response": rollout.response_texts[row], "queries": list(rollout.queries[row]),
                            "retrieved": [[doc.id for doc in docs] for docs in rollout.retrieved[row]],
                            "gains": gains, "penalties": penalties, "step_scores": step_values,
                            "outcome": score.reward, "f1": score.f1, "em": score.em, "key_reward": score.key_reward,
                            "valid_format": score.valid_format}
    experience.outcome, experience.step_scores, experience.details = outcome, step_scores, details
    metrics.update({
        "reward/outcome": outcome.mean().item(),
        "reward/f1": float(np.mean([s.f1 for s in scores])),
        "reward/em": float(np.mean([s.em for s in scores])),
        "reward/key_reward": float(np.mean([s.key_reward for s in scores])),
        "reward/valid_format": float(np.mean([s.valid_format for s in scores])),
        "reward/step_reward": step_scores.sum(dim=1).mean().item(),
        "reward/info_gain": float(np.mean(gains_all)) if gains_all else 0.0,
        "reward/redundancy": float(np.mean(penalties_all)) if penalties_all else 0.0,
    })


def advantage_stage(ctx: Context, experience: Experience) -> None:
    """Token rewards (step scores on step ends, outcome on the last token, -beta KL on every generated token),
    GAE advantages and returns, then advantages whitened over generated tokens."""
    ppo = ctx.cfg.ppo
    device = experience.values.device
    mask = experience.loss_mask.to(device)
    advantages, returns, token_rewards = ops.scatter_rewards_and_gae(
        experience.outcome.to(device), experience.step_scores.to(device), experience.step_ends.to(device),
        experience.old_logp, experience.ref_logp, experience.values, mask, ppo.kl_coef, ppo.gamma, ppo.lam,
        kl_estimator=ppo.kl_estimator, return_rewards=True)
    experience.token_rewards, experience.returns = token_rewards, returns
    experience.advantages = masked_whiten(advantages, mask) if ppo.whiten_advantages else advantages


UPDATE_METRICS = ("loss/policy", "loss/value", "loss/approx_kl", "loss/clip_frac", "loss/value_clip_frac",
                  "loss/entropy")


def update_stage(ctx: Context, models: Models, experience: Experience, step: int, metrics: StepMetrics,
                 state: TrainState) -> None:
    """PPO epochs over shuffled mini-batches; gradients accumulate over micro-batches; one optimiser step per
    mini-batch for the actor (after the critic warm-up) and the critic."""
    ppo = ctx.cfg.ppo
    temperature = ctx.cfg.rollout.temperature or 1.0
    update_actor = step >= ppo.critic_warmup_steps
    size = len(experience.loss_mask)
    mini = max(ppo.mini_batch_size // ctx.world_size, 1)
    micro = min(ppo.micro_batch_size, mini)
    models.actor.train()
    models.critic.train()
    for epoch in range(ppo.ppo_epochs):
        order = torch.randperm(size, generator=torch.Generator().manual_seed(
            (ctx.cfg.trainer.seed * 7919 + step) * 131 + epoch * ctx.world_size + ctx.rank))
        for mini_index, start in enumerate(range(0, size, mini)):
            rows = order[start:start + mini]
            mask = experience.loss_mask[rows].to(ctx.device)
            counts = dist_utils.all_reduce_sum(torch.stack(loss_normalizers(mask)))  # (2,) global tokens, seqs
            # Each micro-batch's loss is its share of the mini-batch loss (global normalisers): shares add up.
            shares = torch.zeros(len(UPDATE_METRICS), device=ctx.device)
            for micro_rows in _micro_batches(len(rows), micro):
                index = rows[micro_rows]
                sequences = experience.sequences.rows(index).to(ctx.device)
                micro_mask = experience.loss_mask[index].to(ctx.device)
                with torch.set_grad_enabled(update_actor):
                    logp, entropy = models.actor(sequences, micro_mask, temperature, with_entropy=True)
                values = models.critic(sequences)
                out = ops.ppo_loss(
                    logp, experience.old_logp[index], experience.advantages[index], values,
                    experience.values[index], experience.returns[index], micro_mask,
                    entropy if ppo.entropy_coef > 0 else None, clip_ratio=ppo.clip_ratio, dual_clip=ppo.dual_clip,
                    value_clip=ppo.value_clip, vf_coef=ppo.vf_coef, entropy_coef=ppo.entropy_coef,
                    loss_agg_mode=ppo.loss_agg_mode, global_token_count=counts[0], global_seq_count=counts[1])
                if update_actor:
                    models.actor.backward(out.policy_loss - ppo.entropy_coef * out.entropy_loss)
                models.critic.backward(ppo.vf_coef * out.value_loss)
                shares += torch.stack([out.policy_loss.detach(), out.value_loss.detach(), out.approx_kl,
                                       out.clip_frac, out.value_clip_frac,
                                       (entropy.detach() * micro_mask).sum() / counts[0]]).float()
            # The one synchronisation per mini-batch: an update from a non-finite loss would destroy the weights.
            totals = dist_utils.all_reduce_sum(shares)
            policy_total, value_total = totals[:2].tolist()
            if not (math.isfinite(policy_total) and math.isfinite(value_total)):
                models.actor.discard_gradients()
                models.critic.discard_gradients()
                state.skipped_updates += 1
                log.warning("step %d epoch %d mini-batch %d: update skipped: non-finite loss (policy %s, value %s)",
                            step, epoch, mini_index, policy_total, value_total)
                metrics.add("update/skipped", 1.0)
                continue
            metrics.update(dict(zip(UPDATE_METRICS, totals)))
            metrics.add("update/skipped", 0.0)
            if update_actor:
                metrics.add("grad_norm/actor", models.actor.step())
            metrics.add("grad_norm/critic", models.critic.step())


def train_step(ctx: Context, models: Models, retriever, tokenizer, tag_table, cursor: DataCursor,
               state: TrainState) -> tuple[dict[str, float], list[dict]]:
    """One StePPO step; returns the host-side metrics and the per-trajectory details for the report."""
    cfg = ctx.cfg
    metrics = StepMetrics()
    timings: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[f"time/{name}_s"] = now - tick
        tick = now

    records = cursor.take(state.data_position, cfg.ppo.rollout_batch_size)
    rollout = rollout_stage(ctx, models, retriever, tokenizer, records, state.step)
    lap("rollout")
    metrics.add("segment/step_end_agreement", segment_stage(rollout, tag_table))
    experience = Experience(build_sequences(rollout.prompt_ids, rollout.response_ids, rollout.response_mask,
                                            tokenizer.pad_token_id), rollout.loss_mask, rollout.step_ends)
    lap("segment")
    score_tokens_stage(ctx, models, experience)
    lap("score_tokens")
    reward_stage(ctx, rollout, records, experience, metrics)
    lap("rewards")
    advantage_stage(ctx, experience)
    lap("advantages")
    update_stage(ctx, models, experience, state.step, metrics, state)
    lap("update")

    mask = experience.loss_mask.to(ctx.device)
    tokens = mask.sum().clamp(min=1)
    generated = rollout.loss_mask.sum().item()
    metrics.update({
        "kl": ((experience.old_logp - experience.ref_logp) * mask).sum() / tokens,
        "value/explained_variance": explained_variance(experience.values, experience.returns, mask),
        "value/mean": (experience.values * mask).sum() / tokens,
        "reward/token_reward_sum": (experience.token_rewards * mask).sum(dim=1).mean(),
        "response/length": rollout.response_lengths.float().mean().item(),
        "response/generated_tokens": generated / max(len(rollout), 1),
        "response/turns": float(np.mean(rollout.num_searches)),
        "response/answered": float(np.mean([r == "answer" for r in rollout.finish_reasons])),
        "throughput/rollout_tokens_per_s": generated / max(timings["time/rollout_s"], 1e-9),
    })
    values = metrics.means()  # device tensors stay unresolved until the logger's one transfer
    values.update(timings)
    values["time/step_s"] = sum(timings.values())
    values["throughput/tokens_per_s"] = float(rollout.response_mask.sum()) / max(values["time/step_s"], 1e-9)
    if ctx.distributed:  # every rank saw its own trajectories: report the mean over ranks (one all-reduce)
        names = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[n], dtype=torch.float32, device=ctx.device) for n in names])
        values = dict(zip(names, dist_utils.all_reduce_sum(stacked) / ctx.world_size))
    return values, experience.details


# ================================================================================================================
# evaluation, export, report, and the loop


def evaluate_stage(ctx: Context, models: Models, retriever, tokenizer, data: Data, which: str) -> dict[str, float]:
    """Greedy evaluation on the held-out files (rank 0), written to <run_dir>/eval_<which>/."""
    from stepsearch.eval import evaluate, write_results

    if ctx.cfg.trainer.eval_max_questions <= 0 or not data.tests:
        return {}
    sync_rollout_weights(models)
    flat: dict[str, float] = {}
    if ctx.is_main:
        result = evaluate(models.rollout, retriever, tokenizer, data.tests, ctx.cfg.rollout, ctx.cfg.retriever.topk,
                          ctx.cfg.trainer.eval_max_questions, max_query_chars=ctx.cfg.retriever.max_query_chars)
        write_results(result, ctx.run_dir / f"eval_{which}")
        flat = result.metrics()
        log.info("evaluation %s: %s", which, json.dumps({k: round(v, 4) for k, v in flat.items()}))
    ctx.barrier()
    return flat


def export_final(ctx: Context, models: Models, tokenizer) -> None:
    """The trained actor as an HF checkpoint in <run_dir>/final (loadable by `stepsearch eval --model`)."""
    sync_rollout_weights(models)
    if models.rollout_lm is not None:
        save_hf_model(models.rollout_lm, tokenizer, ctx.run_dir / "final")
        return
    lm = models.actor.module.lm
    weights = dict(dist_utils.gathered_named_parameters(lm))  # collective: every rank gathers
    if ctx.is_main:
        lm.save_pretrained(ctx.run_dir / "final", state_dict=weights)
        tokenizer.save_pretrained(ctx.run_dir / "final")
    ctx.barrier()


def _truncate_trajectories(ctx: Context, step: int) -> None:
    """Drop the sampled trajectories of steps after `step` (written by an interrupted run before it crashed)."""
    path = ctx.run_dir / "trajectories.jsonl"
    if ctx.is_main and path.exists():
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(line for line in lines if line.strip() and json.loads(line)["step"] <= step),
                        encoding="utf-8")


def _write_trajectories(ctx: Context, step: int, details: list[dict], keep: int = 8) -> None:
    if not ctx.is_main:
        return
    with open(ctx.run_dir / "trajectories.jsonl", "a", encoding="utf-8") as handle:
        for detail in details[:keep]:
            handle.write(json.dumps({"step": step, **detail}, ensure_ascii=False) + "\n")


def train(cfg: Config) -> Path:
    """Run every stage; returns the run directory."""
    from stepsearch.rollout.segmenter import TagTable

    ctx = setup(cfg)
    data = prepare_data(ctx)
    retriever = prepare_retriever(ctx, data)
    tokenizer = prepare_tokenizer(ctx, data)
    drop_long_prompts(ctx, data, tokenizer)
    actor_lm = prepare_policy(ctx, data, retriever, tokenizer)
    models = build_models(ctx, actor_lm, tokenizer)
    state = resume(ctx, models)
    logger = MetricsLogger(ctx.run_dir, is_main=ctx.is_main, tensorboard=cfg.trainer.tensorboard,
                           wandb_project=cfg.trainer.wandb_project, resume_step=state.step if state.step else None)
    _truncate_trajectories(ctx, state.step)
    if state.step == 0:
        evaluate_stage(ctx, models, retriever, tokenizer, data, "before")
    tag_table = TagTable.from_tokenizer(tokenizer)
    cursor = DataCursor(data.train, cfg.data.shuffle_seed, ctx.rank, ctx.world_size)

    bar = None
    if ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.trainer.total_steps, initial=state.step, desc="StePPO", unit="step")
    while state.step < cfg.trainer.total_steps:
        values, details = train_step(ctx, models, retriever, tokenizer, tag_table, cursor, state)
        state.step += 1
        state.data_position += cfg.ppo.rollout_batch_size
        if cfg.trainer.eval_every and state.step % cfg.trainer.eval_every == 0 and state.step < cfg.trainer.total_steps:
            values.update(evaluate_stage(ctx, models, retriever, tokenizer, data, f"step{state.step}"))
        row = logger.log(state.step, values)
        _write_trajectories(ctx, state.step, details)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{row.get(k) or 0:.3f}" for k in ("reward/outcome", "reward/f1", "kl")})
        if (cfg.trainer.save_every and state.step % cfg.trainer.save_every == 0) or state.step == cfg.trainer.total_steps:
            checkpoint(ctx, models, state)
    if bar is not None:
        bar.close()

    evaluate_stage(ctx, models, retriever, tokenizer, data, "after")
    logger.close()
    export_final(ctx, models, tokenizer)
    if ctx.is_main and cfg.trainer.report:
        from stepsearch.trainer.report import write_report

        write_report(ctx.run_dir)
    ctx.barrier()
    return ctx.run_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepsearch train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML preset (default: the built-in defaults)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the rank is read from the environment")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. trainer.total_steps=10")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
