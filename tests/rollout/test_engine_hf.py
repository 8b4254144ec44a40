"""HFEngine against full forward passes of the same tiny model: greedy is argmax, log-probs are the tempered
log-softmax of the sampled tokens, stop strings cut each row at the token completing them, seeds reproduce."""
from __future__ import annotations

import pytest
import torch

from stepsearch.config import ModelConfig, RolloutConfig
from stepsearch.models.tiny import build_tiny_model
from stepsearch.models.tokenizer import train_tokenizer
from stepsearch.rollout.engine import EngineError, HFEngine, SGLangEngine, StopScanner, make_engine

TEXTS = [f"Paris is the capital of country {i}. <search>capital {i}</search> <answer>Paris</answer>" for i in range(80)]


@pytest.fixture(scope="module")
def setup():
    tokenizer = train_tokenizer(TEXTS, vocab_size=400)
    cfg = ModelConfig(tiny_hidden_size=64, tiny_num_layers=2, tiny_num_heads=4, tiny_num_kv_heads=2,
                      tiny_intermediate_size=128)
    model = build_tiny_model(cfg, tokenizer, seed=0)
    model.generation_config.top_k = 2  # a checkpoint's sampling defaults must not leak into the engine
    prompts = [tokenizer.encode(text, add_special_tokens=False)
               for text in ("Paris is", "The capital of country 12 is", "x")]
    return tokenizer, model, HFEngine(model, tokenizer, "cpu"), prompts


def _reference_logp(model, prompt, continuation, temperature):
    logits = model(torch.tensor([prompt + continuation])).logits[0, len(prompt) - 1:-1].float()  # (n, V)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, torch.tensor(continuation)[:, None])[:, 0], logits


@torch.no_grad()
def test_greedy_is_argmax_of_full_forward_with_left_padding(setup):
    tokenizer, model, engine, prompts = setup
    generations = engine.generate(prompts, max_new_tokens=12, stop_strings=[], temperature=0.0, top_p=1.0)
    for prompt, generation in zip(prompts, generations):
        assert generation.finish_reason == "length" and len(generation.token_ids) == 12
        reference, logits = _reference_logp(model, prompt, generation.token_ids, 1.0)
        assert logits.argmax(-1).tolist() == generation.token_ids
        torch.testing.assert_close(torch.tensor(generation.logprobs), reference, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_sampled_logprobs_are_tempered_and_seeds_reproduce(setup):
    tokenizer, model, engine, prompts = setup
    kwargs = dict(max_new_tokens=16, stop_strings=[], temperature=0.7, top_p=1.0)
    first = engine.generate(prompts, seed=3, **kwargs)
    again = engine.generate(prompts, seed=3, **kwargs)
    other = engine.generate(prompts, seed=4, **kwargs)
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    assert [g.token_ids for g in first] != [g.token_ids for g in other]
    for prompt, generation in zip(prompts, first):
        reference, logits = _reference_logp(model, prompt, generation.token_ids, 0.7)
        torch.testing.assert_close(torch.tensor(generation.logprobs), reference, rtol=1e-4, atol=1e-4)
    # top_k=2 in the model's generation_config was ignored: some sampled token is outside the top 2
    ranks = [(logits_row > logits_row[token]).sum().item()
             for prompt, g in zip(prompts, first)
             for logits_row, token in zip(_reference_logp(model, prompt, g.token_ids, 0.7)[1], g.token_ids)]
    assert max(ranks) >= 2


@torch.no_grad()
def test_top_p_restricts_sampling_to_the_nucleus(setup):
    tokenizer, model, engine, prompts = setup
    generations = engine.generate(prompts, max_new_tokens=10, stop_strings=[], temperature=1.0, top_p=0.05, seed=0)
    for prompt, generation in zip(prompts, generations):
        _, logits = _reference_logp(model, prompt, generation.token_ids, 1.0)
        probs = torch.softmax(logits, -1)
        for row, token in zip(probs, generation.token_ids):
            mass_before = row[row > row[token]].sum().item()
            assert mass_before < 0.05 + 1e-6


@torch.no_grad()
def test_stop_string_cuts_each_row_at_the_completing_token(setup):
    tokenizer, model, engine, prompts = setup
    free = engine.generate(prompts, max_new_tokens=12, stop_strings=[], temperature=0.0, top_p=1.0)
    # a stop string made of the text of tokens 3..4 of row 0's greedy continuation
    stop = tokenizer.decode(free[0].token_ids[3:5])
    assert stop
    stopped = engine.generate(prompts, max_new_tokens=12, stop_strings=[stop], temperature=0.0, top_p=1.0)
    for full, cut in zip(free, stopped):
        texts = [tokenizer.decode(full.token_ids[: n + 1]) for n in range(len(full.token_ids))]
        completing = next((n for n, text in enumerate(texts) if stop in text), None)
        if completing is None:
            assert cut.token_ids == full.token_ids and cut.finish_reason == "length"
        else:
            assert cut.token_ids == full.token_ids[: completing + 1] and cut.finish_reason == "stop"
            assert len(cut.logprobs) == len(cut.token_ids)
    assert stopped[0].finish_reason == "stop" and len(stopped[0].token_ids) <= 5


def test_stop_scanner_keeps_a_token_that_fuses_the_stop_with_more_text():
    texts = {1: "<sea", 2: "rch>q</", 3: "search>\n\nThe", 4: "x", 5: "\ufffd"}
    scanner = StopScanner(["</search>", "</answer>"], texts)
    assert scanner.first_stop([4, 1, 2, 3, 4]) == 3  # "search>\n\nThe" completes "</search>"; "\n\nThe" stays
    assert scanner.first_stop([1, 2, 4, 3]) is None  # "</x" + "search>" is not a stop
    assert scanner.first_stop([4, 5, 4]) is None
    assert scanner.first_stop([2, 3]) == 1
    assert StopScanner([], texts).first_stop([1, 2, 3]) is None


@torch.no_grad()
def test_eos_ends_a_row_and_other_rows_continue(setup):
    tokenizer, model, engine, prompts = setup
    free = engine.generate(prompts, max_new_tokens=8, stop_strings=[], temperature=0.0, top_p=1.0)
    eos_engine = HFEngine(model, tokenizer, "cpu")
    eos_engine.eos_ids = {free[1].token_ids[2]}  # pretend row 1's third token is the end of sequence
    generations = eos_engine.generate(prompts, max_new_tokens=8, stop_strings=[], temperature=0.0, top_p=1.0)
    first_eos = free[1].token_ids.index(free[1].token_ids[2])
    assert generations[1].finish_reason == "eos" and generations[1].token_ids == free[1].token_ids[: first_eos + 1]
    for full, generation in zip(free, generations):
        eos_at = next((i for i, t in enumerate(full.token_ids) if t in eos_engine.eos_ids), None)
        assert generation.token_ids == (full.token_ids if eos_at is None else full.token_ids[: eos_at + 1])


def test_update_weights_copies_into_the_wrapped_model_and_restores_train_mode(setup):
    tokenizer, model, engine, prompts = setup
    cfg = ModelConfig(tiny_hidden_size=64, tiny_num_layers=2, tiny_num_heads=4, tiny_num_kv_heads=2,
                      tiny_intermediate_size=128)
    copy = build_tiny_model(cfg, tokenizer, seed=0)
    copy_engine = HFEngine(copy, tokenizer, "cpu")
    new_weights = build_tiny_model(cfg, tokenizer, seed=9).state_dict()
    copy_engine.update_weights({f"module.{k}": v for k, v in new_weights.items()})
    assert all(torch.equal(copy.state_dict()[k], v) for k, v in new_weights.items())
    copy_engine.update_weights(copy.state_dict())  # own tensors: a no-op, not an error
    with pytest.raises(EngineError, match="no parameter named 'nope'"):
        copy_engine.update_weights({"nope": torch.zeros(1)})
    copy.train()
    copy_engine.generate(prompts[:1], max_new_tokens=2, stop_strings=[], temperature=0.0, top_p=1.0)
    assert copy.training


def test_bad_requests_and_missing_sglang_give_clear_errors(setup):
    tokenizer, model, engine, prompts = setup
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate([[]], max_new_tokens=2, stop_strings=[], temperature=0.0, top_p=1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(prompts, max_new_tokens=0, stop_strings=[], temperature=0.0, top_p=1.0)
    assert isinstance(make_engine(RolloutConfig(), model, tokenizer, "cpu"), HFEngine)
    with pytest.raises(EngineError, match="model directory"):
        make_engine(RolloutConfig(engine="sglang"), model, tokenizer, "cpu")
    try:
        import sglang  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError, match="needs SGLang"):
            SGLangEngine(tokenizer, model_path="/nonexistent")
    with pytest.raises(EngineError, match="exactly one"):
        SGLangEngine(tokenizer)
