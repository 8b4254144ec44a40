"""The tiny Qwen2-shaped causal LM of the embedded CPU default, built from `ModelConfig.tiny_*` in code.

No weights are downloaded: the architecture is a `Qwen2Config` and the parameters are initialised from a seeded
generator, so the same seed gives bit-identical weights. Input and output embeddings are tied (as Qwen2.5-0.5B/3B),
and the rotary base is Qwen2.5's.

`write_copy_circuit` (on by default, `model.tiny_copy_circuit`) gives the random model what every pretrained LM
has and a 2-layer model trained for minutes does not learn: copying a name out of its context. It writes the heads
of an induction circuit into the initial weights (the circuit found in trained transformers by Olsson et
al., 2022, "In-context learning and induction heads"):

    layer 0, heads 0, 1  attend to the token before and the token two before (by position only: their queries
                         and keys are constant vectors whose rotary phases differ by one and by two positions) and
                         write those tokens' embeddings, projected, into subspaces R1 and R2 of the residual stream
    layer 1, kv group 0  its queries read the current token and R1 (the token before it); its keys read R1 and R2,
                         i.e. the two tokens *before* each position; so it attends to the token that followed an
                         earlier occurrence of the last two tokens, and writes that token's embedding: with tied
                         embeddings, a high logit for it

Matching two tokens, not one, is what picks the right name out of a passage: after "The founder of Vabi Company
was", every "was X" in the context matches "was", but only one of them follows "Company was".

The match uses only the slowly turning rotary dimensions, so it holds across hundreds of positions. Measured on
a repeated list of fresh made-up names (loss on the repeat, 300 steps, `benchmarks/bench_copy.py`): from random
weights the loss ends at 3.08 nats; from the circuit it falls to 0.54 within 50 steps and ends at 0.13.
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
        rope_parameters={"rope_type": "default", "rope_theta": model_cfg.tiny_rope_theta},
        use_cache=True,
    )
    # SDPA needs no extra package and runs on CPU and GPU; `set_attn_implementation` may switch it later.
    config._attn_implementation = "sdpa"
    # Seed a forked RNG so that building the model neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    if model_cfg.tiny_copy_circuit:
        write_copy_circuit(model, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# Scales of the copy circuit, chosen on the repeated-names task at the preset's size (hidden 128, head size 32).
_PREVIOUS_TOKEN_SHARPNESS = 10.0  # constant query/key norm per rotary pair: ~10 logits between offset 1 and 0 or 2
_MATCH_SCALE = 2.0  # gain of the induction head's query and key: ~5 logits between a match and a non-match
_COPY_GAIN = 1.0  # gain of the induction head's output, which then dominates the residual stream


def write_copy_circuit(model: "Qwen2ForCausalLM", seed: int = 0) -> None:
    """Overwrite layer 0's heads 0 and 1 and layer 1's first key/value group with a two-token induction circuit.

    See the module docstring for what the heads do. The random subspaces come from a generator seeded with
    `seed`. Other heads, the MLPs and the embeddings keep their random initialisation, and every weight stays
    trainable. Needs at least 2 layers.
    """
    import torch

    config = model.config
    hidden, num_heads, num_kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // num_heads
    half = head_dim // 2
    group = num_heads // num_kv_heads
    inv_freq = model.model.rotary_emb.inv_freq.float()  # (half,) rotary frequency of pair (i, i + half)
    # The induction head matches in the slowest half of the rotary pairs: the slowest quarter compare the current
    # token, the next quarter the token before it.
    token_pairs = list(range(half - max(1, half // 4), half))
    context_pairs = list(range(half - max(2, half // 2), token_pairs[0]))
    token_dims = token_pairs + [pair + half for pair in token_pairs]
    context_dims = context_pairs + [pair + half for pair in context_pairs]
    token_components = list(range(len(token_dims)))  # which components of a head-sized token projection each uses
    context_components = list(range(len(token_dims), len(token_dims) + len(context_dims)))
    generator = torch.Generator().manual_seed(seed)

    def orthonormal_columns(rows: int, cols: int) -> "torch.Tensor":
        return torch.linalg.qr(torch.randn(rows, cols, generator=generator))[0]  # (rows, cols)

    read_token = orthonormal_columns(hidden, head_dim)  # (H, d): what the previous-token head reads
    previous_slot = orthonormal_columns(hidden, head_dim)  # (H, d): where it writes the previous token
    copied_token = orthonormal_columns(hidden, head_dim)  # (H, d): what the induction head reads and writes
    second_previous_slot = orthonormal_columns(hidden, len(context_dims))  # (H, c): where head 1 writes token t - 2
    # The previous token's projected embedding enters the residual stream at the embeddings' own scale.
    previous_gain = config.initializer_range * (hidden / head_dim) ** 0.5

    def per_head(projection: "torch.nn.Linear", heads: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        return projection.weight.view(heads, head_dim, hidden), projection.bias.view(heads, head_dim)

    with torch.no_grad():
        first = model.model.layers[0].self_attn
        q_weight, q_bias = per_head(first.q_proj, num_heads)
        k_weight, k_bias = per_head(first.k_proj, num_kv_heads)
        v_weight, v_bias = per_head(first.v_proj, num_kv_heads)
        first_out = first.o_proj.weight.view(hidden, num_heads, head_dim)
        # Per rotary pair, key = (a, 0) and query = a * e^{-i*k*theta}: the score a^2 cos((m - n - k) theta) peaks at
        # key position n = m - k for every frequency at once. Head h reads its key/value group h // group.
        for head, offset in ((0, 1), (1, 2)):
            kv = head // group
            q_weight[head] = 0.0
            q_bias[head, :half] = _PREVIOUS_TOKEN_SHARPNESS * torch.cos(offset * inv_freq)
            q_bias[head, half:] = -_PREVIOUS_TOKEN_SHARPNESS * torch.sin(offset * inv_freq)
            k_weight[kv] = 0.0
            k_bias[kv, :half] = _PREVIOUS_TOKEN_SHARPNESS
            k_bias[kv, half:] = 0.0
            v_weight[kv] = read_token.T
            v_bias[kv] = 0.0
            # the group's other heads would write the same values with another pattern
            first_out[:, kv * group:(kv + 1) * group] = 0.0
        first_out[:, 0] = previous_slot * previous_gain
        # Head 1 writes only the components the induction head's context match reads, to spare the residual stream.
        first_out[:, 1, context_components] = second_previous_slot * previous_gain

        second = model.model.layers[1].self_attn
        q_weight, q_bias = per_head(second.q_proj, num_heads)
        k_weight, k_bias = per_head(second.k_proj, num_kv_heads)
        v_weight, v_bias = per_head(second.v_proj, num_kv_heads)
        # Query at t: (token t, token t - 1); key at s: (token s - 1, token s - 2). Both match only where the last
        # two tokens before s are the last two tokens up to t.
        q_weight[:group] = 0.0
        q_weight[:group, token_dims] = _MATCH_SCALE * read_token.T[token_components]
        q_weight[:group, context_dims] = _MATCH_SCALE * previous_slot.T[context_components]
        q_bias[:group] = 0.0
        k_weight[0] = 0.0
        k_weight[0, token_dims] = _MATCH_SCALE * previous_slot.T[token_components]
        k_weight[0, context_dims] = _MATCH_SCALE * second_previous_slot.T
        k_bias[0] = 0.0
        v_weight[0] = copied_token.T
        v_bias[0] = 0.0
        second_out = second.o_proj.weight.view(hidden, num_heads, head_dim)
        second_out[:, :group] = (copied_token * _COPY_GAIN / group)[:, None, :]


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
