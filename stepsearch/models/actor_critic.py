"""Actor, critic and reference around one HF causal-LM backbone, and the forward passes the trainer needs.

- actor: the HF causal LM being trained; `PolicyModel` wraps it and returns, for the response tokens only, the
  log-prob of each token and the policy entropy (B, T), computed by `stepsearch.ops.logprob_entropy` from the final
  hidden states and the LM-head weight: the (B, T, V) logits are never built.
- reference: a frozen `PolicyModel` over a copy of the initial actor (KL penalty).
- critic: `Critic` = the same kind of backbone (no LM head) + a scalar value head initialised fresh.

Sequence layout (`SequenceBatch`): prompts are left-padded to a common width P, responses right-padded to T, so
response token t of every row sits at column P + t and is predicted by the hidden state at column P + t - 1. The
value V_t of token t is read from the same column (the state before token t is generated), as in verl.

Packed layout (`PackedSequences`, `model.packing=true`): the same sequences without any pad. Each sequence's real
tokens (prompt, then response) are laid end to end and its positions restart at 0; attention stays inside each
sequence in one of three ways (`packing_layout` picks one):
- `one_row`: the micro-batch is one row; transformers reads the restarts in `position_ids` (with no attention mask)
  as sequence boundaries, which FlashAttention-2 turns into its varlen kernel.
- `rows`: first-fit-decreasing into rows as long as the longest sequence; SDPA / eager get a block-diagonal causal
  mask from the same restarts (row-sized, where one row would need a mask quadratic in the whole micro-batch).
- `per_sequence`: one row, but the backbone runs on each sequence alone: no mask at all, so SDPA takes its causal
  kernel, which skips the masked half that a mask makes it compute (the CPU choice in one process; measured in
  `benchmarks/README.md`, bench_step section).
The forward passes then return packed token vectors (N,) over the scored tokens only, sequence by sequence in
batch order with response positions ascending: the order of `x[score_mask.bool()]` for a (B, T) `x`. Responses
are prefixes of their row (right padding only), as the agent loop builds them.

ZeRO-3: the LM-head weight is partitioned and is used here outside its own module's forward (we never call
`lm_head`, we hand its weight to the fused log-prob). `PolicyModel` therefore registers it as an external
parameter of itself (`deepspeed.zero.register_external_parameter`): DeepSpeed gathers it when `PolicyModel`'s
forward starts and again for its backward, and the gradient flows into the partitioned weight as usual. (Gathering
with `GatheredParameters` inside forward would free the weight before backward needs it.)
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from stepsearch import ops

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from stepsearch.config import ModelConfig

log = logging.getLogger("stepsearch.models")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on GPU, fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def flash_attention_2_status() -> tuple[bool, str]:
    """Whether transformers can run `flash_attention_2` here, and why (not).

    The test is FlashAttention-2's own entry point, `flash_attn.flash_attn_varlen_func`, and transformers'
    acceptance of the installed distribution: a `flash_attn` package alone is not enough (flash-attn-4, which
    SGLang installs, ships `flash_attn.cute` without it, and transformers would then fetch a kernel from the Hub).
    """
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
    except (ImportError, OSError) as exc:  # absent, FA4 only, or built against another torch (undefined symbol)
        return False, f"no FlashAttention-2 entry point: {exc}"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return False, ("transformers does not accept the installed flash_attn as FlashAttention-2 "
                       "(needs flash-attn>=2.3.3)")
    return True, "flash_attn.flash_attn_varlen_func is importable and accepted by transformers"


def resolve_attn_implementation(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """`auto` = FlashAttention-2 when it really is installed (`flash_attention_2_status`), on a GPU, in a 16-bit
    dtype; SDPA otherwise. The choice and its reason are logged."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        choice, reason = "sdpa", f"device {device} is not a GPU"
    elif dtype not in (torch.bfloat16, torch.float16):
        choice, reason = "sdpa", f"FlashAttention-2 needs a 16-bit dtype, not {dtype}"
    else:
        available, reason = flash_attention_2_status()
        choice = "flash_attention_2" if available else "sdpa"
    log.info("model.attn_implementation=auto: %s (%s)", choice, reason)
    return choice


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""What `tokenizer_config.json` names for a tokenizer saved from a bare `tokenizer.json` (the tiny model's)."""


def load_tokenizer(path: str) -> "PreTrainedTokenizerBase":
    """The tokenizer saved in `path`, exactly as saved.

    A generic tokenizer (the tiny model's, saved next to its Qwen2-shaped `config.json`) is loaded as such:
    `AutoTokenizer` would pick the tokenizer class of the model type (Qwen2Tokenizer), which replaces the saved
    pre-tokenizer with Qwen2's, so a policy reloaded from its checkpoint would read other token ids than it was
    trained on. A checkpoint's own tokenizer class (Qwen2.5's) goes through `AutoTokenizer`.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(path) / "tokenizer_config.json"
    saved_class = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class") \
        if config_file.is_file() else None
    loader = PreTrainedTokenizerFast if saved_class in GENERIC_TOKENIZER_CLASSES else AutoTokenizer
    tokenizer = loader.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # Qwen2.5 base ships no pad token; padding positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, dtype: torch.dtype, attn_implementation: str) -> "PreTrainedModel":
    """An HF causal LM from a local directory (never a hub download: `local_files_only`)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                local_files_only=True)


def backbone_of(lm: nn.Module) -> nn.Module:
    """The transformer body of an HF causal LM (`model` for Qwen2/Llama), without the LM head."""
    return getattr(lm, lm.base_model_prefix)


@dataclass
class SequenceBatch:
    """Prompt + response token ids laid out for one forward pass (see the module docstring).

    input_ids, attention_mask, position_ids: (B, P + T); prompt_width: P; response_width: T.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_width: int
    response_width: int

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                             self.prompt_width, self.response_width)

    def rows(self, index: slice | torch.Tensor) -> "SequenceBatch":
        return SequenceBatch(self.input_ids[index], self.attention_mask[index], self.position_ids[index],
                             self.prompt_width, self.response_width)


def build_sequences(prompt_ids: list[list[int]], response_ids: torch.Tensor, response_mask: torch.Tensor,
                    pad_token_id: int) -> SequenceBatch:
    """Left-pad the prompts, append the (right-padded) responses (B, T), and derive positions from the mask."""
    batch_size, response_width = response_ids.shape
    prompt_width = max(len(p) for p in prompt_ids)
    prompts = torch.full((batch_size, prompt_width), pad_token_id, dtype=torch.long)  # (B, P)
    prompt_mask = torch.zeros((batch_size, prompt_width), dtype=torch.long)  # (B, P)
    for row, ids in enumerate(prompt_ids):
        prompts[row, prompt_width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        prompt_mask[row, prompt_width - len(ids):] = 1
    input_ids = torch.cat([prompts, response_ids.long().cpu()], dim=1)  # (B, P + T)
    attention_mask = torch.cat([prompt_mask, response_mask.long().cpu()], dim=1)  # (B, P + T)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, P + T)
    return SequenceBatch(input_ids, attention_mask, position_ids, prompt_width, response_width)


@dataclass
class PackedSequences:
    """Sequences packed without pads for one forward pass (see "Packed layout" in the module docstring).

    input_ids, position_ids: (R, C) packed rows; predict_index: (N,) index into the R * C flattened positions of the
    hidden state that predicts each scored token (the token before it); targets: (N,) the scored token ids;
    token_offsets: (b + 1,) int64 on the host (it sizes tensors), sequence i's scored tokens are entries
    token_offsets[i]:token_offsets[i + 1] of every packed token vector; layout: `one_row`, `rows` or
    `per_sequence`; lengths: the b sequence lengths in batch order (their order in the row of the one-row layouts).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    predict_index: torch.Tensor
    targets: torch.Tensor
    token_offsets: torch.Tensor
    layout: str
    lengths: tuple[int, ...]

    def to(self, device: torch.device | str) -> "PackedSequences":
        return PackedSequences(self.input_ids.to(device), self.position_ids.to(device), self.predict_index.to(device),
                               self.targets.to(device), self.token_offsets, self.layout, self.lengths)


PACKING_LAYOUTS = ("one_row", "rows", "per_sequence")


def pack_sequences(sequences: SequenceBatch, score_mask: torch.Tensor, layout: str) -> PackedSequences:
    """Pack the rows of `sequences` (laid out by `build_sequences`) without pads; `score_mask` (b, T) marks the
    response tokens to score (a subset of the response tokens, e.g. the loss mask).

    layout (module docstring): `one_row` and `per_sequence` put every sequence in one row in batch order; `rows`
    packs first-fit-decreasing into rows as long as the longest sequence, each row's unused tail a block of its own
    (token id 0, positions from 0) whose outputs nothing reads. Runs on the host: the inputs are the host-side
    layout.
    """
    if layout not in PACKING_LAYOUTS:
        raise ValueError(f"pack_sequences: layout must be one of {PACKING_LAYOUTS}, got {layout!r}")
    input_ids, real = sequences.input_ids.cpu(), sequences.attention_mask.cpu().bool()  # (b, P + T)
    scored = score_mask.cpu().bool()  # (b, T)
    lengths = real.sum(dim=1).tolist()
    row_of, offset_of = [0] * len(lengths), [0] * len(lengths)
    if layout != "rows":
        capacity, fills = sum(lengths), [0]
        for index, length in enumerate(lengths):
            offset_of[index], fills[0] = fills[0], fills[0] + length
    else:
        capacity, fills = max(lengths), []
        for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            row = next((r for r, fill in enumerate(fills) if fill + lengths[index] <= capacity), len(fills))
            if row == len(fills):
                fills.append(0)
            row_of[index], offset_of[index] = row, fills[row]
            fills[row] += lengths[index]
    packed_ids = torch.zeros((len(fills), capacity), dtype=torch.long)  # (R, C)
    packed_positions = torch.zeros((len(fills), capacity), dtype=torch.long)  # (R, C)
    for index, length in enumerate(lengths):
        row, offset = row_of[index], offset_of[index]
        packed_ids[row, offset:offset + length] = input_ids[index][real[index]]
        packed_positions[row, offset:offset + length] = torch.arange(length)
    for row, fill in enumerate(fills):
        packed_positions[row, fill:] = torch.arange(capacity - fill)
    start = torch.tensor(row_of) * capacity + torch.tensor(offset_of)  # (b,) flat position of each sequence's start
    width = sequences.prompt_width
    sequence_of_token = scored.nonzero()[:, 0]  # (N,) row-major: sequence by sequence, positions ascending
    position_in_sequence = sequences.position_ids.cpu()[:, width:][scored]  # (N,) (prompt + response prefix)
    counts = scored.sum(dim=1)  # (b,)
    return PackedSequences(
        input_ids=packed_ids,
        position_ids=packed_positions,
        predict_index=start[sequence_of_token] + position_in_sequence - 1,
        targets=input_ids[:, width:][scored],
        token_offsets=torch.cat([counts.new_zeros(1), counts.cumsum(dim=0)]),
        layout=layout,
        lengths=tuple(lengths),
    )


def packing_layout(model: nn.Module, partitioned: bool) -> str:
    """The packed layout for the HF model inside `model` (module docstring): `one_row` under FlashAttention-2
    (varlen); else `per_sequence` on the CPU when the weights are whole (`partitioned`: ZeRO-3 would gather every
    layer's partitions again for each sequence), and `rows` (GPU SDPA: one batched pass, no launch per sequence)."""
    from transformers import PreTrainedModel

    hf_model = next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)
    if hf_model is None:
        raise ValueError(f"{type(model).__name__} holds no HF model")
    if hf_model.config._attn_implementation == "flash_attention_2":
        return "one_row"
    on_cpu = next(hf_model.parameters()).device.type == "cpu"
    return "per_sequence" if on_cpu and not partitioned else "rows"


def packed_token_index(token_offsets: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """(n,) positions in packed token vectors (offsets (B + 1,)) of the tokens of `sequences` (b,), in that order.
    Host tensors in, a host tensor out."""
    first, counts = token_offsets[sequences], token_offsets[sequences + 1] - token_offsets[sequences]  # (b,)
    first_in_output = counts.cumsum(dim=0) - counts  # (b,)
    return (first - first_in_output).repeat_interleave(counts) + torch.arange(int(counts.sum()))


def packed_to_rows(tokens: torch.Tensor, token_offsets: torch.Tensor) -> torch.Tensor:
    """(b, L) rows of a packed token vector (n,), sequence i's tokens left-aligned in row i and 0 after them;
    L is the most tokens of one sequence (`token_offsets` (b + 1,) on the host). The row mask is
    `packed_to_rows(torch.ones_like(tokens), token_offsets)`."""
    counts = token_offsets[1:] - token_offsets[:-1]  # (b,)
    present = torch.arange(int(counts.max())) < counts[:, None]  # (b, L)
    present = present.to(tokens.device)
    return tokens.new_zeros(present.shape).masked_scatter(present, tokens)


def _packed_hidden(backbone: nn.Module, packed: PackedSequences) -> torch.Tensor:
    """(N, H) hidden states that predict the scored tokens. No attention mask: the restarts in `position_ids` are
    what confines attention to each sequence, or each sequence runs alone (module docstring)."""
    if packed.layout == "per_sequence":
        pieces, start = [], 0
        for length in packed.lengths:
            span = slice(start, start + length)
            pieces.append(backbone(input_ids=packed.input_ids[:, span], position_ids=packed.position_ids[:, span],
                                   use_cache=False).last_hidden_state)  # (1, length, H)
            start += length
        hidden = torch.cat(pieces, dim=1)  # (1, C, H)
    else:
        hidden = backbone(input_ids=packed.input_ids, position_ids=packed.position_ids,
                          use_cache=False).last_hidden_state  # (R, C, H)
    return hidden.flatten(0, 1)[packed.predict_index]


def _response_hidden(backbone: nn.Module, sequences: SequenceBatch) -> torch.Tensor:
    """(B, T, H) hidden states that predict response tokens 0..T-1 (columns P-1 .. P+T-2)."""
    hidden = backbone(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask,
                      position_ids=sequences.position_ids, use_cache=False).last_hidden_state  # (B, P + T, H)
    start = sequences.prompt_width - 1
    return hidden[:, start:start + sequences.response_width]


class PolicyModel(nn.Module):
    """Actor or reference: an HF causal LM whose forward returns response log-probs and entropies (B, T)."""

    def __init__(self, lm: "PreTrainedModel", chunk_size: int = 4096) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size

    def register_lm_head_for_zero3(self) -> None:
        """Let ZeRO-3 gather the LM-head weight for this module's forward and backward (module docstring)."""
        import deepspeed

        deepspeed.zero.register_external_parameter(self, self.lm.get_output_embeddings().weight)

    def forward(self, sequences: SequenceBatch | PackedSequences, score_mask: torch.Tensor | None = None,
                temperature: float = 1.0, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp, entropy) fp32: (B, T) for a `SequenceBatch`, nonzero only where `score_mask` (B, T) is set; packed
        token vectors (N,) for `PackedSequences` (whose scored tokens were chosen when packing; no `score_mask`).
        The entropy is zeros unless `with_entropy`.

        Only the scored tokens go through the LM head (prompt, retrieved and padding tokens cost nothing there).
        """
        weight = self.lm.get_output_embeddings().weight  # (V, H)
        if isinstance(sequences, PackedSequences):
            hidden = _packed_hidden(backbone_of(self.lm), sequences)  # (N, H)
            logp, entropy = ops.logprob_entropy(hidden.to(weight.dtype), weight, sequences.targets,
                                                chunk_size=self.chunk_size, temperature=temperature)
            logp = logp.float()
            return logp, entropy.float() if with_entropy else torch.zeros_like(logp)
        hidden = _response_hidden(backbone_of(self.lm), sequences)  # (B, T, H)
        selected = score_mask.bool()  # (B, T)
        targets = sequences.input_ids[:, sequences.prompt_width:][selected]  # (N,)
        logp_selected, entropy_selected = ops.logprob_entropy(
            hidden[selected].to(weight.dtype), weight, targets, chunk_size=self.chunk_size, temperature=temperature)
        logp = torch.zeros(selected.shape, dtype=torch.float32, device=hidden.device)  # (B, T)
        logp = logp.masked_scatter(selected, logp_selected.float())
        entropy = torch.zeros_like(logp)
        if with_entropy:
            entropy = entropy.masked_scatter(selected, entropy_selected.float())
        return logp, entropy


class Critic(nn.Module):
    """Backbone + scalar value head; forward returns values fp32 for the response tokens."""

    def __init__(self, backbone: nn.Module, hidden_size: int, seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(hidden_size, 1, dtype=next(backbone.parameters()).dtype)
        # A small fresh head (std 1/(H+1), as OpenRLHF) so initial values are near 0 whatever the backbone.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight = torch.randn(self.value_head.weight.shape, generator=generator) / (hidden_size + 1)
            self.value_head.weight.copy_(weight.to(self.value_head.weight.dtype))
            self.value_head.bias.zero_()

    def forward(self, sequences: SequenceBatch | PackedSequences) -> torch.Tensor:
        """Values fp32: (B, T) for a `SequenceBatch`, packed token vectors (N,) over the scored tokens for
        `PackedSequences`."""
        if isinstance(sequences, PackedSequences):
            return self.value_head(_packed_hidden(self.backbone, sequences)).squeeze(-1).float()  # (N,)
        hidden = _response_hidden(self.backbone, sequences)  # (B, T, H)
        return self.value_head(hidden).squeeze(-1).float()  # (B, T)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing on the outermost HF model inside `model` (it covers the layers of the
    models it holds)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            # transformers 5 renamed the method; the old name warns and goes in v6
            if hasattr(module, "activation_checkpointing_enable"):
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            return


def load_backbone(path: str, dtype: torch.dtype, attn_implementation: str) -> "PreTrainedModel":
    """The transformer body (no LM head) of a local HF checkpoint."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True)


@contextlib.contextmanager
def partitioned_loading(ds_config: dict | None) -> Iterator[None]:
    """Models loaded with `from_pretrained` inside are built partitioned over the ranks, as ZeRO-3 will hold them
    (transformers' DeepSpeed integration runs the construction under `deepspeed.zero.Init` and loads each rank's
    shard): no full copy of a model ever lands on one GPU. Without a ZeRO-3 config it changes nothing."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    hf_ds_config = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: held while loading
    try:
        yield
    finally:
        del hf_ds_config
        unset_hf_deepspeed_config()


def build_critic(model_cfg: "ModelConfig", actor_lm: "PreTrainedModel", dtype: torch.dtype, attn_implementation: str,
                 seed: int, initial_path: str | None = None) -> Critic:
    """The critic: the backbone of `model.critic_path`, else `actor_path`, else `initial_path` (the initial policy
    saved by the trainer), or else a copy of the in-code actor's backbone; a fresh value head on top."""
    path = model_cfg.critic_path or model_cfg.actor_path or initial_path
    if path is None:
        backbone = copy.deepcopy(backbone_of(actor_lm)).to(dtype)
    else:
        backbone = load_backbone(path, dtype, attn_implementation)
    return Critic(backbone, backbone.config.hidden_size, seed=seed)


def build_reference(actor_lm: "PreTrainedModel", chunk_size: int, path: str | None = None,
                    dtype: torch.dtype | None = None, attn_implementation: str = "sdpa") -> PolicyModel:
    """The frozen initial policy: the checkpoint at `path` loaded again (partitioned under `partitioned_loading`),
    or a copy of `actor_lm` as it is now (before any RL update)."""
    lm = copy.deepcopy(actor_lm) if path is None else load_causal_lm(path, dtype or torch.float32, attn_implementation)
    reference = PolicyModel(lm, chunk_size)
    reference.requires_grad_(False)
    return reference.eval()
