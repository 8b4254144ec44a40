"""Loaders: every fixture format read field by field, auto-detection, bad rows named by file and line/index."""
from __future__ import annotations

import json

import pytest

from stepsearch.data.cli import main as data_main
from stepsearch.data.loaders import (
    DataFormatError,
    detect_format,
    load_records,
    musique_sub_question,
    to_stepsearch_row,
)
from stepsearch.data.records import SupportDoc

FIXTURE_FORMATS = {
    "stepsearch.jsonl": "stepsearch",
    "musique_ans.jsonl": "musique",
    "flashrag.jsonl": "flashrag",
    "hotpotqa_dev.json": "hotpotqa",
    "2wikimultihopqa_dev.json": "2wiki",
    "searchr1_nq_train.parquet": "searchr1",
    "searchr1_prompt_only.parquet": "searchr1",
}


@pytest.mark.parametrize("name", sorted(FIXTURE_FORMATS))
def test_auto_detection_equals_the_explicit_format(fixtures_dir, name):
    auto = load_records(fixtures_dir / name)
    explicit = load_records(fixtures_dir / name, format=FIXTURE_FORMATS[name])
    assert auto.records == explicit.records and auto.skipped == 0
    assert len(auto.records) >= 2


def test_stepsearch_rows(fixtures_dir):
    first, second = load_records(fixtures_dir / "stepsearch.jsonl").records
    assert first.id == "2hop__131818_161450"
    assert first.answers == ["Oakland, California", "Oakland"]
    assert first.search_keys[1] == ["Billie Joe Armstrong birthplace", "where was Billie Joe Armstrong born"]
    assert first.support_docs[0].title == "Green Day" and first.support_docs[0].text.startswith("Green Day is")
    assert first.hops == 2 and first.metadata["type"] == "2hop"
    assert second.answers == ["Cook County", "Cook County, Illinois"]  # `answer` instead of `final_answer`
    assert len(second.support_docs) == len(second.search_keys) == 3


def test_musique_decomposition_becomes_sub_questions_keys_and_support_docs(fixtures_dir):
    two_hop, three_hop = load_records(fixtures_dir / "musique_ans.jsonl").records
    assert two_hop.sub_questions == ["lead vocalist of Green Day", "Where was Billie Joe Armstrong born?"]
    assert two_hop.search_keys == [[q] for q in two_hop.sub_questions]
    assert [d.title for d in two_hop.support_docs] == ["Green Day", "Billie Joe Armstrong"]
    assert two_hop.metadata["sub_answers"] == ["Billie Joe Armstrong", "Oakland, California"]
    assert three_hop.sub_questions[1] == "place of birth of Ernest Hemingway"
    assert three_hop.sub_questions[2].endswith("of Oak Park, Illinois")
    assert three_hop.hops == 3 and three_hop.source == "musique"


def test_musique_sub_question_references():
    assert musique_sub_question("When was #2 founded by #1?", ["A", "B"]) == "When was B founded by A?"
    assert musique_sub_question("#1 >> spouse", ["Ann"]) == "spouse of Ann"
    assert musique_sub_question("Who wrote it?", []) == "Who wrote it?"
    with pytest.raises(ValueError, match="#3"):
        musique_sub_question("Who is #3?", ["A"])


def test_hotpotqa_and_2wiki_support_docs(fixtures_dir):
    comparison, bridge = load_records(fixtures_dir / "hotpotqa_dev.json").records
    assert comparison.id == "5a8b57f25542995d1e6f1371" and comparison.answers == ["yes"]
    assert [d.title for d in comparison.support_docs] == ["Scott Derrickson", "Ed Wood"]
    assert comparison.support_docs[0].text == ("Scott Derrickson (born July 16, 1966) is an American director, "
                                               "screenwriter and producer. He lives in Los Angeles, California.")
    assert [d.title for d in bridge.support_docs] == ["Kiss and Tell (1945 film)", "Shirley Temple"]  # deduped
    assert comparison.search_keys == [] and comparison.metadata == {"type": "comparison", "level": "hard"}

    wiki, _ = load_records(fixtures_dir / "2wikimultihopqa_dev.json").records
    assert wiki.search_keys == [["Polish-Russian War director"], ["Xawery Żuławski mother"]]
    assert [d.title for d in wiki.support_docs] == ["Polish-Russian War (film)", "Xawery Żuławski"]
    assert wiki.answers == ["Małgorzata Braunek"] and wiki.source == "2wiki"


def test_searchr1_parquet_question_and_targets(fixtures_dir):
    with_columns = load_records(fixtures_dir / "searchr1_nq_train.parquet").records
    assert with_columns[1].question == "big little lies season 2 how many episodes"
    assert with_columns[1].answers == ["seven", "7"] and with_columns[1].id == "train_1"
    prompt_only = load_records(fixtures_dir / "searchr1_prompt_only.parquet").records
    assert prompt_only[1].question == "Which magazine was started first Arthur's Magazine or First for Women?"
    assert prompt_only[1].id == "train_1" and prompt_only[1].source == "hotpotqa"
    assert prompt_only[1].metadata["extra_info"] == {"split": "train", "index": 1}


def test_flashrag_rows(fixtures_dir):
    records = load_records(fixtures_dir / "flashrag.jsonl").records
    assert [r.id for r in records] == ["dev_0", "dev_1", "dev_2"]
    assert records[1].answers == ["James Cameron", "James Francis Cameron"]
    assert records[0].metadata["type"] == "comparison"


def test_detect_format_rules():
    assert detect_format({"question_decomposition": []}) == "musique"
    assert detect_format({"evidences": [], "supporting_facts": [], "context": []}) == "2wiki"
    assert detect_format({"supporting_facts": [], "context": []}) == "hotpotqa"
    assert detect_format({"question": "q", "sub_searchs": []}) == "stepsearch"
    assert detect_format({"prompt": [], "reward_model": {}}) == "searchr1"
    assert detect_format({"question": "q", "golden_answers": []}) == "flashrag"
    assert detect_format({"question": "q"}) is None and detect_format([1]) is None


def _write_lines(path, lines):
    path.write_bytes(b"".join(line if isinstance(line, bytes) else line.encode() + b"\n" for line in lines))
    return path


def test_bad_jsonl_rows_name_file_and_line_or_are_skipped_and_counted(tmp_path):
    good = json.dumps({"id": "a", "question": "Q?", "golden_answers": ["x"]})
    path = _write_lines(tmp_path / "data.jsonl", [
        good,
        "",
        "{not json",
        json.dumps({"id": "b", "question": "Q?"}),
        b"\xff\xfe bad bytes\n",
        json.dumps({"id": "c", "question": "  ", "golden_answers": ["x"]}),
        json.dumps({"id": "d", "question": "Q?", "golden_answers": [[1]]}),
        good.replace('"a"', '"e"'),
    ])
    with pytest.raises(DataFormatError, match=r"data\.jsonl:3: invalid JSON"):
        load_records(path)
    result = load_records(path, skip_bad_rows=True)
    assert [r.id for r in result.records] == ["a", "e"]
    assert result.skipped == 5
    assert [b.split(": ", 1)[0].rsplit(":", 1)[1] for b in result.bad_rows] == ["3", "4", "5", "6", "7"]
    assert "missing field 'golden_answers'" in result.bad_rows[1]
    assert "not valid UTF-8" in result.bad_rows[2]
    assert "field 'question' is empty" in result.bad_rows[3]
    assert "field 'golden_answers[0]' must be a string, got list" in result.bad_rows[4]


def test_bad_json_and_parquet_rows_name_the_index(tmp_path, fixtures_dir):
    rows = json.loads((fixtures_dir / "hotpotqa_dev.json").read_text())
    rows[1]["supporting_facts"].append(["No Such Title", 0])
    path = tmp_path / "hotpot.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataFormatError, match=r"hotpot\.json\[1\]: hotpotqa row: .*'No Such Title'"):
        load_records(path)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataFormatError, match="broken.json: invalid JSON"):
        load_records(tmp_path / "broken.json")

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pq.read_table(fixtures_dir / "searchr1_nq_train.parquet").to_pylist()
    table[1]["reward_model"] = {"style": "rule", "ground_truth": {"target": None}}
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "bad.parquet")
    with pytest.raises(DataFormatError, match=r"bad\.parquet row 1: .*reward_model\.ground_truth\.target"):
        load_records(tmp_path / "bad.parquet")
    assert load_records(tmp_path / "bad.parquet", skip_bad_rows=True).skipped == 1


def test_unknown_format_and_missing_file_are_clear(tmp_path):
    path = _write_lines(tmp_path / "x.jsonl", [json.dumps({"q": 1})])
    with pytest.raises(DataFormatError, match=r"x\.jsonl:1: cannot tell the data format .*\['q'\]"):
        load_records(path)
    with pytest.raises(DataFormatError, match="unknown data format 'nq'"):
        load_records(path, format="nq")
    with pytest.raises(DataFormatError, match="no such data file"):
        load_records(tmp_path / "missing.jsonl")


def test_stepsearch_rows_round_trip(fixtures_dir, tmp_path):
    records = load_records(fixtures_dir / "musique_ans.jsonl").records
    out = tmp_path / "converted.jsonl"
    out.write_text("".join(json.dumps(to_stepsearch_row(r)) + "\n" for r in records))
    back = load_records(out).records
    for original, copy in zip(records, back):
        assert (copy.id, copy.question, copy.answers, copy.sub_questions, copy.search_keys, copy.support_docs,
                copy.hops, copy.source) == (original.id, original.question, original.answers,
                                            original.sub_questions, original.search_keys, original.support_docs,
                                            original.hops, original.source)
        assert copy.metadata["sub_answers"] == original.metadata["sub_answers"]
    assert isinstance(back[0].support_docs[0], SupportDoc)


def test_cli_convert(fixtures_dir, tmp_path, capsys):
    out = tmp_path / "hotpot.jsonl"
    assert data_main(["convert", "--input", str(fixtures_dir / "hotpotqa_dev.json"), "--out", str(out)]) == 0
    assert [r.id for r in load_records(out).records] == ["5a8b57f25542995d1e6f1371", "5a8c7595554299585d9e36b6"]
    assert data_main(["convert", "--input", str(tmp_path / "none.json"), "--out", str(out)]) == 1
    assert "no such data file" in capsys.readouterr().err
