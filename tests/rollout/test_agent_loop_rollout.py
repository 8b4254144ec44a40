"""The agent loop on a real BM25 retriever (in-process and over loopback HTTP) with a scripted engine whose turns are
fixed texts (to pin each outcome exactly) and the real HFEngine on the tiny model (a model that never closes a tag)."""
from __future__ import annotations

import re
import threading
import time

import pytest
import torch

from stepsearch.config import ModelConfig, RolloutConfig
from stepsearch.data.records import QARecord
from stepsearch.models.tiny import build_tiny_model
from stepsearch.models.tokenizer import train_tokenizer
from stepsearch.retrieval.base import Document, RetrieverError
from stepsearch.retrieval.corpus import write_corpus
from stepsearch.retrieval.index import build_index
from stepsearch.retrieval.local import LocalRetriever
from stepsearch.rollout.agent_loop import EMPTY_QUERY_NOTICE, SEARCH_REFUSED_NOTICE, run_agent_loop
from stepsearch.rollout.engine import HFEngine, StopScanner, TokenTexts
from stepsearch.rollout.prompts import build_prompt_ids, build_prompt_text
from stepsearch.rollout.render import INFORMATION_PREFIX, INFORMATION_SUFFIX, format_documents
from stepsearch.rollout.types import Generation

CORPUS = [
    Document("d0", "Alder River", "The Alder River rises in Brennick and flows into Lake Osk."),
    Document("d1", "Brennick", "Brennick is a town founded by Mara Vell in 1802."),
    Document("d2", "Mara Vell", "Mara Vell was a surveyor born in Tolland."),
    Document("d3", "Lake Osk", "Lake Osk is the deepest lake of the Varn valley."),
    Document("d4", "Tolland", "Tolland is a port city on the northern coast."),
]
Q_TWO_HOP = "Who founded the town where the Alder River rises?"
Q_EMPTY = "Which lake does the Alder River flow into?"
Q_LOOP = "Where was the founder of Brennick born?"
SCRIPTS = {
    Q_TWO_HOP: ["<think>find the source</think>\n<search>Alder River rises</search>",
                "<think>now the founder</think>\n<search>Brennick founded by</search>",
                "<think>done</think>\n<answer>Mara Vell</answer>"],
    Q_EMPTY: ["<search>   </search>", "<answer>Lake Osk</answer>"],
    Q_LOOP: ["<search>Brennick founder</search>"] * 10,
}


class ScriptedEngine:
    """An `Engine` whose turn n for a question is SCRIPTS[question][n], tokenized and cut by the real stop rule and
    max_new_tokens; records every call so tests can check batching and sampling parameters."""

    def __init__(self, tokenizer, scripts):
        self.tokenizer, self.scripts, self.calls = tokenizer, scripts, []
        self.texts = TokenTexts(tokenizer)

    def generate(self, prompts, *, max_new_tokens, stop_strings, temperature, top_p, seed=None):
        self.calls.append(dict(batch=len(prompts), max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))
        out = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt, skip_special_tokens=False)
            question = re.search(r"Question: (.*)\n", text).group(1)
            turn = text.split("Question: ")[-1].count("<information>")  # the instruction mentions the tags too
            ids = self.tokenizer.encode(self.scripts[question][turn], add_special_tokens=False)
            stop = StopScanner(stop_strings, self.texts).first_stop(ids)
            if stop is not None and stop < max_new_tokens:
                ids, reason = ids[:stop + 1], "stop"
            elif len(ids) > max_new_tokens:
                ids, reason = ids[:max_new_tokens], "length"
            else:
                reason = "eos"
            out.append(Generation(ids, [-0.5] * len(ids), reason))
        return out


class CountingRetriever:
    """The real retriever, counting calls (to check one batched search per turn) or failing on demand."""

    def __init__(self, inner, fail=False):
        self.inner, self.fail, self.calls = inner, fail, []

    def search(self, queries, topk):
        self.calls.append(list(queries))
        if self.fail:
            raise ConnectionError("connection refused")
        return self.inner.search(queries, topk)


def _record(question, answer="x"):
    return QARecord(id=question[:10], question=question, answers=[answer])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    write_corpus(root / "corpus.jsonl", CORPUS)
    index = build_index(root / "corpus.jsonl", root / "index", "bm25")
    texts = [d.text for d in CORPUS] + [s for script in SCRIPTS.values() for s in script] + [
        build_prompt_text(_NoChat(), q, "paper") for q in SCRIPTS] + [format_documents(CORPUS)] * 3
    tokenizer = train_tokenizer(texts * 3, vocab_size=600)
    return tokenizer, LocalRetriever(index), index


class _NoChat:
    chat_template = None


def _cfg(**overrides):
    values = dict(max_turns=3, max_new_tokens_per_turn=64, max_information_tokens=200, max_response_tokens=1024)
    values.update(overrides)
    return RolloutConfig(**values)


def _block_ranges(loss_mask_row, length):
    """(start, end) spans of loss-mask-0 tokens inside the real response."""
    spans, start = [], None
    for t in range(length):
        if loss_mask_row[t] == 0 and start is None:
            start = t
        if loss_mask_row[t] == 1 and start is not None:
            spans.append((start, t))
            start = None
    if start is not None:
        spans.append((start, length))
    return spans


def test_two_hop_trajectory_ids_masks_step_ends_and_documents(world):
    tokenizer, retriever, _ = world
    engine, counting = ScriptedEngine(tokenizer, SCRIPTS), CountingRetriever(retriever)
    batch = run_agent_loop(engine, counting, tokenizer, [_record(Q_TWO_HOP, "Mara Vell")], _cfg(), topk=2,
                           greedy=True)
    assert batch.finish_reasons == ["answer"] and batch.num_searches == [2] and batch.record_indices == [0]
    assert batch.queries == [["Alder River rises", "Brennick founded by"]]
    assert batch.retrieved[0] == retriever.search(["Alder River rises", "Brennick founded by"], 2)
    assert all(call["temperature"] == 0.0 for call in engine.calls)
    assert counting.calls == [["Alder River rises"], ["Brennick founded by"]]

    length = int(batch.response_mask[0].sum())
    ids = batch.response_ids[0, :length].tolist()
    assert batch.prompt_ids[0] == build_prompt_ids(tokenizer, Q_TWO_HOP, "paper")
    # generated turns and inserted blocks, each tokenized on its own, in order
    expected = []
    for turn, docs in zip(SCRIPTS[Q_TWO_HOP], batch.retrieved[0] + [None]):
        expected += tokenizer.encode(turn, add_special_tokens=False)
        if docs is not None:
            expected += [*tokenizer.encode(INFORMATION_PREFIX, add_special_tokens=False),
                         *tokenizer.encode(format_documents(docs), add_special_tokens=False),
                         *tokenizer.encode(INFORMATION_SUFFIX, add_special_tokens=False)]
    assert ids == expected
    assert batch.response_texts[0] == tokenizer.decode(ids, skip_special_tokens=True)
    assert batch.response_texts[0].endswith("<answer>Mara Vell</answer>")

    spans = _block_ranges(batch.loss_mask[0].tolist(), length)
    assert len(spans) == 2
    assert batch.inserted_spans[0] == spans  # the segmenter's loss mask is 0 exactly on the inserted blocks
    assert batch.answers == ["Mara Vell"] and batch.valid_format == [True]
    for (start, end), step_end in zip(spans, batch.step_ends[0].tolist()):
        assert step_end == start - 1
        assert tokenizer.decode(ids[: step_end + 1]).endswith("</search>")
        block = tokenizer.decode(ids[start:end])
        assert block.startswith("\n<information>Doc 1(Title: ") and block.endswith("</information>\n")
    assert batch.loss_mask[0, length:].sum() == 0 and batch.response_mask[0, length:].sum() == 0
    assert (batch.response_ids[0, length:] == tokenizer.pad_token_id).all()
    logp = batch.rollout_logp[0]
    assert torch.equal(logp != 0, batch.loss_mask[0] == 1)
    assert batch.rollout_logp.dtype == torch.float32 and batch.loss_mask.dtype == torch.float32
    assert set(batch.timings) >= {"generate_s", "retrieve_s", "bookkeeping_s"}


def test_batched_turns_empty_query_notice_and_search_limit(world):
    tokenizer, retriever, _ = world
    engine, counting = ScriptedEngine(tokenizer, SCRIPTS), CountingRetriever(retriever)
    records = [_record(Q_TWO_HOP), _record(Q_EMPTY), _record(Q_LOOP)]
    batch = run_agent_loop(engine, counting, tokenizer, records, _cfg(max_turns=2), topk=2, samples_per_prompt=2,
                           seed=5)
    assert batch.record_indices == [0, 0, 1, 1, 2, 2]
    # one batched retrieval per turn, holding every non-empty query of that turn
    assert counting.calls[0] == ["Alder River rises"] * 2 + ["Brennick founder"] * 2
    assert len(counting.calls) == 2
    assert len({call["seed"] for call in engine.calls}) == len(engine.calls)
    # empty query: a notice step, nothing retrieved
    assert batch.finish_reasons[2] == "answer" and batch.num_searches[2] == 0
    assert batch.queries[2] == [""] and batch.retrieved[2] == [[]]
    assert EMPTY_QUERY_NOTICE in batch.response_texts[2]
    # search limit: max_turns searches, one refused with a notice, then the next search ends the trajectory
    assert batch.finish_reasons[4] == "search_limit"
    assert batch.num_searches[4] == 2 and len(batch.queries[4]) == 3 and batch.retrieved[4][2] == []
    assert (batch.step_ends[4] >= 0).sum() == 3 and batch.step_ends.shape == (6, 3)
    assert SEARCH_REFUSED_NOTICE in batch.response_texts[4]
    assert batch.response_texts[4].endswith("<search>Brennick founder</search>")
    assert (batch.step_ends[2] >= 0).sum() == 1 and (batch.step_ends[2, 1:] == -1).all()


def test_huge_query_is_cut_and_information_is_truncated_to_its_budget(world):
    tokenizer, retriever, _ = world
    question = "What is Lake Osk?"
    huge = "Lake Osk " + "deepest " * 400
    scripts = {question: [f"<search>{huge}</search>", "<answer>a lake</answer>"]}
    counting = CountingRetriever(retriever)
    batch = run_agent_loop(ScriptedEngine(tokenizer, scripts), counting, tokenizer, [_record(question)],
                           _cfg(max_new_tokens_per_turn=2000, max_information_tokens=24, max_response_tokens=4096),
                           topk=3, max_query_chars=100)
    # The retriever gets the first 100 characters; the step's query is what the model emitted (the segmenter's).
    assert counting.calls[0] == [huge.strip()[:100].strip()] and batch.queries[0][0] == huge.strip()
    (start, end), = _block_ranges(batch.loss_mask[0].tolist(), int(batch.response_mask[0].sum()))
    assert end - start == 24
    block = tokenizer.decode(batch.response_ids[0, start:end].tolist())
    assert block.startswith("\n<information>Doc 1") and block.endswith("</information>\n")
    assert batch.finish_reasons == ["answer"]


def test_total_budget_ends_the_trajectory_when_no_block_fits(world):
    tokenizer, retriever, _ = world
    first_turn = len(tokenizer.encode(SCRIPTS[Q_TWO_HOP][0], add_special_tokens=False))
    batch = run_agent_loop(ScriptedEngine(tokenizer, SCRIPTS), retriever, tokenizer, [_record(Q_TWO_HOP)],
                           _cfg(max_new_tokens_per_turn=first_turn, max_response_tokens=first_turn + 3), topk=2)
    assert batch.finish_reasons == ["budget"] and batch.step_ends.shape == (1, 0) and batch.num_searches == [0]
    assert int(batch.response_mask.sum()) == first_turn and batch.loss_mask.sum() == first_turn


def test_retriever_error_raises_a_clear_retriever_error(world):
    tokenizer, retriever, _ = world
    with pytest.raises(RetrieverError, match=r"rollout turn 0 for 1 queries \('Alder River rises'\).*refused"):
        run_agent_loop(ScriptedEngine(tokenizer, SCRIPTS), CountingRetriever(retriever, fail=True), tokenizer,
                       [_record(Q_TWO_HOP)], _cfg(), topk=2)


def test_model_that_never_closes_a_tag_ends_at_the_turn_budget(world):
    tokenizer, retriever, _ = world
    model = build_tiny_model(ModelConfig(tiny_hidden_size=64, tiny_num_layers=1, tiny_num_heads=4,
                                         tiny_num_kv_heads=2, tiny_intermediate_size=96,
                                         tiny_copy_circuit=False), tokenizer)
    engine = HFEngine(model, tokenizer, "cpu")
    engine.eos_ids = set()  # a random model may emit EOS by chance; this test is about never closing a tag
    records = [_record(Q_TWO_HOP), _record(Q_EMPTY)]
    batch = run_agent_loop(engine, retriever, tokenizer, records, _cfg(max_new_tokens_per_turn=20), topk=2,
                           samples_per_prompt=2, seed=0)
    for row in range(4):
        if "</search>" in batch.response_texts[row] or "</answer>" in batch.response_texts[row]:
            continue  # closed a tag by chance: not the case under test
        assert batch.finish_reasons[row] == "turn_budget"
        assert int(batch.response_mask[row].sum()) == 20 and float(batch.loss_mask[row].sum()) == 20
    assert batch.finish_reasons.count("turn_budget") >= 3
    moved = batch.to("cpu")
    assert torch.equal(moved.response_ids, batch.response_ids) and moved.queries is batch.queries


def test_http_retriever_on_loopback_gives_the_same_rollout(world):
    from stepsearch.retrieval.client import HTTPRetriever
    from stepsearch.retrieval.server import start_server_in_thread

    tokenizer, retriever, index = world
    handle = start_server_in_thread(index, port=0)
    try:
        http = HTTPRetriever(handle.url, timeout_s=10, max_retries=1)
        over_http = run_agent_loop(ScriptedEngine(tokenizer, SCRIPTS), http, tokenizer, [_record(Q_TWO_HOP)],
                                   _cfg(), topk=2)
    finally:
        handle.stop()
    local = run_agent_loop(ScriptedEngine(tokenizer, SCRIPTS), retriever, tokenizer, [_record(Q_TWO_HOP)], _cfg(),
                           topk=2)
    assert torch.equal(over_http.response_ids, local.response_ids)
    ids = [[[d.id for d in docs] for docs in batch.retrieved[0]] for batch in (over_http, local)]
    assert ids[0] == ids[1]


def test_step_ends_and_loss_mask_agree_with_the_segmenter(world):
    segmenter = pytest.importorskip("stepsearch.rollout.segmenter")
    tokenizer, retriever, _ = world
    records = [_record(Q_TWO_HOP), _record(Q_EMPTY), _record(Q_LOOP)]
    batch = run_agent_loop(ScriptedEngine(tokenizer, SCRIPTS), retriever, tokenizer, records, _cfg(max_turns=2),
                           topk=2)
    table = segmenter.TagTable.from_tokenizer(tokenizer)
    for row in range(len(records)):
        length = int(batch.response_mask[row].sum())
        segmentation = segmenter.segment(batch.response_ids[row, :length].tolist(), table)
        assert list(segmentation.step_ends) == [s for s in batch.step_ends[row].tolist() if s >= 0]
        # The segmenter masks every token overlapping an <information> block; the loop knows provenance and also
        # masks the "\n" it inserts around the block. Everywhere else the two masks are identical.
        loop_mask = batch.loss_mask[row, :length].tolist()
        for index, (from_text, from_loop) in enumerate(zip(segmentation.loss_mask.tolist(), loop_mask)):
            if from_text != from_loop:
                assert (from_text, from_loop) == (1, 0.0)
                assert tokenizer.decode([int(batch.response_ids[row, index])]).strip() == ""


class _SlowEngine(ScriptedEngine):
    """ScriptedEngine with a latency per call, recording each call's [start, end) on the wall clock."""

    def __init__(self, tokenizer, scripts, seconds):
        super().__init__(tokenizer, scripts)
        self.seconds, self.intervals = seconds, []

    def generate(self, prompts, **kwargs):
        start = time.perf_counter()
        time.sleep(self.seconds)
        out = super().generate(prompts, **kwargs)
        self.intervals.append((start, time.perf_counter()))
        return out


class _SlowRetriever(CountingRetriever):
    def __init__(self, inner, seconds):
        super().__init__(inner)
        self.seconds, self.intervals = seconds, []

    def search(self, queries, topk):
        start = time.perf_counter()
        time.sleep(self.seconds)
        out = super().search(queries, topk)
        self.intervals.append((start, time.perf_counter()))
        return out


def _content(batch):
    return (batch.response_ids.tolist(), batch.loss_mask.tolist(), batch.step_ends.tolist(), batch.queries,
            batch.retrieved, batch.finish_reasons, batch.num_searches, batch.inserted_spans, batch.answers,
            batch.valid_format, batch.rollout_logp.tolist(), batch.record_indices)


def test_row_groups_give_the_same_trajectories_as_the_synchronous_loop(world):
    tokenizer, retriever, _ = world
    records = [_record(Q_TWO_HOP), _record(Q_EMPTY), _record(Q_LOOP)]
    synchronous = run_agent_loop(ScriptedEngine(tokenizer, SCRIPTS), retriever, tokenizer, records,
                                 _cfg(max_turns=2), topk=2, samples_per_prompt=2, greedy=True)
    for groups in (2, 3, 6, 50):
        grouped = run_agent_loop(ScriptedEngine(tokenizer, SCRIPTS), retriever, tokenizer, records,
                                 _cfg(max_turns=2), topk=2, samples_per_prompt=2, greedy=True, row_groups=groups)
        assert _content(grouped) == _content(synchronous), groups
    # the refusal after max_turns still holds per trajectory
    assert synchronous.finish_reasons[4] == "search_limit" and synchronous.num_searches[4] == 2


def test_row_groups_overlap_retrieval_with_generation_and_stay_reproducible(world):
    tokenizer, retriever, _ = world
    records = [_record(Q_TWO_HOP), _record(Q_LOOP)]
    runs = []
    for _ in range(2):
        engine, slow = _SlowEngine(tokenizer, SCRIPTS, 0.05), _SlowRetriever(retriever, 0.1)
        batch = run_agent_loop(engine, slow, tokenizer, records, _cfg(max_turns=2), topk=2, samples_per_prompt=2,
                               seed=3, row_groups=2)
        runs.append((batch, engine, slow))
    (first, engine, slow), (second, engine_again, _) = runs
    assert _content(first) == _content(second)
    assert sorted(call["seed"] for call in engine.calls) == sorted(call["seed"] for call in engine_again.calls)
    # group 0 = rows 0, 2 (both questions), group 1 = rows 1, 3: 2 queries per group in each of 2 turns, the groups'
    # searches merged into one call when they queue together
    assert sum(len(queries) for queries in slow.calls) == 8 and all(len(q) in (2, 4) for q in slow.calls)
    overlapping = [(g, r) for g in engine.intervals for r in slow.intervals if g[0] < r[1] and r[0] < g[1]]
    assert overlapping, "no generation ran while a retrieval was in flight"


def test_a_concurrent_engine_serves_the_row_groups_calls_at_once(world):
    tokenizer, retriever, _ = world
    records = [_record(Q_TWO_HOP), _record(Q_EMPTY), _record(Q_LOOP)]
    synchronous = run_agent_loop(ScriptedEngine(tokenizer, SCRIPTS), retriever, tokenizer, records,
                                 _cfg(max_turns=2), topk=2, samples_per_prompt=2, greedy=True)
    serial, concurrent = _SlowEngine(tokenizer, SCRIPTS, 0.05), _SlowEngine(tokenizer, SCRIPTS, 0.05)
    concurrent.concurrent_calls = True  # as SGLang, in-process or over HTTP
    for engine in (serial, concurrent):
        grouped = run_agent_loop(engine, retriever, tokenizer, records, _cfg(max_turns=2), topk=2,
                                 samples_per_prompt=2, greedy=True, row_groups=3)
        assert _content(grouped) == _content(synchronous)

    def overlaps(intervals):
        return sum(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(intervals) for b in intervals[i + 1:])

    assert overlaps(serial.intervals) == 0
    assert overlaps(concurrent.intervals) > 0


def test_row_group_threads_use_the_callers_cuda_device(world, monkeypatch):
    tokenizer, retriever, _ = world
    set_in = []  # (thread name, device) of each set_device call
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: set_in.append((threading.current_thread().name,
                                                                                  device)))
    run_agent_loop(ScriptedEngine(tokenizer, SCRIPTS), retriever, tokenizer, [_record(Q_TWO_HOP), _record(Q_LOOP)],
                   _cfg(max_turns=2), topk=2, samples_per_prompt=2, greedy=True, row_groups=2)
    assert len(set_in) == 2 and all(name.startswith("rollout-group") and device == 3 for name, device in set_in)


def test_row_groups_propagate_a_retriever_error_and_reject_zero_groups(world):
    tokenizer, retriever, _ = world
    records = [_record(Q_TWO_HOP), _record(Q_LOOP)]
    with pytest.raises(RetrieverError, match="retrieval failed in rollout turn 0"):
        run_agent_loop(ScriptedEngine(tokenizer, SCRIPTS), CountingRetriever(retriever, fail=True), tokenizer,
                       records, _cfg(), topk=2, row_groups=2)
    with pytest.raises(ValueError, match="row_groups must be >= 1, got 0"):
        run_agent_loop(ScriptedEngine(tokenizer, SCRIPTS), retriever, tokenizer, records, _cfg(), topk=2,
                       row_groups=0)
