"""Padding-free packing (`model.packing`): the packed layout by hand, and packed forward passes equal to padded ones.

On batches whose lengths differ by an order of magnitude, the actor's log-probs and entropies, the critic's values
and the gradients of a loss over all three are the same packed (in every layout: rows as long as the longest
sequence, one row, each sequence alone) as padded, with SDPA and eager attention, to fp32 rounding.
FlashAttention-2's varlen path is checked the same way on a GPU (`gpu` marker). Activation checkpointing (on in the
GPU presets) recomputes the layers in the backward and changes none of these, padded or packed.
"""
from __future__ import annotations

import pytest
import torch

from stepsearch.models.actor_critic import (
    Critic,
    PolicyModel,
    build_sequences,
    enable_gradient_checkpointing,
    pack_sequences,
    packed_to_rows,
    packed_token_index,
    packing_layout,
)

VOCAB = 97
PAD = 0


def tiny_lm(attn_implementation: str, dtype: torch.dtype = torch.float32):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=PAD)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config).to(dtype)


def ragged_batch(seed: int = 0):
    """Prompts of 1-13 tokens, responses of 1-60 (right-padded to 60), retrieved blocks masked out of the scores."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths, response_lengths = [13, 1, 6, 2, 9], [3, 60, 1, 41, 17]
    prompts = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in prompt_lengths]
    width = max(response_lengths)
    response_ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    response_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, length in enumerate(response_lengths):
        response_ids[row, :length] = torch.randint(1, VOCAB, (length,), generator=generator)
        response_mask[row, :length] = 1
    loss_mask = response_mask.float()
    loss_mask[1, 10:25] = 0  # a retrieved <information> block inside a response
    loss_mask[3, 5:30] = 0
    return build_sequences(prompts, response_ids, response_mask, PAD), loss_mask


def test_pack_layout_by_hand():
    sequences = build_sequences([[5, 6], [4]], torch.tensor([[7, 8, 9], [3, 0, 0]]),
                                torch.tensor([[1, 1, 1], [1, 0, 0]]), PAD)
    score_mask = torch.tensor([[1, 0, 1], [1, 0, 0]])  # token 8 is retrieved text
    rows = pack_sequences(sequences, score_mask, "rows")
    assert rows.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]
    assert rows.predict_index.tolist() == [1, 3, 5]  # 7 by the state at 6, 9 at 8, 3 at 4 (row 1 starts at 5)
    assert rows.targets.tolist() == [7, 9, 3]
    assert rows.token_offsets.tolist() == [0, 2, 3]
    for layout in ("one_row", "per_sequence"):
        one = pack_sequences(sequences, score_mask, layout)
        assert one.input_ids.tolist() == [[5, 6, 7, 8, 9, 4, 3]]
        assert one.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1]]
        assert one.predict_index.tolist() == [1, 3, 5] and one.lengths == (5, 2)
    with pytest.raises(ValueError, match="layout must be one of"):
        pack_sequences(sequences, score_mask, "columns")
    # First-fit-decreasing, lengths 3, 7, 4, 5, 2 (a 1-token response each), capacity 7: sequence 1 fills row 0;
    # 3 opens row 1; 2 does not fit there (5 + 4) and opens row 2; 0 fits row 2 (4 + 3); 4 fits row 1 (5 + 2).
    lengths = [2, 6, 3, 4, 1]
    sequences = build_sequences([[1] * n for n in lengths], torch.ones((5, 1), dtype=torch.long),
                                torch.ones((5, 1), dtype=torch.long), PAD)
    packed = pack_sequences(sequences, torch.ones((5, 1)), "rows")
    assert packed.input_ids.shape == (3, 7)
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 0, 1], [0, 1, 2, 3, 0, 1, 2]]
    # each response token is predicted by the state one before the sequence's end: row * 7 + offset + length - 2
    assert packed.predict_index.tolist() == [14 + 4 + 1, 0 + 0 + 5, 14 + 0 + 2, 7 + 0 + 3, 7 + 5 + 0]


def test_packed_token_index_and_rows():
    offsets = torch.tensor([0, 3, 3, 7, 9])  # 4 sequences of 3, 0, 4 and 2 tokens
    assert packed_token_index(offsets, torch.tensor([2, 0, 1, 3])).tolist() == [3, 4, 5, 6, 0, 1, 2, 7, 8]
    assert packed_token_index(offsets, torch.tensor([1])).tolist() == []
    tokens = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    rows = packed_to_rows(tokens, torch.tensor([0, 2, 2, 6]))
    assert rows.tolist() == [[1.0, 2.0, 0, 0], [0, 0, 0, 0], [3.0, 4.0, 5.0, 6.0]]


def test_packing_layout_follows_attention_device_and_partitioning():
    policy = PolicyModel(tiny_lm("sdpa"))
    assert packing_layout(policy, partitioned=False) == "per_sequence"
    assert packing_layout(policy, partitioned=True) == "rows"
    lm = tiny_lm("eager")
    lm.config._attn_implementation = "flash_attention_2"  # read only, never run here
    assert packing_layout(Critic(lm.model, 32), partitioned=True) == "one_row"
    with pytest.raises(ValueError, match="holds no HF model"):
        packing_layout(torch.nn.Linear(2, 2), partitioned=False)


def forward_and_backward(lm, sequences, loss_mask, packed, layout, device="cpu"):
    """Log-probs, entropies, values (packed token vectors over the loss mask) and the gradients of a loss that
    weights each of them per token."""
    actor = PolicyModel(lm, chunk_size=40)
    critic = Critic(lm.model, 32, seed=1).to(device=device, dtype=lm.dtype)
    if packed:
        batch, mask = pack_sequences(sequences, loss_mask, layout).to(device), None
    else:
        batch, mask = sequences.to(device), loss_mask.to(device)
    logp, entropy = actor(batch, mask, temperature=0.7, with_entropy=True)
    values = critic(batch)
    if not packed:
        selected = mask.bool()
        logp, entropy, values = logp[selected], entropy[selected], values[selected]
    weights = torch.linspace(-1.0, 1.0, len(logp), device=device)
    (weights * logp + weights.flip(0) * entropy + 0.3 * weights * values).sum().backward()
    named = [*lm.named_parameters(), *critic.value_head.named_parameters()]  # the critic shares the lm's body
    grads = {name: parameter.grad.detach().clone() for name, parameter in named}
    lm.zero_grad(set_to_none=True)
    return logp.detach(), entropy.detach(), values.detach(), grads


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["rows", "one_row", "per_sequence"])
def test_packed_equals_padded_logprobs_values_and_gradients(attn_implementation, layout):
    sequences, loss_mask = ragged_batch()
    assert loss_mask.sum() < 0.5 * sequences.input_ids.numel()  # most of the padded layout is padding
    lm = tiny_lm(attn_implementation)
    padded = forward_and_backward(lm, sequences, loss_mask, packed=False, layout=layout)
    packed = forward_and_backward(lm, sequences, loss_mask, packed=True, layout=layout)
    for name, want, got in zip(("logp", "entropy", "values"), padded[:3], packed[:3]):
        assert got.shape == (int(loss_mask.sum()),)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)
    assert padded[3].keys() == packed[3].keys()
    for name in padded[3]:
        torch.testing.assert_close(packed[3][name], padded[3][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("packed, layout", [(False, None), (True, "rows"), (True, "per_sequence")])
def test_activation_checkpointing_recomputes_the_layers_and_keeps_the_gradients(packed, layout):
    """`model.gradient_checkpointing` (on in the GPU presets): every decoder layer runs again in the backward, and
    log-probs, entropies, values and gradients are those of the run without it."""
    sequences, loss_mask = ragged_batch()
    runs, layer_calls = {}, {}
    for checkpointing in (False, True):
        lm = tiny_lm("sdpa")
        if checkpointing:
            enable_gradient_checkpointing(PolicyModel(lm))
        calls = layer_calls[checkpointing] = []
        # a pre-hook inside the layer: transformers checkpoints `forward` (not the layer's own hooks), and the
        # recompute stops as soon as it has what the backward needs, before later submodules return
        lm.model.layers[0].self_attn.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        runs[checkpointing] = forward_and_backward(lm, sequences, loss_mask, packed=packed, layout=layout)
    assert len(layer_calls[True]) == 2 * len(layer_calls[False]) > 0  # the layer ran again in the backward
    plain, checkpointed = runs[False], runs[True]
    for name, want, got in zip(("logp", "entropy", "values"), plain[:3], checkpointed[:3]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
    for name in plain[3]:
        torch.testing.assert_close(checkpointed[3][name], plain[3][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_flash_attention_2_varlen_packing_equals_padded_on_gpu():
    from stepsearch.models.actor_critic import flash_attention_2_status

    if not torch.cuda.is_available() or not flash_attention_2_status()[0]:
        pytest.skip("needs a GPU with FlashAttention-2")
    sequences, loss_mask = ragged_batch()
    lm = tiny_lm("flash_attention_2", torch.bfloat16).cuda()
    assert packing_layout(lm, partitioned=False) == "one_row"
    padded = forward_and_backward(lm, sequences, loss_mask, packed=False, layout="one_row", device="cuda")
    packed = forward_and_backward(lm, sequences, loss_mask, packed=True, layout="one_row", device="cuda")
    for want, got in zip(padded[:3], packed[:3]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
