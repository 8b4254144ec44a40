"""The offline tokenizer (tags as single non-special ids, reload) and the seeded tiny Qwen2 model."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from stepsearch.config import ModelConfig
from stepsearch.models.tiny import build_tiny_model, fit_tiny_model
from stepsearch.models.tokenizer import TAGS, train_tokenizer

# The embedded preset's model size (configs/tiny_cpu.yaml), on which the copy circuit's scales were chosen.
PRESET_SIZED = ModelConfig(tiny_hidden_size=128, tiny_num_layers=2, tiny_num_heads=4, tiny_num_kv_heads=2,
                           tiny_intermediate_size=352)
TEXTS = [f"Doc {i}: The river Alder{i} flows through Brennick. <search>river {i}</search>" for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(TEXTS, vocab_size=512, out_dir=tmp_path_factory.mktemp("tok"))


def test_tags_are_single_non_special_tokens_that_decode_as_text(tokenizer):
    text = "<think>plan</think>\n<search>river 3</search>\n<information>x</information>\n<answer>Brennick</answer>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for tag in TAGS:
        tag_ids = tokenizer.encode(tag, add_special_tokens=False)
        assert len(tag_ids) == 1 and tag_ids[0] in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert None not in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)
    assert len({tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}) == 3
    assert tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=True) == ""


def test_tokenizer_reloads_identically_with_autotokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Ünïcode résumé <search>river 7</search> and bytes \x01"
    assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert len(reloaded) == len(tokenizer) <= 512
    assert reloaded.pad_token == tokenizer.pad_token


def test_tokenizer_rejects_a_vocabulary_too_small_for_bytes_and_tags():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(TEXTS, vocab_size=100)


def test_tiny_model_is_seeded_tied_and_sized_by_config(tokenizer):
    cfg = ModelConfig(tiny_hidden_size=64, tiny_num_layers=1, tiny_num_heads=4, tiny_num_kv_heads=2,
                      tiny_intermediate_size=96, tiny_copy_circuit=False)
    first, second = build_tiny_model(cfg, tokenizer, seed=1), build_tiny_model(cfg, tokenizer, seed=1)
    other = build_tiny_model(cfg, tokenizer, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)
    assert first.lm_head.weight is first.model.embed_tokens.weight
    assert first.config.vocab_size == len(tokenizer) and first.config.hidden_size == 64
    assert first.config.num_key_value_heads == 2 and first.config.num_hidden_layers == 1
    state = torch.random.get_rng_state()
    build_tiny_model(cfg, tokenizer, seed=3)
    assert torch.equal(state, torch.random.get_rng_state()), "building must not disturb the caller's RNG"
    logits = first(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tokenizer))


def test_fit_tiny_model_lowers_the_loss_and_respects_the_loss_mask(tokenizer):
    cfg = ModelConfig(tiny_hidden_size=64, tiny_num_layers=1, tiny_num_heads=4, tiny_num_kv_heads=2,
                      tiny_intermediate_size=96, tiny_copy_circuit=False)
    model = build_tiny_model(cfg, tokenizer)
    losses = fit_tiny_model(model, tokenizer, TEXTS[:4], steps=15, lr=1e-2)
    assert losses[-1] < 0.7 * losses[0] and not model.training
    # Fully masking the second text must train exactly as the first text alone (right padding, causal attention).
    alone, masked = build_tiny_model(cfg, tokenizer), build_tiny_model(cfg, tokenizer)
    fit_tiny_model(alone, tokenizer, TEXTS[:1], steps=2)
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) for t in (TEXTS[0], TEXTS[10] * 2)]
    fit_tiny_model(masked, tokenizer, [TEXTS[0], TEXTS[10] * 2], steps=2,
                   loss_masks=[[1] * lengths[0], [0] * lengths[1]])
    for a, b in zip(alone.parameters(), masked.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_word_piece_pattern_keeps_merges_inside_pieces_and_unseen_names_representable(tmp_path):
    from stepsearch.data.synth import NAME_PIECE_PATTERN

    texts = ["Kipifu Museum was founded by Fumil Kipifu. The father of Kipifu Tusos was Fumil Tusos."] * 50
    tokenizer = train_tokenizer(texts, vocab_size=400, out_dir=tmp_path, word_piece_pattern=NAME_PIECE_PATTERN)
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("Fumil Kipifu met Zovabo", add_special_tokens=False)]
    assert pieces[:5] == ["Fu", "mil", " Ki", "pi", "fu"]  # however often "Kipifu" occurred, no merge crosses
    assert "".join(pieces) == "Fumil Kipifu met Zovabo" and tokenizer.unk_token_id not in tokenizer.encode("Zovabo")
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert reloaded.encode("Fumil Kipifu met Zovabo") == tokenizer.encode("Fumil Kipifu met Zovabo")


def test_a_tokenizer_saved_next_to_the_tiny_model_reloads_as_saved(tmp_path):
    from stepsearch.data.synth import NAME_PIECE_PATTERN
    from stepsearch.models.actor_critic import load_tokenizer
    from stepsearch.models.tiny import build_tiny_model

    texts = ["The founder of Kipifu Museum was born in the year 1943. <think> x </think>"] * 40
    tokenizer = train_tokenizer(texts, vocab_size=400, word_piece_pattern=NAME_PIECE_PATTERN)
    model = build_tiny_model(ModelConfig(tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2,
                                         tiny_num_kv_heads=1, tiny_intermediate_size=48,
                                         tiny_copy_circuit=False), tokenizer)
    model.save_pretrained(tmp_path)  # config.json says qwen2: AutoTokenizer would load a Qwen2Tokenizer
    tokenizer.save_pretrained(tmp_path)
    reloaded = load_tokenizer(str(tmp_path))
    text = "Fumil Kipifu was born in the year 1943 in Sizegal. <search> who </search>"
    assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.pad_token_id == tokenizer.pad_token_id and reloaded.eos_token_id == tokenizer.eos_token_id


def _repeat_accuracy(model, sequences: torch.Tensor) -> float:
    """Top-1 accuracy of predicting each token of the second half of `sequences` (each a list repeated twice)."""
    half = sequences.shape[1] // 2
    with torch.no_grad():
        logits = model(sequences).logits  # (B, 2L, V)
    predicted = logits[:, half:-1].argmax(-1)  # (B, L - 1): positions L .. 2L - 2 predict tokens L + 1 .. 2L - 1
    return (predicted == sequences[:, half + 1:]).float().mean().item()


def test_copy_circuit_copies_a_repeated_list_of_tokens_before_any_training(tokenizer, tmp_path):
    cfg = PRESET_SIZED
    generator = torch.Generator().manual_seed(0)
    # 16 lists of 40 distinct tokens each, then the same list again; ids 10+ skip the special tokens
    lists = torch.stack([torch.randperm(len(tokenizer) - 10, generator=generator)[:40] + 10 for _ in range(16)])
    sequences = torch.cat([lists, lists], dim=1)  # (16, 80)
    model = build_tiny_model(cfg, tokenizer, seed=3)
    model.config._attn_implementation = "eager"  # attention weights are returned by eager attention only
    attention = model(sequences[:1], output_attentions=True).attentions[0][0, 0]  # (T, T): layer 0, head 0
    assert attention.diagonal(-1).mean() > 0.95, "layer 0 head 0 must attend to the previous token"
    with_circuit = _repeat_accuracy(model, sequences)
    without = _repeat_accuracy(build_tiny_model(replace(cfg, tiny_copy_circuit=False), tokenizer, seed=3), sequences)
    assert with_circuit > 0.2 and without < 0.05, (with_circuit, without)
    # The circuit is ordinary Qwen2 weights: a saved model reloads with the same outputs.
    from transformers import Qwen2ForCausalLM

    model.save_pretrained(tmp_path)
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(sequences[:2]).logits, model(sequences[:2]).logits)
    assert reloaded.config.rope_parameters["rope_theta"] == cfg.tiny_rope_theta


def test_copy_circuit_continues_the_occurrence_whose_two_preceding_tokens_match(tokenizer):
    """As in "The founder of Vabi Company was" among several "... was X": the token before the current one picks X."""
    cfg = PRESET_SIZED
    generator = torch.Generator().manual_seed(1)
    pairs, trials, hits = 6, 48, 0
    model = build_tiny_model(cfg, tokenizer, seed=3)
    for trial in range(trials):
        ids = torch.randperm(len(tokenizer) - 10, generator=generator)[:2 * pairs + 1 + 5 * pairs] + 10
        subjects, objects, shared, filler = ids[:pairs], ids[pairs:2 * pairs], ids[2 * pairs], ids[2 * pairs + 1:]
        # `pairs` facts "subject shared object filler..." that all share the middle token, then "subject_j shared"
        context = [token for i in range(pairs)
                   for token in (subjects[i], shared, objects[i], *filler[5 * i:5 * i + 5])]
        asked = trial % pairs
        with torch.no_grad():
            logits = model(torch.tensor([[*context, subjects[asked], shared]])).logits[0, -1]  # (V,)
        hits += int(logits.argmax() == objects[asked])
    assert hits / trials > 0.2, hits / trials  # 0.27 measured; matching the current token alone: 0.08


def test_copy_circuit_needs_two_layers_and_two_heads():
    with pytest.raises(ValueError, match="tiny_copy_circuit needs tiny_num_layers >= 2"):
        ModelConfig(tiny_num_layers=1)
    with pytest.raises(ValueError, match="tiny_copy_circuit needs tiny_num_heads >= 2"):
        ModelConfig(tiny_num_heads=1, tiny_num_kv_heads=1)
    with pytest.raises(ValueError, match="head size"):
        ModelConfig(tiny_hidden_size=4, tiny_num_heads=2, tiny_num_kv_heads=1)
