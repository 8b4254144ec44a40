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
