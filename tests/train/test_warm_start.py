"""Warm-start rendering (gold trajectories exactly as the agent loop lays them out; information tokens carry no
loss), and a few supervised steps lower the loss."""
from __future__ import annotations

import pytest

from stepsearch.config import ModelConfig, RolloutConfig
from stepsearch.data.records import QARecord, SupportDoc
from stepsearch.models.tiny import build_tiny_model
from stepsearch.models.tokenizer import train_tokenizer
from stepsearch.retrieval.base import Document
from stepsearch.rollout.agent_loop import run_agent_loop
from stepsearch.rollout.types import Generation
from stepsearch.trainer.warm_start import (
    DETOURS,
    evidence_sentence,
    gold_turns,
    render_gold_examples,
    supervised_warm_start,
)

RECORD = QARecord(
    id="q0", question="Where was the father of Mibe Tusos born?", answers=["Dazin"],
    sub_questions=["Who is the father of Mibe Tusos?", "Where was Vogul Tusos born?"],
    search_keys=[["father of Mibe Tusos"], ["Vogul Tusos born city"]],
    support_docs=[SupportDoc("Mibe Tusos", "The father of Mibe Tusos was Vogul Tusos."),
                  SupportDoc("Vogul Tusos", "Vogul Tusos was born in the city of Dazin.")],
    hops=2, metadata={"sub_answers": ["Vogul Tusos", "Dazin"]},
)


class FixedRetriever:
    def search(self, queries, topk):
        return [[Document(id=f"d{i}", title="Vogul Tusos", text=f"Vogul Tusos was born in Dazin ({q}).", score=1.0)
                 for i in range(topk)] for q in queries]


class SupportRetriever:
    """Returns the first hop's support passage (searching the question finds it) or the second hop's."""

    def __init__(self, finds_first_hop):
        self.finds_first_hop = finds_first_hop

    def search(self, queries, topk):
        doc = RECORD.support_docs[0] if self.finds_first_hop else RECORD.support_docs[1]
        return [[Document(id="d0", title=doc.title, text=doc.text, score=1.0)] for _ in queries]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [RECORD.question, *gold_turns(RECORD)[0], "Vogul Tusos was born in Dazin. Doc Title"] * 20
    return train_tokenizer(texts, vocab_size=400, out_dir=tmp_path_factory.mktemp("tok"))


def test_gold_trajectory_is_rendered_as_the_agent_loop_would_with_information_unmasked(tokenizer):
    rollout = RolloutConfig(max_information_tokens=64)
    [(ids, mask)] = render_gold_examples([RECORD], tokenizer, FixedRetriever(), rollout, topk=2)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    ignored = tokenizer.decode([i for i, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert trained == ("<think> Who is the father of Mibe Tusos? </think>\n<search> father of Mibe Tusos </search>"
                       "<think> The father of Mibe Tusos was Vogul Tusos. Where was Vogul Tusos born? </think>\n"
                       "<search> Vogul Tusos born city </search>"
                       "<think> Vogul Tusos was born in the city of Dazin. </think>\n<answer> Dazin </answer>")
    assert ignored.count("\n<information>Doc 1(Title: Vogul Tusos)") == 2 and ignored.count("</information>\n") == 2
    assert ignored.startswith("Answer the given question.")  # the prompt carries no loss either


def test_supervised_warm_start_lowers_the_loss(tokenizer):
    model = build_tiny_model(ModelConfig(tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2,
                                         tiny_num_kv_heads=1, tiny_intermediate_size=48,
                                         tiny_copy_circuit=False), tokenizer)
    examples = render_gold_examples([RECORD], tokenizer, FixedRetriever(), RolloutConfig(), topk=1)
    losses = supervised_warm_start(model, examples, tokenizer.pad_token_id, steps=15, lr=1e-2, progress=False)
    assert len(losses) == 15 and losses[-1] < 0.5 * losses[0]


class GoldEngine:
    """An `Engine` that writes the record's gold turns: turn n is gold turn n, cut at `max_new_tokens`."""

    def __init__(self, tokenizer, turns=None):
        self.tokenizer = tokenizer
        turns = gold_turns(RECORD)[0] if turns is None else turns
        self.turns = [tokenizer.encode(turn, add_special_tokens=False) for turn in turns]

    def generate(self, prompts, *, max_new_tokens, stop_strings, temperature, top_p, seed=None):
        out = []
        for prompt in prompts:
            response = self.tokenizer.decode(prompt, skip_special_tokens=False).split(RECORD.question)[-1]
            ids = self.turns[response.count("<information>")]
            out.append(Generation(ids, [-0.5] * len(ids), "stop") if len(ids) <= max_new_tokens
                       else Generation(ids[:max_new_tokens], [-0.5] * max_new_tokens, "length"))
        return out


@pytest.mark.parametrize(("limits", "finish"), [
    ({"max_information_tokens": 64}, "answer"),
    ({"max_information_tokens": 12}, "answer"),  # bodies cut to the block budget
    ({"max_information_tokens": 64, "max_new_tokens_per_turn": 8}, "turn_budget"),  # a gold turn is too long
    ({"max_information_tokens": 64, "max_new_tokens_per_turn": 30, "max_response_tokens": 60}, "budget"),
    ({"max_information_tokens": 64, "max_turns": 1}, "answer"),  # the 2nd search gets the refusal notice
], ids=["fits", "short_blocks", "long_turn", "short_response", "one_search"])
def test_the_warm_start_lays_out_exactly_what_the_agent_loop_makes_of_the_gold_turns(tokenizer, limits, finish):
    rollout = RolloutConfig(samples_per_prompt=1, **limits)
    [(ids, mask)] = render_gold_examples([RECORD], tokenizer, FixedRetriever(), rollout, topk=2)
    batch = run_agent_loop(GoldEngine(tokenizer), FixedRetriever(), tokenizer, [RECORD], rollout, topk=2,
                           greedy=True)
    assert batch.finish_reasons[0] == finish
    prompt, length = batch.prompt_ids[0], int(batch.response_mask[0].sum())
    assert ids == prompt + batch.response_ids[0, :length].tolist()
    assert mask == [0] * len(prompt) + batch.loss_mask[0, :length].int().tolist()


def test_evidence_sentence_is_the_first_sentence_stating_the_answer():
    text = "Vogul Tusos was a baker. Vogul Tusos was born in the city of Dazin in 1801. Dazin is far."
    assert evidence_sentence(text, "dazin") == "Vogul Tusos was born in the city of Dazin in 1801."
    assert evidence_sentence(text, "Zorbi") == "" and evidence_sentence(text, " ") == ""


def test_each_detour_changes_the_demonstration_as_documented():
    import random

    plain_turns, plain_queries = gold_turns(RECORD)
    turns, queries = gold_turns(RECORD, random.Random(0), "question_query")
    assert queries == ["Where was the father of Mibe Tusos born", *plain_queries]
    assert turns[1].startswith("<think> Who is the father of Mibe Tusos? </think>")  # nothing learned yet
    turns, queries = gold_turns(RECORD, random.Random(0), "repeated_query")
    assert len(queries) == 3 and any(a == b for a, b in zip(queries, queries[1:]))
    turns, queries = gold_turns(RECORD, random.Random(0), "early_answer")
    assert queries == plain_queries[:1] and turns[-1].endswith("<answer> Vogul Tusos </answer>")
    with pytest.raises(ValueError, match="unknown warm-start detour"):
        gold_turns(RECORD, None, "shortcut")
    assert len(plain_turns) == 3 and set(DETOURS) == {"question_query", "repeated_query", "early_answer"}


def test_a_demonstration_refused_after_the_search_limit_repeats_its_last_search_and_then_answers():
    import random

    plain_turns, plain_queries = gold_turns(RECORD)
    turns, queries = gold_turns(RECORD, random.Random(0), refused_after=4)
    assert queries == [*plain_queries, *[plain_queries[-1]] * 3] and turns[-1] == plain_turns[-1]
    _, queries = gold_turns(RECORD, random.Random(0), "repeated_query", refused_after=4)
    assert len(queries) == 5  # a detour and the limit combine
    with pytest.raises(ValueError, match="refused_after must be >= 1"):
        gold_turns(RECORD, None, refused_after=0)


def test_limit_prob_lays_out_the_refusal_notice_as_the_agent_loop_does_and_leaves_other_draws_alone(tokenizer):
    import random

    from stepsearch.rollout.agent_loop import SEARCH_REFUSED_NOTICE

    rollout = RolloutConfig(samples_per_prompt=1, max_information_tokens=64, max_turns=3)
    [(ids, mask)] = render_gold_examples([RECORD], tokenizer, FixedRetriever(), rollout, topk=1, limit_prob=1.0)
    turns, _ = gold_turns(RECORD, random.Random(0), refused_after=3)
    batch = run_agent_loop(GoldEngine(tokenizer, turns), FixedRetriever(), tokenizer, [RECORD], rollout, topk=1,
                           greedy=True)
    prompt, length = batch.prompt_ids[0], int(batch.response_mask[0].sum())
    assert batch.finish_reasons[0] == "answer" and batch.num_searches[0] == 3  # the 4th search is refused
    assert ids == prompt + batch.response_ids[0, :length].tolist()
    assert mask == [0] * len(prompt) + batch.loss_mask[0, :length].int().tolist()
    after_notice = tokenizer.decode(ids, skip_special_tokens=False).split(SEARCH_REFUSED_NOTICE)
    assert len(after_notice) == 2 and after_notice[1].rstrip().endswith("<answer> Dazin </answer>")
    records = [RECORD] * 40
    mixed = render_gold_examples(records, tokenizer, FixedRetriever(), rollout, topk=1, seed=3, detour_prob=0.5)
    assert mixed == render_gold_examples(records, tokenizer, FixedRetriever(), rollout, topk=1, seed=3,
                                         detour_prob=0.5, limit_prob=0.0)
    limited = render_gold_examples(records, tokenizer, FixedRetriever(), rollout, topk=1, seed=3, detour_prob=0.5,
                                   limit_prob=0.5)
    assert 8 <= sum(SEARCH_REFUSED_NOTICE in tokenizer.decode(ids) for ids, _ in limited) <= 32


def test_a_bridge_answer_slip_searches_every_hop_and_answers_with_the_hop_before_the_last(tokenizer):
    import random

    plain_turns, plain_queries = gold_turns(RECORD)
    turns, queries = gold_turns(RECORD, random.Random(0), bridge_answer=True)
    assert queries == plain_queries and turns[:-1] == plain_turns[:-1]
    assert turns[-1] == plain_turns[-1].replace("<answer> Dazin </answer>", "<answer> Vogul Tusos </answer>")
    early, _ = gold_turns(RECORD, random.Random(0), "early_answer")
    assert gold_turns(RECORD, random.Random(0), "early_answer", bridge_answer=True)[0] == early
    records = [RECORD] * 40
    mixed = render_gold_examples(records, tokenizer, FixedRetriever(), RolloutConfig(), topk=1, seed=3, detour_prob=0.5)
    slipped = render_gold_examples(records, tokenizer, FixedRetriever(), RolloutConfig(), topk=1, seed=3,
                                   detour_prob=0.5, bridge_answer_prob=0.5)
    assert mixed == render_gold_examples(records, tokenizer, FixedRetriever(), RolloutConfig(), topk=1, seed=3,
                                         detour_prob=0.5, bridge_answer_prob=0.0)
    changed = [tokenizer.decode(b[0]) for a, b in zip(mixed, slipped) if a != b]
    assert 5 <= len(changed) <= 30 and all(text.rstrip().endswith("<answer> Vogul Tusos </answer>") for text in changed)


def test_demonstrations_cut_by_the_rollout_budgets_are_counted_in_a_warning(tokenizer, caplog):
    rollout = RolloutConfig(max_information_tokens=64, max_new_tokens_per_turn=8)
    with caplog.at_level("WARNING", logger="stepsearch.trainer"):
        render_gold_examples([RECORD, RECORD], tokenizer, FixedRetriever(), rollout, topk=1)
    assert "2 of 2 warm-start demonstrations do not fit the rollout budgets" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="stepsearch.trainer"):
        render_gold_examples([RECORD], tokenizer, FixedRetriever(), RolloutConfig(max_information_tokens=64), topk=1)
    assert "do not fit" not in caplog.text


def test_detour_prob_mixes_imperfect_demonstrations_in_reproducibly(tokenizer):
    records = [RECORD] * 40
    clean = render_gold_examples(records, tokenizer, FixedRetriever(), RolloutConfig(), topk=1, seed=3)
    mixed = render_gold_examples(records, tokenizer, FixedRetriever(), RolloutConfig(), topk=1, seed=3, detour_prob=0.5)
    assert mixed == render_gold_examples(records, tokenizer, FixedRetriever(), RolloutConfig(), topk=1, seed=3,
                                         detour_prob=0.5)
    changed = sum(a != b for a, b in zip(clean, mixed))
    assert 8 <= changed <= 32 and len(set(map(str, clean))) == 1


def test_reading_loss_trains_the_passages_but_reports_the_policy_loss(tokenizer):
    import torch

    def fresh():
        return build_tiny_model(ModelConfig(tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2,
                                            tiny_num_kv_heads=1, tiny_intermediate_size=48,
                                            tiny_copy_circuit=False), tokenizer, seed=1)

    examples = render_gold_examples([RECORD], tokenizer, FixedRetriever(), RolloutConfig(), topk=2)
    ids, mask = examples[0]
    passages = torch.tensor([ids])
    reading = torch.tensor([[not m for m in mask]])[:, 1:]

    def passage_loss(model):
        with torch.no_grad():
            logits = model(input_ids=passages).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits[reading], passages[:, 1:][reading]).item()

    policy_only, reading_too = fresh(), fresh()
    supervised_warm_start(policy_only, examples, tokenizer.pad_token_id, steps=20, lr=1e-2, progress=False)
    losses = supervised_warm_start(reading_too, examples, tokenizer.pad_token_id, steps=20, lr=1e-2,
                                   reading_weight=1.0, progress=False)
    assert passage_loss(reading_too) < 0.8 * passage_loss(policy_only)
    assert losses[-1] < 0.7 * losses[0]  # the policy part, which the reading loss does not hide


def test_question_first_demonstrations_search_the_question_when_it_finds_the_first_hop(tokenizer):
    import random

    turns, queries = gold_turns(RECORD, random.Random(0), question_first=True)
    assert queries == ["Where was the father of Mibe Tusos born", "Vogul Tusos born city"]
    assert turns[0] == ("<think> Where was the father of Mibe Tusos born? </think>\n"
                        "<search> Where was the father of Mibe Tusos born </search>")
    assert turns[1].startswith("<think> The father of Mibe Tusos was Vogul Tusos. Where was Vogul Tusos born?")
    short, short_queries = gold_turns(RECORD, random.Random(0), question_first=True, restate_question=False)
    assert short_queries == queries and short[1:] == turns[1:]
    assert short[0] == ("<think> I search the question. </think>\n"
                        "<search> Where was the father of Mibe Tusos born </search>")
    # the question_query detour still searches the question and then the first hop: its results go unused
    _, queries = gold_turns(RECORD, random.Random(0), "question_query", question_first=True)
    assert queries == ["Where was the father of Mibe Tusos born", "father of Mibe Tusos", "Vogul Tusos born city"]
    _, queries = gold_turns(RECORD, random.Random(0), "repeated_query", question_first=True)
    assert len(queries) == 3 and queries[0] == "Where was the father of Mibe Tusos born"
    assert any(a == b for a, b in zip(queries, queries[1:]))

    def first_query(retriever):
        [(ids, mask)] = render_gold_examples([RECORD], tokenizer, retriever, RolloutConfig(), topk=1,
                                             question_first=True)
        trained = tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
        return trained.split("<search>")[1].split("</search>")[0].strip()

    assert first_query(SupportRetriever(True)) == "Where was the father of Mibe Tusos born"
    [(ids, mask)] = render_gold_examples([RECORD], tokenizer, SupportRetriever(True), RolloutConfig(), topk=1,
                                         question_first=True, restate_question=False)
    assert tokenizer.decode(ids).count("Where was the father of Mibe Tusos born") == 2  # the prompt, the search
    assert first_query(SupportRetriever(False)) == "father of Mibe Tusos"  # the question misses: reference query


@pytest.mark.parametrize("limits", [{}, {"max_new_tokens_per_turn": 8}], ids=["fits", "long_turn"])
def test_first_turns_are_the_start_of_the_demonstrations_under_the_agent_loops_budgets(tokenizer, limits):
    from stepsearch.trainer.warm_start import _first_turn, render_first_turns

    rollout = RolloutConfig(max_information_tokens=64, **limits)
    [example] = render_gold_examples([RECORD], tokenizer, FixedRetriever(), rollout, topk=2)
    assert render_first_turns([RECORD], tokenizer, FixedRetriever(), rollout, topk=2) == [_first_turn(*example)]
    for restate in (True, False):  # question-first demonstrations, with and without the restated question
        options = {"topk": 1, "question_first": True, "restate_question": restate}
        [example] = render_gold_examples([RECORD], tokenizer, SupportRetriever(True), rollout, **options)
        assert render_first_turns([RECORD], tokenizer, SupportRetriever(True), rollout, **options) == [
            _first_turn(*example)]
    unusable = QARecord(id="q1", question="Who?", answers=["x"])  # no search keys: no gold trajectory
    assert render_first_turns([unusable], tokenizer, FixedRetriever(), rollout, topk=2) == []


def test_fresh_names_rename_the_whole_demonstration_after_searching_with_the_worlds_names(tokenizer):
    from stepsearch.data.synth import made_up_words

    class RecordingRetriever(FixedRetriever):
        queries: list[str] = []

        def search(self, queries, topk):
            self.queries += queries
            return super().search(queries, topk)

    retriever = RecordingRetriever()
    avoid = frozenset({"Mibe", "Tusos", "Vogul", "Dazin"})
    rollout = RolloutConfig(max_information_tokens=400)  # nothing cut: names differ in length
    [(ids, mask)] = render_gold_examples([RECORD], tokenizer, retriever, rollout, topk=2, fresh_names_avoiding=avoid)
    assert retriever.queries == ["father of Mibe Tusos", "Vogul Tusos born city"]  # the world's names find its passages
    text = tokenizer.decode(ids)
    response = tokenizer.decode(ids[mask.index(1):])  # the prompt template's own capitalised words stay
    assert made_up_words(response).isdisjoint(avoid) and len(made_up_words(response)) == 4
    [(plain_ids, plain_mask)] = render_gold_examples([RECORD], tokenizer, FixedRetriever(), rollout, topk=2)
    renamed = dict(zip(["Mibe", "Tusos", "Vogul", "Dazin"], sorted(made_up_words(response), key=text.index)))
    expected = tokenizer.decode(plain_ids)
    for old, new in renamed.items():
        expected = expected.replace(old, new)
    assert text == expected  # the same demonstration, one name for one name everywhere
    again = render_gold_examples([RECORD] * 2, tokenizer, FixedRetriever(), rollout, topk=2, fresh_names_avoiding=avoid)
    assert tokenizer.decode(again[0][0]) == text and tokenizer.decode(again[1][0]) != text  # seeded, one set each


def test_a_run_with_fresh_names_renames_its_demonstrations_away_from_every_name_of_the_world(
        tmp_path, toy_config, monkeypatch):
    import json

    from stepsearch.data.synth import made_up_words
    from stepsearch.trainer import warm_start
    from stepsearch.trainer.build import build_run

    avoided = []

    def recording(*args, fresh_names_avoiding=None, **kwargs):
        avoided.append(fresh_names_avoiding)
        return render_gold_examples(*args, fresh_names_avoiding=fresh_names_avoiding, **kwargs)

    monkeypatch.setattr(warm_start, "render_gold_examples", recording)
    run = build_run(toy_config(tmp_path, "data.synth_num_warm_start=12", "trainer.warm_start_steps=2",
                               "trainer.warm_start_fresh_names=true", "trainer.eval_max_questions=0",
                               "trainer.report=false", "deepspeed.enabled='off'"))
    assert len(json.loads((run.ctx.paths.warm_start / "losses.json").read_text())) == 2
    world_names = set()
    for line in (run.ctx.paths.world / "corpus.jsonl").read_text().splitlines():
        world_names |= made_up_words(json.loads(line)["contents"])
    assert avoided == [world_names] and len(world_names) > 50  # held-out names included


def test_checkpoint_selector_keeps_the_best_scoring_weights_from_half_way_on():
    import torch

    from stepsearch.trainer.warm_start import CheckpointSelector

    model = torch.nn.Linear(2, 1, bias=False)

    def run(scores):  # step n sets every weight to n; the selector sees each step
        selector = CheckpointSelector(model, lambda m: {"score": scores[step]}, every=2, steps=10)
        for step in range(1, 11):
            with torch.no_grad():
                model.weight.fill_(float(step))
            selector(step)
        return selector

    selector = run({6: 0.2, 8: 0.5, 10: 0.5})  # a tie with step 8 at the last step: the later one is kept
    assert [row["step"] for row in selector.history] == [6, 8, 10] and selector.best_step == 10
    assert model.training  # the training mode it found
    selector = run({6: 0.2, 8: 0.5, 10: 0.1})
    selector.restore()
    assert selector.best_step == 8 and model.weight.tolist() == [[8.0, 8.0]]
    with pytest.raises(ValueError, match="every must be >= 1"):
        CheckpointSelector(model, lambda m: {"score": 0.0}, every=0, steps=10)


def test_answer_score_counts_an_invalid_format_at_the_format_penalty(tokenizer):
    from stepsearch.config import RewardConfig
    from stepsearch.trainer.warm_start import answer_score

    model = build_tiny_model(ModelConfig(tiny_hidden_size=32, tiny_num_layers=1, tiny_num_heads=2,
                                         tiny_num_kv_heads=1, tiny_intermediate_size=48,
                                         tiny_copy_circuit=False), tokenizer)
    rollout = RolloutConfig(max_turns=1, max_new_tokens_per_turn=4, max_response_tokens=64)
    result = answer_score(model, tokenizer, FixedRetriever(), [RECORD, RECORD], rollout,
                          RewardConfig(format_penalty=-0.75), topk=1)
    # four random tokens never close an answer block
    assert result == {"score": -0.75, "f1": 0.0, "valid_format": 0.0}
