"""The tiny Qwen2-shaped causal LM of the embedded CPU default, built from `ModelConfig.tiny_*` in code.

No weights are downloaded: the architecture is a `Qwen2Config` and the parameters are initialised from a seeded
generator, so the same seed gives bit-identical weights. Input and output embeddings are tied (as Qwen2.5-0.5B/3B).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM

    from stepsearch.config import ModelConfig


def build_tiny_model(model_cfg: "ModelConfig", tokenizer: "PreTrainedTokenizerBase", seed: int = 0,
                     max_position_embeddings: int = 4096) -> "Qwen2ForCausalLM":
    """A freshly initialised fp32 Qwen2ForCausalLM sized by `model_cfg` and `tokenizer`.

    The vocabulary is `len(tokenizer)` (it includes the added tag tokens), which may differ from
    `model_cfg.tiny_vocab_size` when the tokenizer learned fewer merges than asked.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg.tiny_hidden_size,
        intermediate_size=model_cfg.tiny_intermediate_size,
        num_hidden_layers=model_cfg.tiny_num_layers,
        num_attention_heads=model_cfg.tiny_num_heads,
        num_key_value_heads=model_cfg.tiny_num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    # SDPA needs no extra package and runs on CPU and GPU; `set_attn_implementation` may switch it later.
    config._attn_implementation = "sdpa"
    # Seed a forked RNG so that building the model neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def fit_tiny_model(model: "Qwen2ForCausalLM", tokenizer: "PreTrainedTokenizerBase", texts: list[str], steps: int,
                   lr: float = 3e-3, seed: int = 0, loss_masks: list[list[int]] | None = None) -> list[float]:
    """A few full-batch AdamW steps of next-token loss on `texts` (tiny-model warm starts, tests, benchmarks).

    `loss_masks[i][j]` = 0 excludes token j of text i from the loss (e.g. inserted retrieval results). Returns the
    loss per step; leaves the model in eval mode.
    """
    import torch

    encoded = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        keep = (torch.tensor(loss_masks[row][:len(ids)], dtype=torch.bool) if loss_masks
                else torch.ones(len(ids), dtype=torch.bool))
        labels[row, :len(ids)] = torch.where(keep, torch.tensor(ids), torch.tensor(-100))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach().item())
    model.eval()
    return losses
