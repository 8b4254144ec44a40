"""StePPO training, top to bottom: the order of stages is the order of the functions in this file.

    python -m stepsearch.train --config configs/tiny_cpu.yaml [section.field=value ...]
    deepspeed stepsearch/train.py --config configs/stepsearch_qwen2.5_3b.yaml [section.field=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 stepsearch/train.py --config configs/tiny_cpu.yaml

Set-up (once) is `stepsearch.trainer.build.build_run`: process group, data, retriever, tokenizer, the initial
policy (warm start for the tiny model), actor / critic engines, frozen reference, rollout engine, resume.

Each StePPO step (`train_step`); every stage is a function that returns what the next ones read:
    rollout          sync weights to the rollout engine; multi-turn generate <-> search      -> RolloutBatch
    segment          the sequences of the rollout's one segmentation of its token ids (C++ segmenter, run by the
                     agent loop: loss mask, step ends, queries, answer, format)              -> SequenceBatch
    score_tokens     no grad: old_logp, ref_logp (actor / reference), values (critic), each micro-batch
                     without pads (model.packing)                                            -> TokenScores
    rewards          `rewards.score_rollout`: outcome (F1 or format penalty + key reward) (B,), step scores
                     (B, S)                                                                  -> RewardBatch
    advantages       ops.scatter_rewards_and_gae (KL penalty included), whitening            -> Advantages
    update           PPO epochs x mini-batches x micro-batches through ops.ppo_loss over the Experience
                     (packed token vectors with model.packing); a non-finite loss skips the mini-batch's update
                     with a logged reason
    metrics          one device-to-host transfer per step -> metrics.jsonl / TensorBoard / wandb (among them
                     rollout/logp_mismatch: mean |rollout engine log-prob - old_logp| over generated tokens)

End: evaluation before and after (greedy, held-out questions), the final HF checkpoint, the run report.

Outputs in <trainer.output_dir>/<trainer.run_name>/ (`stepsearch.trainer.run_dir`): config.yaml, metrics.jsonl,
tensorboard/, trajectories.jsonl, checkpoints/, warm_start/, final/, eval_before/, eval_after/, report/.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch


def _choose_package_for_script() -> None:
    """`deepspeed stepsearch/train.py` runs this file as a script: decide which `stepsearch` it imports.

    The file's folder heads sys.path and would make config.py, eval.py, ops.py ... top-level modules: it goes. Then
    the installed package is used (editable or not; a non-editable install is where `stepsearch.kernels` and the
    C++ extension live), unless this checkout was built in place (its extension is here) or nothing is installed:
    then this checkout, with its top-level kernels/ registered as `stepsearch.kernels` as the build would map it.
    """
    here = Path(__file__).resolve().parent
    sys.path[:] = [entry for entry in sys.path if not entry or Path(entry).resolve() != here]
    installed = importlib.util.find_spec("stepsearch")
    if installed is not None and installed.origin and Path(installed.origin).resolve().parent == here:
        return  # an editable install of this checkout
    if installed is not None and not any(here.glob("_segmenter*")):
        return  # a non-editable install, and this checkout has no build of its own
    sys.path.insert(0, str(here.parent))
    kernels = here.parent / "kernels"
    spec = importlib.util.spec_from_file_location("stepsearch.kernels", kernels / "__init__.py",
                                                  submodule_search_locations=[str(kernels)])
    sys.modules["stepsearch.kernels"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["stepsearch.kernels"])


if __package__ in (None, ""):
    _choose_package_for_script()

from stepsearch import ops  # noqa: E402
from stepsearch.config import Config, load_config  # noqa: E402
from stepsearch.models.actor_critic import (  # noqa: E402
    PackedSequences,
    SequenceBatch,
    build_sequences,
    pack_sequences,
    packed_to_rows,
    packed_token_index,
    packing_layout,
)
from stepsearch.rewards import RewardBatch, score_rollout  # noqa: E402
from stepsearch.seeds import derive_seed  # noqa: E402
from stepsearch.trainer import build, ranks  # noqa: E402
from stepsearch.trainer.build import Context, Models, Run  # noqa: E402
from stepsearch.trainer.checkpoint import save_hf_model  # noqa: E402
from stepsearch.trainer.engines import gathered_named_parameters  # noqa: E402
from stepsearch.trainer.metrics import MetricsLogger, StepMetrics  # noqa: E402
from stepsearch.trainer.run_dir import append_jsonl, truncate_jsonl, write_timings  # noqa: E402

log = logging.getLogger("stepsearch.train")


# ================================================================================================================
# what the stages hand each other (glossary names; tensors (B, T) unless said)


@dataclass(frozen=True)
class TokenScores:
    """Per response token, without gradients: the actor's and the reference's log-probs, the critic's values."""

    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class Advantages:
    token_rewards: torch.Tensor  # step scores + outcome + KL penalty, placed on tokens
    advantages: torch.Tensor  # whitened when ppo.whiten_advantages
    returns: torch.Tensor


@dataclass(frozen=True)
class Experience:
    """What the PPO update reads. With `token_offsets` (model.packing) old_logp, values, advantages and returns are
    packed token vectors (N,) over the loss-mask tokens, sequence b's at token_offsets[b]:token_offsets[b + 1]."""

    sequences: SequenceBatch
    loss_mask: torch.Tensor
    old_logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    token_offsets: torch.Tensor | None = None


# ================================================================================================================
# one StePPO step


def rollout_stage(ctx: Context, models: Models, retriever, tokenizer, tag_table, records: list, step: int):
    from stepsearch.rollout.agent_loop import run_agent_loop

    models.sync_rollout_weights()
    seed = derive_seed(ctx.cfg.trainer.seed, "rollout", step, ctx.rank)
    with torch.no_grad():
        rollout = run_agent_loop(models.rollout, retriever, tokenizer, records, ctx.cfg.rollout,
                                 topk=ctx.cfg.retriever.topk, seed=seed,
                                 max_query_chars=ctx.cfg.retriever.max_query_chars, tag_table=tag_table,
                                 row_groups=ctx.cfg.rollout.row_groups)
    models.rollout.release_memory()  # SGLang's weights and KV cache make room for scoring and the update
    return rollout


def segment_stage(rollout, tokenizer) -> SequenceBatch:
    """Prompt + response sequences for the forward passes. Loss mask and step ends stay the rollout's: the agent
    loop segmented its token ids once with the C++ segmenter (its time is `time/segmenter_s`)."""
    return build_sequences(rollout.prompt_ids, rollout.response_ids, rollout.response_mask, tokenizer.pad_token_id)


def _micro_batches(size: int, micro: int) -> list[slice]:
    return [slice(start, min(start + micro, size)) for start in range(0, size, micro)]


def micro_batch_rows(ctx: Context) -> int:
    """Trajectories per forward pass on one rank, the same for scoring and the update: `ppo.micro_batch_size`,
    at most this rank's share of a mini-batch."""
    return min(ctx.cfg.ppo.micro_batch_size, max(ctx.cfg.ppo.mini_batch_size // ctx.world_size, 1))


def _pack(ctx: Context, models: Models, sequences: SequenceBatch, loss_mask: torch.Tensor):
    """The rows of `sequences` packed without pads (model.packing), their loss-mask tokens scored."""
    zero3 = ctx.distributed and ctx.cfg.deepspeed.zero_stage == 3
    return pack_sequences(sequences, loss_mask, packing_layout(models.critic.module, zero3)).to(ctx.device)


@torch.no_grad()
def score_tokens_stage(ctx: Context, models: Models, sequences: SequenceBatch, loss_mask: torch.Tensor) -> TokenScores:
    """old_logp (actor), ref_logp (reference), values (critic) for every response token, without gradients.

    Packed (model.packing): the forward passes score the loss-mask tokens of each micro-batch without pads, and the
    packed vectors are scattered into (B, T) once, here, for the reward scatter + GAE (its kernel walks rows) and
    the metrics; values are then 0 off the loss mask, where GAE and every metric ignore them."""
    temperature = ctx.cfg.rollout.temperature or 1.0
    models.actor.eval()
    models.critic.eval()
    old, ref, values = [], [], []
    for rows in _micro_batches(len(loss_mask), micro_batch_rows(ctx)):
        micro = sequences.rows(rows)
        if ctx.cfg.model.packing:
            micro, mask = _pack(ctx, models, micro, loss_mask[rows]), None
        else:
            micro, mask = micro.to(ctx.device), loss_mask[rows].to(ctx.device)
        old.append(models.actor(micro, mask, temperature)[0])
        ref.append(models.reference(micro, mask, temperature)[0])
        values.append(models.critic(micro))
    if not ctx.cfg.model.packing:
        return TokenScores(torch.cat(old), torch.cat(ref), torch.cat(values))
    scored = loss_mask.to(ctx.device).bool()  # (B, T)

    def unpack(tokens: list[torch.Tensor]) -> torch.Tensor:
        zeros = torch.zeros(scored.shape, dtype=torch.float32, device=ctx.device)
        return zeros.masked_scatter(scored, torch.cat(tokens))

    return TokenScores(unpack(old), unpack(ref), unpack(values))


def reward_stage(ctx: Context, rollout, records: list, metrics: StepMetrics) -> RewardBatch:
    """Outcome reward (B,) and step scores s^t = step_weight (G^t - P^t) (B, S): `stepsearch.rewards.score_rollout`."""
    rewards = score_rollout(rollout, records, ctx.cfg.reward)
    metrics.update(rewards.metrics)
    return rewards


def advantage_stage(ctx: Context, rollout, scores: TokenScores, rewards: RewardBatch) -> Advantages:
    """Token rewards (step scores on step ends, outcome on the last token, -beta KL on every generated token),
    GAE advantages and returns, then advantages whitened over generated tokens."""
    ppo = ctx.cfg.ppo
    device = scores.values.device
    mask = rollout.loss_mask.to(device)
    advantages, returns, token_rewards = ops.scatter_rewards_and_gae(
        rewards.outcome.to(device), rewards.step_scores.to(device), rollout.step_ends.to(device),
        scores.old_logp, scores.ref_logp, scores.values, mask, ppo.kl_coef, ppo.gamma, ppo.lam,
        kl_estimator=ppo.kl_estimator, return_rewards=True)
    advantages = ops.masked_whiten(advantages, mask) if ppo.whiten_advantages else advantages
    return Advantages(token_rewards, advantages, returns)


def experience_of(ctx: Context, sequences: SequenceBatch, loss_mask: torch.Tensor, scores: TokenScores,
                  advantages: Advantages) -> Experience:
    """What the update reads; packed (model.packing): the loss-mask tokens of the (B, T) results gathered once."""
    per_token = (scores.old_logp, scores.values, advantages.advantages, advantages.returns)
    if not ctx.cfg.model.packing:
        return Experience(sequences, loss_mask, *per_token)
    scored = loss_mask.bool()
    counts = scored.sum(dim=1).cpu()  # (B,)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(dim=0)])  # (B + 1,)
    scored = scored.to(ctx.device)
    return Experience(sequences, loss_mask, *(tokens[scored] for tokens in per_token), token_offsets=offsets)


class UpdateInputs(NamedTuple):
    """One micro-batch of the update. `loss_layout` maps the forward outputs to the layout of the other fields,
    the one `ops.ppo_loss` reads: (b, T) rows when padded; packed, the token vectors as one row for `token-mean` (a
    mean over tokens needs no sequence boundaries), or per-sequence rows for the `seq-mean-*` modes, the one place
    where the update scatters packed tokens into rows."""

    sequences: SequenceBatch | PackedSequences
    score_mask: torch.Tensor | None  # the forward's; None when packed (the scored tokens were chosen when packing)
    loss_layout: Callable[[torch.Tensor], torch.Tensor]
    loss_mask: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    old_values: torch.Tensor
    returns: torch.Tensor


def _update_inputs(ctx: Context, models: Models, experience: Experience, index: torch.Tensor) -> UpdateInputs:
    """The update's micro-batch of sequences `index` (b,)."""
    fields = (experience.old_logp, experience.advantages, experience.values, experience.returns)
    if experience.token_offsets is None:
        mask = experience.loss_mask[index].to(ctx.device)
        return UpdateInputs(experience.sequences.rows(index).to(ctx.device), mask, lambda tensor: tensor, mask,
                            *(field[index] for field in fields))
    packed = _pack(ctx, models, experience.sequences.rows(index), experience.loss_mask[index])
    tokens = packed_token_index(experience.token_offsets, index).to(ctx.device)

    def loss_layout(tensor: torch.Tensor) -> torch.Tensor:
        if ctx.cfg.ppo.loss_agg_mode == "token-mean":
            return tensor[None]
        return packed_to_rows(tensor, packed.token_offsets)

    return UpdateInputs(packed, None, loss_layout, loss_layout(torch.ones(len(tokens), device=ctx.device)),
                        *(loss_layout(field[tokens]) for field in fields))


def advantage_placement(advantages: torch.Tensor, step_ends: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """Mean |advantage| on the tokens that close a search step (where step rewards land), on each trajectory's last
    generated token (where the outcome lands) and over all generated tokens: how much of the policy gradient
    each kind of reward reaches. advantages, mask: (B, T); step_ends: (B, S), -1 = no step."""
    magnitude = advantages.abs() * mask  # (B, T)
    valid = step_ends >= 0  # (B, S)
    at_steps = magnitude.gather(1, step_ends.clamp(min=0))[valid]  # (steps,)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    last = torch.where(mask > 0, positions, -1).amax(dim=1)  # (B,)
    answered = last >= 0
    at_last = magnitude.gather(1, last.clamp(min=0)[:, None])[:, 0][answered]  # (rows,)
    # Every key on every rank (0 when a batch has no step), so the metrics' all-reduce lines up across ranks.
    return {"advantage/abs_all_tokens": magnitude.sum() / mask.sum().clamp(min=1),
            "advantage/abs_at_search_end": at_steps.sum() / max(at_steps.numel(), 1),
            "advantage/abs_at_last_token": at_last.sum() / max(at_last.numel(), 1)}


UPDATE_METRICS = ("loss/policy", "loss/value", "loss/approx_kl", "loss/clip_frac", "loss/value_clip_frac",
                  "loss/entropy")


def update_stage(ctx: Context, models: Models, experience: Experience, step: int, metrics: StepMetrics) -> int:
    """PPO epochs over shuffled mini-batches; gradients accumulate over micro-batches; one optimiser step per
    mini-batch for the actor (after the critic warm-up) and the critic. Returns the number of skipped updates."""
    ppo = ctx.cfg.ppo
    temperature = ctx.cfg.rollout.temperature or 1.0
    update_actor = step >= ppo.critic_warmup_steps
    size = len(experience.loss_mask)
    mini = max(ppo.mini_batch_size // ctx.world_size, 1)
    micro = micro_batch_rows(ctx)
    models.actor.train()
    models.critic.train()
    skipped = 0
    for epoch in range(ppo.ppo_epochs):
        seed = derive_seed(ctx.cfg.trainer.seed, "ppo_shuffle", step, epoch, ctx.rank)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
        for mini_index, start in enumerate(range(0, size, mini)):
            rows = order[start:start + mini]
            mask = experience.loss_mask[rows].to(ctx.device)
            counts = ranks.all_reduce_sum(torch.stack(ops.loss_normalizers(mask)))  # (2,) global tokens, seqs
            # Each micro-batch's loss is its share of the mini-batch loss (global normalisers): shares add up.
            shares = torch.zeros(len(UPDATE_METRICS), device=ctx.device)
            for micro_rows in _micro_batches(len(rows), micro):
                micro_batch = _update_inputs(ctx, models, experience, rows[micro_rows])
                micro_mask = micro_batch.loss_mask
                with torch.set_grad_enabled(update_actor):
                    logp, entropy = models.actor(micro_batch.sequences, micro_batch.score_mask, temperature,
                                                 with_entropy=True)
                logp, entropy = micro_batch.loss_layout(logp), micro_batch.loss_layout(entropy)
                values = micro_batch.loss_layout(models.critic(micro_batch.sequences))
                out = ops.ppo_loss(
                    logp, micro_batch.old_logp, micro_batch.advantages, values, micro_batch.old_values,
                    micro_batch.returns, micro_mask,
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
            totals = ranks.all_reduce_sum(shares)
            policy_total, value_total = totals[:2].tolist()
            if not (math.isfinite(policy_total) and math.isfinite(value_total)):
                models.actor.discard_gradients()
                models.critic.discard_gradients()
                skipped += 1
                log.warning("step %d epoch %d mini-batch %d: update skipped: non-finite loss (policy %s, value %s)",
                            step, epoch, mini_index, policy_total, value_total)
                metrics.add("update/skipped", 1.0)
                continue
            metrics.update(dict(zip(UPDATE_METRICS, totals)))
            metrics.add("update/skipped", 0.0)
            if update_actor:
                metrics.add("grad_norm/actor", models.actor.step())
            metrics.add("grad_norm/critic", models.critic.step())
    return skipped


def train_step(run: Run) -> tuple[dict[str, float], list[dict]]:
    """One StePPO step at `run.state` (the caller advances it); returns the host-side metrics and the
    per-trajectory details for the report."""
    ctx, models, tokenizer, state = run.ctx, run.models, run.tokenizer, run.state
    cfg = ctx.cfg
    metrics = StepMetrics()
    timings: dict[str, float] = {}
    tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[f"time/{name}_s"] = now - tick
        tick = now

    records = run.cursor.take(state.data_position, cfg.ppo.rollout_batch_size)
    rollout = rollout_stage(ctx, models, run.retriever, tokenizer, run.tag_table, records, state.step)
    lap("rollout")
    sequences = segment_stage(rollout, tokenizer)
    lap("segment")
    scores = score_tokens_stage(ctx, models, sequences, rollout.loss_mask)
    lap("score_tokens")
    rewards = reward_stage(ctx, rollout, records, metrics)
    lap("rewards")
    advantages = advantage_stage(ctx, rollout, scores, rewards)
    lap("advantages")
    experience = experience_of(ctx, sequences, rollout.loss_mask, scores, advantages)
    state.skipped_updates += update_stage(ctx, models, experience, state.step, metrics)
    lap("update")

    mask = rollout.loss_mask.to(ctx.device)
    tokens = mask.sum().clamp(min=1)
    generated = rollout.loss_mask.sum().item()
    metrics.update({
        "kl": ((scores.old_logp - scores.ref_logp) * mask).sum() / tokens,
        # ~0 when the rollout engine samples from the actor's own distribution; a stale weight sync, another
        # numeric precision (SGLang's kernels) or another temperature shows up here first
        "rollout/logp_mismatch": ((rollout.rollout_logp.to(ctx.device) - scores.old_logp).abs() * mask).sum() / tokens,
        "value/explained_variance": ops.explained_variance(scores.values, advantages.returns, mask),
        "value/mean": (scores.values * mask).sum() / tokens,
        "reward/token_reward_sum": (advantages.token_rewards * mask).sum(dim=1).mean(),
        "response/length": rollout.response_lengths.float().mean().item(),
        "response/generated_tokens": generated / max(len(rollout), 1),
        "response/turns": float(np.mean(rollout.num_searches)),
        "response/answered": float(np.mean([r == "answer" for r in rollout.finish_reasons])),
        "throughput/rollout_tokens_per_s": generated / max(timings["time/rollout_s"], 1e-9),
    })
    metrics.update(advantage_placement(advantages.advantages, rollout.step_ends.to(ctx.device), mask))
    values = metrics.means()  # device tensors stay unresolved until the logger's one transfer
    values.update(timings)
    values["time/step_s"] = sum(timings.values())
    values["time/segmenter_s"] = rollout.timings["segment_s"]
    values["throughput/tokens_per_s"] = float(rollout.response_mask.sum()) / max(values["time/step_s"], 1e-9)
    if ctx.distributed:  # every rank saw its own trajectories: report the mean over ranks (one all-reduce)
        names = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[n], dtype=torch.float32, device=ctx.device) for n in names])
        values = dict(zip(names, ranks.all_reduce_sum(stacked) / ctx.world_size))
    return values, rewards.details


# ================================================================================================================
# evaluation, export, report, and the loop


def evaluate_stage(run: Run, which: str) -> dict[str, float]:
    """Greedy evaluation on the held-out files, sharded over the ranks (rank r takes questions r, r + W, ...);
    rank 0 gathers the trajectories and writes <run_dir>/eval_<which>/."""
    from stepsearch.eval import evaluate, results_from_trajectories, write_results

    ctx = run.ctx
    if ctx.cfg.trainer.eval_max_questions <= 0 or not run.data.tests:
        return {}
    run.models.sync_rollout_weights()
    shards = {name: list(records)[:ctx.cfg.trainer.eval_max_questions][ctx.rank::ctx.world_size]
              for name, records in run.data.tests.items()}
    result = evaluate(run.models.rollout, run.retriever, run.tokenizer, shards, ctx.cfg.rollout,
                      ctx.cfg.retriever.topk, max_query_chars=ctx.cfg.retriever.max_query_chars,
                      reward_cfg=ctx.cfg.reward, progress=ctx.is_main)
    run.models.rollout.release_memory()
    gathered = ranks.gather_objects(result.trajectories)
    flat: dict[str, float] = {}
    if ctx.is_main:
        world = len(gathered)  # question i of a file sits at position i // world of rank i % world's shard
        merged = {name: [gathered[i % world][name][i // world] for i in range(sum(len(g[name]) for g in gathered))]
                  for name in shards}
        result = results_from_trajectories(merged)
        write_results(result, ctx.paths.eval_dir(which))
        flat = result.metrics()
        log.info("evaluation %s: %s", which, json.dumps({k: round(v, 4) for k, v in flat.items()}))
    ctx.barrier()
    return flat


def export_final(run: Run) -> None:
    """The trained actor as an HF checkpoint in <run_dir>/final (loadable by `stepsearch eval --model`), replaced
    atomically; under ZeRO-3 without a full rollout copy the actor's partitions are gathered first (collective)."""
    models, out = run.models, run.ctx.paths.final
    models.sync_rollout_weights()
    if models.rollout_lm is not None:
        save_hf_model(models.rollout_lm, run.tokenizer, out)
        return
    lm = models.actor.module.lm
    save_hf_model(lm, run.tokenizer, out, state_dict=dict(gathered_named_parameters(lm)))


def _write_trajectories(ctx: Context, step: int, details: list[dict], keep: int = 8) -> None:
    """A few of the step's trajectories, with their reward details, for the report."""
    if ctx.is_main:
        append_jsonl(ctx.paths.trajectories, ({"step": step, **detail} for detail in details[:keep]))


def train(cfg: Config) -> Path:
    """Build the run, evaluate, train to `trainer.total_steps`, evaluate, export, report; returns the run dir."""
    run = build.build_run(cfg)
    ctx, state = run.ctx, run.state
    clock = build.StageClock(run.timings)
    logger = MetricsLogger(ctx.run_dir, is_main=ctx.is_main, tensorboard=cfg.trainer.tensorboard,
                           wandb_project=cfg.trainer.wandb_project, resume_step=state.step if state.step else None)
    if ctx.is_main:  # rows after the checkpoint (an interrupted run's) and a torn last line go
        truncate_jsonl(ctx.paths.trajectories, "trajectory", lambda row: row["step"] <= state.step)
    if state.step == 0 and cfg.trainer.eval_before:
        with clock("eval_before"):
            evaluate_stage(run, "before")

    bar = None
    if ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.trainer.total_steps, initial=state.step, desc="StePPO", unit="step")
    while state.step < cfg.trainer.total_steps:
        with clock("steppo"):
            values, details = train_step(run)
        state.step += 1
        state.data_position += cfg.ppo.rollout_batch_size
        if cfg.trainer.eval_every and state.step % cfg.trainer.eval_every == 0 and state.step < cfg.trainer.total_steps:
            with clock("eval_during"):
                values.update(evaluate_stage(run, f"step{state.step}"))
        row = logger.log(state.step, values)
        _write_trajectories(ctx, state.step, details)
        if bar is not None:
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: f"{row.get(k) or 0:.3f}" for k in ("reward/outcome", "reward/f1", "kl")})
        last = state.step == cfg.trainer.total_steps
        if (cfg.trainer.save_every and state.step % cfg.trainer.save_every == 0) or last:
            with clock("checkpoints"):
                build.save(ctx, run.models, state)
    if bar is not None:
        bar.close()

    with clock("eval_after"):
        evaluate_stage(run, "after")
    logger.close()
    with clock("export"):
        export_final(run)
    if ctx.is_main:
        write_timings(ctx.run_dir, clock.stages)
        if cfg.trainer.report:
            from stepsearch.trainer.report import write_report

            with clock("report"):
                write_report(ctx.run_dir)
            write_timings(ctx.run_dir, clock.stages)
    ctx.barrier()
    return ctx.run_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepsearch train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML preset (default: the built-in defaults)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the rank is read from the environment")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error too (or set STEPSEARCH_DEBUG=1)")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. trainer.total_steps=10")
    return parser


def main(argv: list[str] | None = None) -> int:
    """A user error (config, paths, checkpoint, data) prints one line and exits 2; a bug keeps its traceback."""
    from stepsearch.errors import report_user_errors
    from stepsearch.trainer.preflight import check_before_training

    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        cfg = load_config(args.config, args.overrides)
        check_before_training(cfg)
        train(cfg)
        return 0

    return report_user_errors("stepsearch train", run, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
