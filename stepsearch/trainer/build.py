"""Everything a StePPO run needs before its first step, built by one call: `build_run(cfg) -> Run`.

The training entry point (`stepsearch.train.train`), the tests and the benchmarks all start a run here, so a run
built anywhere has the same data filter, the same models and the same resume rule:

    setup              process group (under a launcher), device, seeds, run directory, resolved config saved
    prepare_data       the synthetic multi-hop world (default) or the user's files -> train / test records
    prepare_retriever  BM25 index of the synthetic corpus (built once) or the configured index / server
    prepare_tokenizer  trained offline for the tiny model, or the checkpoint's
    drop_long_prompts  training questions whose prompt exceeds `data.max_prompt_tokens` are dropped
    prepare_policy     the initial actor's directory: a checkpoint, or the tiny Qwen2-shaped model (+ warm start)
    build_models       the rollout engine first (on a free GPU), then actor / critic engines (DeepSpeed ZeRO-3,
                       built partitioned, or AdamW with fp32 parameters) and the frozen reference, all loaded
                       from that directory
    resume             the last complete checkpoint (`trainer.resume=auto`) -> step, data position, RNG

Files written on the way go where `stepsearch.trainer.run_dir.RunDir` says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stepsearch import ops
from stepsearch.config import Config, ConfigError, save_config
from stepsearch.models.actor_critic import (
    PolicyModel,
    build_critic,
    build_reference,
    enable_gradient_checkpointing,
    load_causal_lm,
    load_tokenizer,
    partitioned_loading,
    resolve_attn_implementation,
    resolve_dtype,
)
from stepsearch.seeds import derive_seed, seed_everything
from stepsearch.trainer import engines, ranks
from stepsearch.trainer.checkpoint import (
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from stepsearch.trainer.run_dir import RunDir

log = logging.getLogger("stepsearch.trainer")


@dataclass
class Context:
    """Where this process stands: the config, the run directory, its device and rank."""

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

    @property
    def paths(self) -> RunDir:
        return RunDir(self.run_dir)

    def barrier(self) -> None:
        ranks.barrier()


def setup(cfg: Config) -> Context:
    """Process group, device, seeds, run directory and the resolved config."""
    distributed = ranks.use_deepspeed(cfg.deepspeed)
    device = resolve_device(cfg.trainer.device, int(os.environ.get("LOCAL_RANK", 0)) if distributed else None)
    rank, local_rank, world = ranks.init_process_group(cfg.trainer.dist_timeout_minutes) if distributed else (0, 0, 1)
    if device.type == "cpu":
        if distributed and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if distributed and cfg.ppo.rollout_batch_size % world:
        raise ConfigError(
            f"ppo.rollout_batch_size ({cfg.ppo.rollout_batch_size}) must be a multiple of the number of ranks ({world})"
        )
    trajectories = cfg.ppo.rollout_batch_size * cfg.rollout.samples_per_prompt // world
    mini_per_rank = max(cfg.ppo.mini_batch_size // world, 1)
    if trajectories % mini_per_rank or mini_per_rank % min(cfg.ppo.micro_batch_size, mini_per_rank):
        raise ConfigError(
            f"trajectories per rank ({trajectories} = rollout_batch_size x samples_per_prompt / "
            f"{world} ranks) must be a multiple of the per-rank mini-batch ({mini_per_rank}), itself a "
            f"multiple of ppo.micro_batch_size ({cfg.ppo.micro_batch_size})"
        )
    ops.configure(cfg.kernels.impl)
    seed_everything(derive_seed(cfg.trainer.seed, "process", rank))
    run_dir = cfg.trainer.run_dir
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, RunDir(run_dir).config)
    context = Context(cfg, run_dir, device, rank, local_rank, world, distributed)
    context.barrier()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    return context


def resolve_device(requested: str, local_rank: int | None) -> torch.device:
    """`cuda`: this rank's GPU (`local_rank`, or the current one in a single process), or a `ConfigError` saying
    why there is none; `auto`: the GPU when there is one; `cpu`. A GPU run never silently becomes a CPU run."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        reason = (
            "this torch is a CPU-only build"
            if torch.version.cuda is None
            else f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) finds no usable GPU; check the "
            "driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"
        )
        raise ConfigError(f"trainer.device=cuda, but {reason}")
    if local_rank is None:
        return torch.device("cuda", torch.cuda.current_device())
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"trainer.device=cuda: local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)"
        )
    return torch.device("cuda", local_rank)


@dataclass
class Data:
    train: list
    tests: dict[str, list]
    corpus_path: Path | None
    warm_start: list = field(default_factory=list)  # demonstrations' questions; empty: the training questions


def prepare_data(ctx: Context) -> Data:
    """Train / test records: the user's files, or the synthetic world written under the run directory."""
    from stepsearch.data import load_or_create_world, load_records

    cfg = ctx.cfg.data
    corpus = None
    if cfg.train_path is None:
        world_dir = ctx.paths.world
        sizes = (cfg.synth_seed, cfg.synth_num_train, cfg.synth_num_test, cfg.synth_num_warm_start)
        if ctx.is_main:
            load_or_create_world(world_dir, *sizes, hops=cfg.synth_hops)
        ctx.barrier()
        files = load_or_create_world(world_dir, *sizes, hops=cfg.synth_hops)
        train_path, test_paths, corpus = (
            files.train,
            [files.test] if not cfg.test_paths else cfg.test_paths,
            files.corpus,
        )
    else:
        train_path, test_paths = cfg.train_path, cfg.test_paths
    train = load_records(train_path, cfg.format, cfg.skip_bad_rows).records
    tests = {Path(p).name.split(".")[0]: load_records(p, cfg.format, cfg.skip_bad_rows).records for p in test_paths}
    if not train:
        raise ConfigError(f"data.train_path={train_path}: no training records")
    warm_start = []
    if cfg.train_path is None and cfg.synth_num_warm_start:
        warm_start = load_records(files.warm_start, "stepsearch").records
    return Data(train, tests, corpus, warm_start)


def prepare_retriever(ctx: Context, data: Data):
    """The configured retriever; an index to build is built by rank 0 while the others wait (under
    `trainer.dist_timeout_minutes`), then loaded by every rank."""
    from stepsearch.retrieval.factory import make_retriever

    _refuse_a_dense_index_per_gpu_rank(ctx)
    index_home = ctx.paths.world
    if ctx.is_main:
        make_retriever(ctx.cfg.retriever, data.corpus_path, index_home)
    ctx.barrier()
    return make_retriever(ctx.cfg.retriever, data.corpus_path, index_home)


def _refuse_a_dense_index_per_gpu_rank(ctx: Context) -> None:
    """A local FAISS index in a multi-rank GPU run would be loaded by every rank and sharded over all of the node's
    GPUs by each: one copy per rank on every GPU. One retrieval server per node holds it once."""
    cfg = ctx.cfg.retriever
    if cfg.url or ctx.world_size == 1 or ctx.device.type != "cuda":
        return
    if cfg.index_dir:
        from stepsearch.retrieval.index import read_index_meta

        dense = read_index_meta(cfg.index_dir).get("method") == "dense"
    else:
        dense = cfg.method == "dense"
    if dense:
        raise ConfigError(
            f"retriever: a local dense index in a run of {ctx.world_size} GPU ranks would be loaded "
            "once per rank and GPU; serve it once per node (`stepsearch retriever serve --index DIR`) "
            "and set retriever.url"
        )


def prepare_tokenizer(ctx: Context, data: Data):
    """The checkpoint's tokenizer, or a byte-level BPE trained offline (tiny model).

    On the synthetic world the BPE spells made-up names syllable by syllable (`synth.NAME_PIECE_PATTERN`).
    """
    cfg = ctx.cfg.model
    path = cfg.tokenizer_path or cfg.actor_path
    if path is not None:
        return load_tokenizer(path)
    from stepsearch.data.synth import NAME_PIECE_PATTERN
    from stepsearch.models.tokenizer import train_tokenizer

    out_dir = ctx.paths.tokenizer
    synthetic = ctx.cfg.data.train_path is None
    if ctx.is_main and not (out_dir / "tokenizer.json").is_file():
        train_tokenizer(
            tokenizer_texts(data),
            cfg.tiny_vocab_size,
            out_dir,
            word_piece_pattern=NAME_PIECE_PATTERN if synthetic else None,
        )
    ctx.barrier()
    return load_tokenizer(str(out_dir))


def tokenizer_texts(data: Data) -> list[str]:
    """What the tiny model's tokenizer learns its merges from.

    With a warm-start region, only that region's text (its questions, demonstrations and passages) and the prompt
    templates: like any real vocabulary, it has never seen the train and test entities' names, which it spells
    from the same pieces as the names the warm start trained on. A vocabulary fitted to the whole corpus would
    give held-out names tokens of their own that no training step ever touched, and a policy cannot copy a token
    whose embedding never learned anything. Without a warm-start region: the corpus, the training questions and
    their demonstrations.
    """
    from stepsearch.rollout.prompts import TEMPLATES
    from stepsearch.trainer.warm_start import gold_turns

    records = data.warm_start or data.train
    texts = list(TEMPLATES.values()) + [r.question for r in records]
    if data.warm_start:
        texts += sorted({doc.text for r in records for doc in r.support_docs})
    elif data.corpus_path:
        texts += [row["contents"] for row in _read_jsonl(data.corpus_path)]
    for record in records:
        try:
            texts += gold_turns(record)[0]
        except ValueError:
            continue
    return texts


def drop_long_prompts(ctx: Context, data: Data, tokenizer) -> Data:
    """Training questions whose prompt exceeds `data.max_prompt_tokens` are dropped, with a count in the log."""
    from stepsearch.rollout.prompts import build_prompt_ids

    limit, template = ctx.cfg.data.max_prompt_tokens, ctx.cfg.rollout.template
    kept = [r for r in data.train if len(build_prompt_ids(tokenizer, r.question, template)) <= limit]
    if len(kept) < len(data.train):
        log.warning(
            "dropped %d of %d training questions whose prompt exceeds data.max_prompt_tokens=%d",
            len(data.train) - len(kept),
            len(data.train),
            limit,
        )
    if not kept:
        raise ConfigError(f"data.max_prompt_tokens={limit}: every training prompt is longer")
    return Data(kept, data.tests, data.corpus_path, data.warm_start)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def prepare_policy(ctx: Context, data: Data, retriever, tokenizer) -> str:
    """The directory of the initial actor (before RL): a local checkpoint, or the tiny model (warm-started on gold
    trajectories when `trainer.warm_start_steps` > 0) saved once by rank 0.

    Every model of the run (rollout copy, actor, reference, critic backbone) is loaded from this directory, so
    under ZeRO-3 each is built partitioned, and the reference is always this same initial policy (a resumed run
    too). The tiny model goes to `RunDir.warm_start`, or `RunDir.initial_policy` without a warm start.
    """
    cfg = ctx.cfg
    if cfg.model.actor_path is not None:
        return cfg.model.actor_path
    from stepsearch.models.tiny import build_tiny_model

    warm = cfg.trainer.warm_start_steps > 0
    policy_dir = ctx.paths.warm_start if warm else ctx.paths.initial_policy
    if ctx.is_main and not (policy_dir / "config.json").is_file():
        model = build_tiny_model(cfg.model, tokenizer, seed=cfg.trainer.seed)
        staging = policy_dir.with_name(policy_dir.name + ".tmp")
        if warm:
            from stepsearch.trainer.warm_start import (
                CheckpointSelector,
                answer_score,
                render_first_turns,
                render_gold_examples,
                supervised_warm_start,
            )

            model.to(ctx.device)
            trainer_cfg = cfg.trainer
            questions = data.warm_start or data.train
            demonstrated = questions[: trainer_cfg.warm_start_trajectories or len(questions)]
            avoid = None
            if trainer_cfg.warm_start_fresh_names:
                from stepsearch.data.synth import made_up_words

                avoid = frozenset().union(*(made_up_words(row["contents"]) for row in _read_jsonl(data.corpus_path)))
            examples = render_gold_examples(
                demonstrated,
                tokenizer,
                retriever,
                cfg.rollout,
                cfg.retriever.topk,
                seed=trainer_cfg.seed,
                detour_prob=trainer_cfg.warm_start_detour_prob,
                limit_prob=trainer_cfg.warm_start_limit_prob,
                bridge_answer_prob=trainer_cfg.warm_start_bridge_answer_prob,
                question_first=trainer_cfg.warm_start_question_first,
                restate_question=trainer_cfg.warm_start_restate_question,
                fresh_names_avoiding=avoid,
            )
            first_turns = None
            if trainer_cfg.warm_start_first_turn_steps and len(demonstrated) < len(questions):
                first_turns = render_first_turns(
                    questions,
                    tokenizer,
                    retriever,
                    cfg.rollout,
                    cfg.retriever.topk,
                    question_first=trainer_cfg.warm_start_question_first,
                    restate_question=trainer_cfg.warm_start_restate_question,
                    seed=trainer_cfg.seed,
                    fresh_names_avoiding=avoid,
                )
            selector = None
            if trainer_cfg.warm_start_select_every:
                # RL training questions: outside the demonstrations (their own region of the world when there is
                # one), and never a test question
                held_out = data.train if data.warm_start else questions[len(demonstrated) :]
                held_out = list(held_out)[: trainer_cfg.warm_start_select_questions]
                if not held_out:
                    raise ConfigError(
                        "trainer.warm_start_select_every needs questions the warm start does not "
                        "demonstrate: set trainer.warm_start_trajectories below the number of "
                        "training questions, or use a synthetic world with data.synth_num_warm_start"
                    )

                def score(policy):
                    return answer_score(
                        policy,
                        tokenizer,
                        retriever,
                        held_out,
                        cfg.rollout,
                        cfg.reward,
                        cfg.retriever.topk,
                        cfg.retriever.max_query_chars,
                    )

                selector = CheckpointSelector(
                    model, score, trainer_cfg.warm_start_select_every, trainer_cfg.warm_start_steps
                )
            losses = supervised_warm_start(
                model,
                examples,
                tokenizer.pad_token_id,
                steps=trainer_cfg.warm_start_steps,
                lr=trainer_cfg.warm_start_lr,
                batch_size=trainer_cfg.warm_start_batch_size,
                seed=trainer_cfg.seed,
                reading_weight=trainer_cfg.warm_start_reading_weight,
                first_turn_steps=trainer_cfg.warm_start_first_turn_steps,
                first_turns=first_turns,
                after_step=selector,
            )
            log.info("warm start: %d gold trajectories, loss %.3f -> %.3f", len(examples), losses[0], losses[-1])
            staging.mkdir(parents=True, exist_ok=True)
            (staging / "losses.json").write_text(json.dumps(losses), encoding="utf-8")
            if selector is not None:
                selector.restore()
                log.info(
                    "warm start: kept step %d of %d (held-out answer score by step: %s)",
                    selector.best_step,
                    len(losses),
                    ", ".join(f"{row['step']}: {row['score']:.3f}" for row in selector.history),
                )
                selection = {"kept_step": selector.best_step, "questions": len(held_out), "history": selector.history}
                (staging / "selection.json").write_text(json.dumps(selection, indent=1), encoding="utf-8")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, policy_dir)
    ctx.barrier()
    return str(policy_dir)


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

    def sync_rollout_weights(self) -> None:
        """Gather the ZeRO-3 actor and load it into the rollout engine (nothing to do when they share weights)."""
        if self.separate_rollout_weights:
            self.rollout.update_weights(engines.gathered_named_parameters(self.actor.module.lm))


def build_models(ctx: Context, policy_dir: str, tokenizer) -> Models:
    """The rollout engine, then the actor / critic training engines and the frozen reference, all from `policy_dir`.

    An SGLang engine starts first, on a GPU that holds nothing yet: it sizes its KV cache from the memory free
    when it starts. Under DeepSpeed ZeRO-3 every model is then built partitioned (`partitioned_loading`), never as
    a full copy on one GPU; the HF engine (CPU, tests) generates with its own full copy there. In one process the
    actor is the HF engine's model, and `LocalTrainEngine` trains 16-bit models with fp32 parameters.
    """
    from stepsearch.rollout.engine import make_engine

    cfg, ppo = ctx.cfg, ctx.cfg.ppo
    dtype = resolve_dtype(cfg.model.dtype, ctx.device)
    attn = resolve_attn_implementation(cfg.model.attn_implementation, ctx.device, dtype)
    chunk = cfg.kernels.logprob_chunk_size
    rollout = None
    if cfg.rollout.engine != "hf":
        rollout = make_engine(
            cfg.rollout,
            None,
            tokenizer,
            ctx.device,
            model_path=policy_dir,
            rank=ctx.rank,
            local_rank=ctx.local_rank,
            seed=derive_seed(cfg.trainer.seed, "rollout_engine", ctx.rank),
        )

    def load_models() -> tuple[PolicyModel, PolicyModel, Any]:
        actor = PolicyModel(load_causal_lm(policy_dir, dtype, attn), chunk)
        reference = build_reference(None, chunk, path=policy_dir, dtype=dtype, attn_implementation=attn)
        critic = build_critic(cfg.model, None, dtype, attn, seed=cfg.trainer.seed, initial_path=policy_dir)
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(actor)
            enable_gradient_checkpointing(critic)
        return actor, reference, critic

    if not ctx.distributed:
        actor, reference, critic = (model.to(ctx.device) for model in load_models())
        if rollout is None:
            rollout = make_engine(cfg.rollout, actor.lm, tokenizer, ctx.device)
        return Models(
            engines.LocalTrainEngine(actor, ppo.actor_lr, ppo.weight_decay, ppo.warmup_steps, ppo.grad_clip),
            engines.LocalTrainEngine(critic, ppo.critic_lr, ppo.weight_decay, ppo.warmup_steps, ppo.grad_clip),
            reference,
            rollout,
            actor.lm,
            separate_rollout_weights=cfg.rollout.engine != "hf",
        )
    # Under ZeRO-3 the actor's parameters are partitioned: the rollout engine generates with its own full copy,
    # refreshed from the gathered actor before every rollout.
    rollout_lm = None
    if rollout is None:
        rollout_lm = load_causal_lm(policy_dir, dtype, attn).to(ctx.device).eval()
        rollout = make_engine(cfg.rollout, rollout_lm, tokenizer, ctx.device)
    on_gpu = ctx.device.type == "cuda"
    engines.check_optimizer(cfg.deepspeed, on_gpu)

    def ds_config(lr: float, train: bool) -> dict:
        return engines.deepspeed_config(cfg, lr=lr, train=train, on_gpu=on_gpu, dp_size=ctx.world_size)

    actor_config, critic_config, reference_config = (
        ds_config(ppo.actor_lr, True),
        ds_config(ppo.critic_lr, True),
        ds_config(ppo.actor_lr, False),
    )
    with partitioned_loading(actor_config):
        actor, reference, critic = load_models()
    if cfg.deepspeed.zero_stage == 3:
        actor.register_lm_head_for_zero3()
        reference.register_lm_head_for_zero3()
    return Models(
        engines.DeepSpeedTrainEngine(actor, actor_config, ppo.warmup_steps),
        engines.DeepSpeedTrainEngine(critic, critic_config, ppo.warmup_steps),
        engines.DeepSpeedInferenceEngine(reference, reference_config),
        rollout,
        rollout_lm,
        separate_rollout_weights=True,
    )


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


def save(ctx: Context, models: Models, state: TrainState) -> None:
    """An atomic checkpoint of the engines, the loop state and every RNG (collective)."""
    save_checkpoint(
        ctx.run_dir,
        state.step,
        **models.checkpoint_items(),
        state={**state.to_dict(), "rng": capture_rng_state()},
        keep=ctx.cfg.trainer.keep_checkpoints,
    )


class DataCursor:
    """Questions in a seeded order, reshuffled each epoch; `position` counts questions consumed by all ranks."""

    def __init__(self, records: list, seed: int, rank: int, world_size: int) -> None:
        self.records, self.seed, self.rank, self.world_size = records, seed, rank, world_size

    def take(self, position: int, count: int) -> list:
        """This rank's share of the `count` questions starting at global `position`."""
        chosen = []
        for index in range(position + self.rank, position + count, self.world_size):
            epoch, offset = divmod(index, len(self.records))
            order = torch.randperm(
                len(self.records), generator=torch.Generator().manual_seed(derive_seed(self.seed, "data_order", epoch))
            )
            chosen.append(self.records[int(order[offset])])
        return chosen


@dataclass
class Run:
    """A run ready for its next StePPO step (`state.step` is 0, or the resumed checkpoint's step)."""

    ctx: Context
    data: Data
    retriever: Any  # stepsearch.retrieval.base.Retriever
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    models: Models
    state: TrainState
    cursor: DataCursor
    tag_table: Any  # stepsearch.rollout.segmenter.TagTable of `agent_tag_table`
    timings: dict[str, float] = field(default_factory=dict)  # wall seconds per set-up stage, in order


class StageClock:
    """Wall seconds per named stage, in the order the stages ran: `with clock("warm_start"): ...`."""

    def __init__(self, stages: dict[str, float] | None = None) -> None:
        self.stages: dict[str, float] = {} if stages is None else stages

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start


def build_run(cfg: Config) -> Run:
    """Set up the process, data, retriever, tokenizer, models and (per `trainer.resume`) the loop state."""
    from stepsearch.rollout.agent_loop import agent_tag_table

    clock = StageClock()
    with clock("setup"):
        ctx = setup(cfg)
    with clock("data"):
        data = prepare_data(ctx)
    with clock("retriever"):
        retriever = prepare_retriever(ctx, data)
    with clock("tokenizer"):
        tokenizer = prepare_tokenizer(ctx, data)
        data = drop_long_prompts(ctx, data, tokenizer)
    with clock("warm_start"):
        policy_dir = prepare_policy(ctx, data, retriever, tokenizer)
    with clock("models"):
        models = build_models(ctx, policy_dir, tokenizer)
        state = resume(ctx, models)
    cursor = DataCursor(data.train, cfg.data.shuffle_seed, ctx.rank, ctx.world_size)
    return Run(ctx, data, retriever, tokenizer, models, state, cursor, agent_tag_table(tokenizer), clock.stages)
