"""Per-GPU memory plan of a StePPO run under ZeRO-3 with an in-process SGLang engine (docs/gpu.md).

    python -m stepsearch.models.memory_plan            # the table of docs/gpu.md, from the presets

The plan counts what each phase of a step keeps on one GPU, in GiB:

- persistent (every phase): the ZeRO-3 shards of actor and critic (bf16 parameter 2 + bf16 gradient 2 + fp32 master
  4 + fp32 gradient partition 4 + Adam moments 8 = 20 bytes per parameter, / GPUs) and of the frozen reference
  (2 bytes per parameter / GPUs), plus the CUDA context, NCCL buffers and allocator slack (`runtime_gib`).
- rollout: SGLang's static pool, `mem_fraction_static` x the card (its full bf16 weights + the KV cache), and its
  CUDA graphs and activations (`sglang_overhead_gib`).
- weight sync: SGLang's weights resumed alone plus one gathered bucket (`rollout.sglang_sync_bucket_mb`).
- training (SGLang released): per micro-batch of `rows` x `seq_len` tokens, actor and critic each keep one
  checkpointed hidden state per layer (both models' forwards run before the backward passes), one layer is
  recomputed at a time (its intermediates and their gradients), the gathered ZeRO-3 working set (two layers in
  flight plus the LM head, registered as an external parameter and gathered for the whole forward) and the
  chunked LM-head log-prob (tokens x chunk fp32, never the logits).

The estimate is analytic: it is what the numbers of docs/gpu.md come from, not a measurement; a GPU run replaces it
(not yet measured on a GPU).
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3
ZERO3_TRAINED_BYTES = 20  # per parameter: bf16 param + bf16 grad + fp32 master + fp32 grad partition + Adam m, v
ZERO3_FROZEN_BYTES = 2  # per parameter: the reference's bf16 shard


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only model (Qwen2 layout: GQA, SwiGLU MLP, qkv biases)."""

    name: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tied_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        kv = self.kv_heads * self.head_dim
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + self.hidden + 2 * kv  # q, o, k, v + biases
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden  # + MLP + two RMSNorms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def backbone_params(self) -> int:
        return self.embedding_params + self.layers * self.layer_params + self.hidden

    @property
    def causal_lm_params(self) -> int:
        return self.backbone_params + (0 if self.tied_embeddings else self.embedding_params)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16

    @property
    def recompute_bytes_per_token(self) -> int:
        """One decoder layer's bf16 intermediates (norms, q/k/v, attention and o-proj outputs, gate, up, act,
        product, down) and their gradients, while that layer is recomputed and back-propagated."""
        per_token = 6 * self.hidden + 2 * self.kv_heads * self.head_dim + 4 * self.intermediate
        return 2 * per_token * 2


QWEN25_3B = ModelShape("Qwen2.5-3B", vocab=151936, hidden=2048, layers=36, heads=16, kv_heads=2,
                       intermediate=11008, tied_embeddings=True)
QWEN25_7B = ModelShape("Qwen2.5-7B", vocab=152064, hidden=3584, layers=28, heads=28, kv_heads=4,
                       intermediate=18944, tied_embeddings=False)


@dataclass(frozen=True)
class RunShape:
    """The parts of a preset the plan reads."""

    gpus: int
    gpu_gib: float
    rows: int  # trajectories per micro-batch on one GPU
    seq_len: int  # prompt width + response width
    mem_fraction: float  # SGLang's mem_fraction_static
    bucket_mb: int = 512
    logprob_chunk: int = 4096
    runtime_gib: float = 5.0
    sglang_overhead_gib: float = 2.0


def plan(model: ModelShape, run: RunShape) -> dict[str, float]:
    """GiB per GPU of every component and phase (module docstring); `peak` is the largest phase."""
    critic_params = model.backbone_params + model.hidden + 1
    tokens = run.rows * run.seq_len
    out: dict[str, float] = {
        "actor_shards": ZERO3_TRAINED_BYTES * model.causal_lm_params / run.gpus / GIB,
        "critic_shards": ZERO3_TRAINED_BYTES * critic_params / run.gpus / GIB,
        "reference_shards": ZERO3_FROZEN_BYTES * model.causal_lm_params / run.gpus / GIB,
        "runtime": run.runtime_gib,
        "sglang_weights": 2 * model.causal_lm_params / GIB,
    }
    out["sglang_pool"] = run.mem_fraction * run.gpu_gib
    out["kv_cache"] = out["sglang_pool"] - out["sglang_weights"]
    out["kv_cache_tokens"] = out["kv_cache"] * GIB / model.kv_bytes_per_token
    out["checkpointed_activations"] = 2 * tokens * model.hidden * 2 * model.layers / GIB  # actor and critic
    out["layer_recompute"] = tokens * model.recompute_bytes_per_token / GIB
    out["zero3_gathered"] = (2 * 2 * model.layer_params + 2 * model.embedding_params) / GIB
    out["logprob_chunk"] = 2 * tokens * run.logprob_chunk * 4 / GIB  # forward and backward chunk, fp32
    out["sync_bucket"] = run.bucket_mb / 1024
    persistent = out["actor_shards"] + out["critic_shards"] + out["reference_shards"] + out["runtime"]
    out["persistent"] = persistent
    out["phase_rollout"] = persistent + out["sglang_pool"] + run.sglang_overhead_gib
    out["phase_weight_sync"] = persistent + out["sglang_weights"] + out["sync_bucket"]
    out["phase_training"] = persistent + out["checkpointed_activations"] + out["layer_recompute"] + \
        out["zero3_gathered"] + out["logprob_chunk"]
    out["peak"] = max(out["phase_rollout"], out["phase_weight_sync"], out["phase_training"])
    out["full_gathered_copy_per_rank"] = 2 * model.causal_lm_params / GIB  # what a non-bucketed sync would add
    return out


def preset_run_shape(config_path: str, gpus: int, gpu_gib: float) -> RunShape:
    """A `RunShape` from a preset: per-GPU micro-batch rows as the trainer uses them, worst-case widths."""
    from stepsearch.config import load_config

    cfg = load_config(config_path)
    mini_per_gpu = max(cfg.ppo.mini_batch_size // gpus, 1)
    return RunShape(gpus=gpus, gpu_gib=gpu_gib, rows=min(cfg.ppo.micro_batch_size, mini_per_gpu),
                    seq_len=cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens,
                    mem_fraction=cfg.rollout.sglang_mem_fraction, bucket_mb=cfg.rollout.sglang_sync_bucket_mb,
                    logprob_chunk=cfg.kernels.logprob_chunk_size)


#: Usable memory of the cards the presets are planned for, as `torch.cuda.mem_get_info` reports it (GiB).
CARDS = {"80 GB": 79.6, "141 GB": 140.4}

ROWS = [("actor_shards", "actor ZeRO-3 shards (20 B/param / GPUs)"),
        ("critic_shards", "critic ZeRO-3 shards"),
        ("reference_shards", "reference shards (bf16)"),
        ("runtime", "CUDA context, NCCL, allocator slack"),
        ("sglang_weights", "SGLang weights (full bf16 copy)"),
        ("kv_cache", "SGLang KV cache (pool - weights)"),
        ("kv_cache_tokens", "KV cache capacity, tokens"),
        ("checkpointed_activations", "checkpointed activations, actor + critic"),
        ("layer_recompute", "one layer recomputed + its gradients"),
        ("zero3_gathered", "ZeRO-3 gathered layers + LM head"),
        ("logprob_chunk", "chunked LM-head log-prob"),
        ("sync_bucket", "weight-sync bucket"),
        ("phase_rollout", "**rollout phase**"),
        ("phase_weight_sync", "**weight-sync phase**"),
        ("phase_training", "**training phase (SGLang released)**"),
        ("peak", "**peak**"),
        ("full_gathered_copy_per_rank", "(a full gathered copy per rank would add)")]


def markdown_table(columns: list[tuple[str, ModelShape, RunShape]]) -> str:
    header = "| GiB per GPU | " + " | ".join(title for title, _, _ in columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    plans = [plan(model, run) for _, model, run in columns]
    for key, label in ROWS:
        cells = [f"{p[key] / 1000:.0f}k" if key == "kv_cache_tokens" else f"{p[key]:.1f}" for p in plans]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from pathlib import Path

    configs = Path(__file__).resolve().parents[2] / "configs"
    columns = []
    for name, model in (("3b", QWEN25_3B), ("7b", QWEN25_7B)):
        for card, gpu_gib in CARDS.items():
            run = preset_run_shape(str(configs / f"stepsearch_qwen2.5_{name}.yaml"), 8, gpu_gib)
            columns.append((f"{model.name}, 8x{card}", model, run))
    print(markdown_table(columns))
    first = columns[0][2]
    print(f"\nmicro-batch {first.rows} rows x {first.seq_len} tokens per GPU; SGLang mem_fraction_static "
          f"{first.mem_fraction}")


if __name__ == "__main__":
    main()
