"""`stepsearch retriever build`: writes a loadable index, and a bad corpus is a one-line error with exit code 1."""
from __future__ import annotations

from stepsearch.cli import main as stepsearch_main
from stepsearch.retrieval.index import load_index


def test_build_writes_a_loadable_bm25_index(corpus_path, tmp_path, capsys):
    assert stepsearch_main(["retriever", "build", "--corpus", str(corpus_path), "--out", str(tmp_path / "idx")]) == 0
    assert "wrote bm25 index of 200 documents" in capsys.readouterr().out
    assert load_index(tmp_path / "idx").search(["marker4"], 1)[0][0].id == "doc-4"


def test_bad_corpus_and_misplaced_encoder_are_reported(tmp_path, capsys, corpus_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "contents": "\\"T\\"\\nx"}\n{"id": 2\n', encoding="utf-8")
    assert stepsearch_main(["retriever", "build", "--corpus", str(bad), "--out", str(tmp_path / "i")]) == 1
    assert "bad.jsonl:2: invalid JSON" in capsys.readouterr().err
    args = ["retriever", "build", "--corpus", str(corpus_path), "--out", str(tmp_path / "j"), "--encoder", "/x"]
    assert stepsearch_main(args) == 1
    assert "--encoder only applies to --method dense" in capsys.readouterr().err


def test_serve_reports_a_missing_index(tmp_path, capsys):
    assert stepsearch_main(["retriever", "serve", "--index", str(tmp_path), "--port", "0"]) == 1
    assert "not an index directory" in capsys.readouterr().err
