"""Corpus reading: Search-R1 and title/text rows, and errors that name the file and line."""
from __future__ import annotations

import json

import pytest

from stepsearch.retrieval.base import Document
from stepsearch.retrieval.corpus import CorpusError, load_corpus, split_contents, write_corpus


def _write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_contents_row_splits_quoted_title_from_body(tmp_path):
    path = _write_lines(tmp_path / "c.jsonl", [json.dumps({"id": 7, "contents": '"Paris"\nCapital of France.\nMore.'})])
    (doc,) = load_corpus(path)
    assert doc == Document(id="7", title="Paris", text="Capital of France.\nMore.")
    assert doc.contents == '"Paris"\nCapital of France.\nMore.'


def test_title_text_rows_and_blank_lines_are_accepted(tmp_path):
    path = _write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "a", "title": "T", "text": "body"}), "",
                                               json.dumps({"id": "b", "text": "untitled"})])
    assert [(d.id, d.title, d.text) for d in load_corpus(path)] == [("a", "T", "body"), ("b", "", "untitled")]


def test_contents_without_newline_is_all_body():
    assert split_contents("just text") == ("", "just text")


def test_write_then_load_round_trips(tmp_path):
    docs = [Document("x", 'A "quoted" title', "text with ünïcode"), Document("y", "", "no title")]
    write_corpus(tmp_path / "c.jsonl", docs)
    assert load_corpus(tmp_path / "c.jsonl") == docs


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"contents": "\\"T\\"\\nx"}', "missing or invalid 'id'"),
        ('{"id": 1, "contents": 5}', "'contents' must be a string"),
        ('{"id": 1, "body": "x"}', "needs 'contents'"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = _write_lines(tmp_path / "c.jsonl", [json.dumps({"id": 0, "contents": '"T"\nok'}), line])
    with pytest.raises(CorpusError, match=rf"c\.jsonl:2: .*{message}"):
        load_corpus(path)


def test_duplicate_ids_are_rejected(tmp_path):
    row = json.dumps({"id": "same", "contents": '"T"\nx'})
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: duplicate document id 'same'"):
        load_corpus(_write_lines(tmp_path / "c.jsonl", [row, row]))


def test_non_utf8_bytes_get_a_clear_message(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good_row = json.dumps({"id": 1, "contents": '"T"\nok'}).encode()
    latin1_row = '{"id": 2, "contents": "caf\xe9"}'.encode("latin-1")
    path.write_bytes(good_row + b"\n" + latin1_row + b"\n")
    with pytest.raises(CorpusError, match=r"latin1\.jsonl:2: not valid UTF-8 .*0xe9"):
        load_corpus(path)


def test_missing_and_empty_corpora(tmp_path):
    with pytest.raises(CorpusError, match="corpus file not found"):
        load_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="no documents"):
        load_corpus(tmp_path / "empty.jsonl")
