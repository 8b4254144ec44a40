"""The synthetic world: determinism, format, consistent facts, BM25-findable support docs, gold trajectories."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time

import pytest

from stepsearch.data.cli import main as data_main
from stepsearch.data.loaders import load_records
from stepsearch.data.records import QARecord, SupportDoc
from stepsearch.data.synth import (
    build_splits,
    build_world,
    gold_trajectory,
    load_or_create_world,
    write_world,
)
from stepsearch.retrieval.base import Document


def _rows(seed: int, num_train: int = 300, num_test: int = 40):
    world, train, test = build_world(seed, num_train, num_test)
    return world, [q.to_row(f"t{i}") for i, q in enumerate(train)], [q.to_row(f"e{i}") for i, q in enumerate(test)]


def test_same_seed_same_world_and_questions_other_seed_differs():
    world_a, train_a, test_a = _rows(7)
    world_b, train_b, test_b = _rows(7)
    assert world_a.corpus_rows() == world_b.corpus_rows()
    assert (train_a, test_a) == (train_b, test_b)
    world_c, train_c, _ = _rows(8)
    assert world_c.corpus_rows() != world_a.corpus_rows()
    assert [r["question"] for r in train_c] != [r["question"] for r in train_a]


def test_output_does_not_depend_on_the_process_hash_seed(tmp_path):
    script = ("import hashlib, sys; from stepsearch.data.synth import write_world; "
              "f = write_world(sys.argv[1], 9, 40, 5); "
              "print(hashlib.sha256(f.corpus.read_bytes() + f.train.read_bytes() + f.test.read_bytes()).hexdigest())")
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        run = subprocess.run([sys.executable, "-c", script, str(tmp_path / hash_seed)], env=env, check=True,
                             capture_output=True, text=True)
        digests.add(run.stdout.strip())
    files = write_world(tmp_path / "here", 9, 40, 5)
    digests.add(hashlib.sha256(files.corpus.read_bytes() + files.train.read_bytes() + files.test.read_bytes())
                .hexdigest())
    assert len(digests) == 1


def test_rows_have_stepsearch_fields_and_docs_equal_corpus_passages():
    world, train, test = _rows(0)
    passages = {(e.title, e.text) for e in world.entities}
    assert len({e.title for e in world.entities}) == len(world.entities)  # titles identify passages
    for row in train + test:
        assert {"id", "question", "final_answer", "answer_aliases", "sub_searchs", "sub_support_docs", "hops",
                "type"} <= set(row)
        assert row["hops"] == len(row["sub_searchs"]) == len(row["sub_support_docs"]) == len(row["sub_answers"])
        assert row["hops"] in (2, 3, 4)
        for doc, answer, queries in zip(row["sub_support_docs"], row["sub_answers"], row["sub_searchs"]):
            assert (doc["title"], doc["paragraph_text"]) in passages
            assert answer in doc["paragraph_text"]  # the passage states the hop's answer
            assert len(queries) >= 2 and all(q.strip() for q in queries)


def test_question_kinds_hops_and_chain_consistency():
    _, train, test = _rows(1, num_train=600)
    rows = train + test
    assert {r["type"] for r in rows} == {"compositional", "inference", "comparison", "bridge_comparison"}
    assert {r["hops"] for r in rows} == {2, 3, 4}
    for row in rows:
        if row["type"] in ("compositional", "inference"):
            assert row["sub_answers"][-1] == row["final_answer"]
            for answer, next_question in zip(row["sub_answers"], row["sub_questions"][1:]):
                assert answer in next_question  # each hop asks about the previous hop's answer
        else:
            assert row["final_answer"] in row["question"]  # comparisons answer with one of the two named items
            assert all(alias in row["question"] for alias in row["answer_aliases"])
    questions = [r["question"] for r in rows]
    assert len(set(questions)) == len(questions)
    assert not {r["question"] for r in train} & {r["question"] for r in test}


def test_comparison_answer_follows_the_years():
    _, train, _ = _rows(2, num_train=400)
    for row in (r for r in train if r["type"] == "comparison"):
        year_a, year_b = (int(a) for a in row["sub_answers"])
        earlier = "earlier" in row["question"] or "first" in row["question"]
        a_wins = (year_a < year_b) == earlier
        winner_doc = row["sub_support_docs"][0 if a_wins else 1]["paragraph_text"]
        assert winner_doc.startswith(row["final_answer"])


def _docs(world) -> list[Document]:
    return [Document(str(e.doc_id), e.title, e.text) for e in world.entities]


def test_every_reference_query_finds_its_support_doc_in_bm25_top3(tiny_bm25):
    world, train, test = _rows(3, num_train=200, num_test=20)
    retriever = tiny_bm25(_docs(world))
    queries, gold = [], []
    for row in train + test:
        for keys, doc in zip(row["sub_searchs"], row["sub_support_docs"]):
            queries += keys
            gold += [doc["title"]] * len(keys)
    results = retriever.search(queries, 3)
    misses = [(q, g) for q, g, docs in zip(queries, gold, results) if g not in [d.title for d in docs]]
    assert not misses, misses[:5]


def test_reference_queries_find_support_docs_with_the_project_bm25_index(tmp_path):
    pytest.importorskip("bm25s")
    from stepsearch.retrieval.index import build_index

    files = write_world(tmp_path / "world", seed=4, num_train=300, num_test=30)
    index = build_index(files.corpus, tmp_path / "index", method="bm25")
    records = load_records(files.train).records + load_records(files.test).records
    queries = [q for r in records for keys in r.search_keys for q in keys]
    gold = [d.title for r in records for keys, d in zip(r.search_keys, r.support_docs) for _ in keys]
    results = index.search(queries, 3)
    hits = sum(g in [d.title for d in docs] for g, docs in zip(gold, results))
    assert hits == len(queries)


def test_load_or_create_world_reuses_matching_files_and_regenerates_on_change(tmp_path):
    files = load_or_create_world(tmp_path, seed=5, num_train=50, num_test=10)
    meta = json.loads(files.meta.read_text())
    assert meta["seed"] == 5 and meta["num_train"] == 50 and meta["num_docs"] > 0
    files.train.write_text(files.train.read_text())  # same content, new mtime: reuse must not rewrite
    stamp = files.train.stat().st_mtime_ns
    assert load_or_create_world(tmp_path, seed=5, num_train=50, num_test=10).train.stat().st_mtime_ns == stamp
    again = load_or_create_world(tmp_path, seed=5, num_train=60, num_test=10)
    assert sum(1 for _ in open(again.train)) == 60
    assert sum(1 for _ in open(again.test)) == 10
    files.test.unlink()
    assert load_or_create_world(tmp_path, seed=5, num_train=60, num_test=10).test.exists()


def test_a_world_keeps_only_the_hop_counts_asked_for():
    every, filtered = build_splits(3, 60, 20, 30), build_splits(3, 60, 20, 30, hops=(4, 2, 3))
    assert every.world.corpus_rows() == filtered.world.corpus_rows()  # keeping every count changes nothing
    assert [[q.to_row("q") for q in split] for split in (every.train, every.test, every.warm_start)] == \
        [[q.to_row("q") for q in split] for split in (filtered.train, filtered.test, filtered.warm_start)]
    assert {len(q.hops) for q in every.train + every.test + every.warm_start} == {2, 3, 4}
    for hops in [(2,), (3, 4)]:
        splits = build_splits(3, 60, 20, 30, hops=hops)
        asked = splits.train + splits.test + splits.warm_start
        assert (len(splits.train), len(splits.test), len(splits.warm_start)) == (60, 20, 30)
        assert {len(q.hops) for q in asked} == set(hops)
        assert not {q.question for q in splits.train} & {q.question for q in splits.test}
    with pytest.raises(ValueError, match="non-empty subset of"):
        build_splits(3, 60, 20, hops=(1, 2))


def test_load_or_create_world_regenerates_when_the_hop_counts_change(tmp_path):
    files = load_or_create_world(tmp_path, seed=5, num_train=40, num_test=10)
    assert json.loads(files.meta.read_text())["question_hops"] == [2, 3, 4]
    meta = json.loads(files.meta.read_text())
    del meta["question_hops"]  # a world written before hop filtering kept every hop count: still reused
    files.meta.write_text(json.dumps(meta))
    stamp = files.train.stat().st_mtime_ns
    assert load_or_create_world(tmp_path, seed=5, num_train=40, num_test=10).train.stat().st_mtime_ns == stamp
    two_hop = load_or_create_world(tmp_path, seed=5, num_train=40, num_test=10, hops=[2])
    assert {r.hops for r in load_records(two_hop.train).records} == {2}
    assert json.loads(two_hop.meta.read_text())["question_hops"] == [2]


def test_written_files_load_as_records_with_gold_trajectories(tmp_path):
    files = write_world(tmp_path, seed=6, num_train=80, num_test=10)
    corpus = [json.loads(line) for line in open(files.corpus)]
    assert all(set(row) == {"id", "contents"} and row["contents"].startswith('"') for row in corpus)
    records = load_records(files.train).records
    assert len(records) == 80 and all(r.source == "synth" for r in records)
    record = records[0]
    trajectory = gold_trajectory(record)
    assert len(trajectory.steps) == record.hops
    assert trajectory.final_answer == record.answers[0]
    for step, keys, doc, answer in zip(trajectory.steps, record.search_keys, record.support_docs,
                                       record.metadata["sub_answers"]):
        assert step.query == keys[0] and step.doc == doc and step.answer == answer and step.sub_question
    picked = {gold_trajectory(record, random.Random(s)).steps[0].query for s in range(20)}
    assert picked == set(record.search_keys[0])


def test_gold_trajectory_needs_one_support_doc_per_sub_question():
    record = QARecord(id="q", question="Who?", answers=["A"], search_keys=[["a"], ["b"]],
                      support_docs=[SupportDoc("T", "text")])
    with pytest.raises(ValueError, match="'q'.*2 search-key lists, 1 docs"):
        gold_trajectory(record)
    with pytest.raises(ValueError, match="no reference query"):
        gold_trajectory(QARecord(id="q", question="Who?", answers=["A"], search_keys=[[]],
                                 support_docs=[SupportDoc("T", "text")]))


def test_scales_to_tens_of_thousands_of_questions_quickly():
    start = time.perf_counter()
    world, train, test = build_world(0, 20000, 100)
    assert len(train) == 20000 and len(test) == 100
    assert time.perf_counter() - start < 20  # ~1.5 s alone; generous for a shared 2-core machine


def test_cli_synth_writes_the_world(tmp_path, capsys):
    assert data_main(["synth", "--out", str(tmp_path), "--seed", "2", "--num-train", "30", "--num-test", "5"]) == 0
    assert "30 train / 5 test" in capsys.readouterr().out
    assert sum(1 for _ in open(tmp_path / "train.jsonl")) == 30
    assert data_main(["synth", "--out", str(tmp_path), "--num-train", "0"]) == 1
    assert "must be positive" in capsys.readouterr().err


def test_warm_start_questions_share_no_entity_with_train_or_test_and_leave_them_unchanged(tmp_path):
    from stepsearch.data.synth import build_splits

    splits = build_splits(3, 150, 30, 200)
    assert len(splits.warm_start) == 200
    plain_world, plain_train, plain_test = build_world(3, 150, 30)
    assert [q.question for q in splits.train] == [q.question for q in plain_train]
    assert [q.question for q in splits.test] == [q.question for q in plain_test]

    def entities(questions):
        return {hop.support.doc_id for q in questions for hop in q.hops} | {
            hop.support.name for q in questions for hop in q.hops} | {q.answer for q in questions}

    main_names = {e.name for e in plain_world.entities}
    warm_entities = entities(splits.warm_start)
    assert not ({n for n in warm_entities if isinstance(n, str)} & main_names)
    assert all(doc_id >= len(plain_world.entities) for doc_id in warm_entities if isinstance(doc_id, int))
    # one corpus holds both regions, with unique passage ids
    ids = [e.doc_id for e in splits.world.entities]
    assert len(ids) == len(set(ids)) and len(ids) > len(plain_world.entities)
    files = write_world(tmp_path, 3, 150, 30, num_warm_start=200)
    rows = [json.loads(line) for line in files.warm_start.read_text().splitlines()]
    assert len(rows) == 200 and all(row["id"].startswith("synth3-warm-") for row in rows)
    assert json.loads(files.meta.read_text())["num_warm_start"] == 200


def test_fresh_names_rename_every_made_up_word_consistently_and_avoid_the_worlds_names():
    from stepsearch.data.synth import FreshNames, made_up_words

    world, train, test = build_world(3, 200, 20)
    passages = [row["contents"] for row in world.corpus_rows()]
    text = ("Zovia is a country whose capital city is Gazusur. The official language of Zovia is Zovish. "
            "Fumil Kipifu worked at Kipifu Museum, by the River Tower, in 1943.")
    avoid = frozenset().union(*(made_up_words(text) for text in [*passages, text]))  # all of the world's names
    assert {"River", "The", "Doc", "Museum"}.isdisjoint(avoid)
    rename = FreshNames(random.Random(0), avoid)
    renamed = rename(text)
    words = made_up_words(text)
    fresh = made_up_words(renamed)
    assert len(fresh) == len(words) and fresh.isdisjoint(avoid)
    assert rename(text) == renamed  # one renaming for every text of a demonstration
    assert renamed.count(rename("Kipifu")) == 2 and "River Tower" in renamed and "in 1943." in renamed
    country, language = rename("Zovia"), rename("Zovish")
    assert country.endswith("ia") and language == country[:-2] + "ish"
    assert FreshNames(random.Random(1), avoid)(text) == FreshNames(random.Random(1), avoid)(text)


def test_name_piece_pattern_spells_names_by_syllable_and_keeps_lower_case_words_whole():
    from tokenizers import Regex, pre_tokenizers

    from stepsearch.data.synth import NAME_PIECE_PATTERN

    split = pre_tokenizers.Sequence([pre_tokenizers.ByteLevel(add_prefix_space=False),
                                     pre_tokenizers.Split(Regex(NAME_PIECE_PATTERN), behavior="isolated")])
    pieces = [piece for piece, _ in split.pre_tokenize_str("the founder of Fumil Kipifu (poem) Zovia")]
    assert pieces == ["the", "Ġfounder", "Ġof", "ĠFu", "mil", "ĠKi", "pi", "fu", "Ġ(", "poem", ")", "ĠZo", "via"]
