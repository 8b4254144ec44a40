"""`stepsearch retriever build|serve`: a loadable index; a bad corpus is a one-line error with exit code 1, a bad
argument one with exit code 2 (checked through a subprocess, as a user meets them); the HTTP client closes itself."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

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


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stepsearch.cli", "retriever", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize(("args", "message"), [
    (["serve", "--index", "IDX", "--max-topk", "0"], "argument --max-topk: must be >= 1, got 0"),
    (["serve", "--index", "IDX", "--max-body-bytes", "-1"], "argument --max-body-bytes: must be >= 1, got -1"),
    (["serve", "--index", "IDX", "--max-queries", "0"], "argument --max-queries: must be >= 1, got 0"),
    (["serve", "--index", "IDX", "--port", "99999"], "argument --port: a port is in 0-65535"),
    (["serve", "--index", "IDX", "--read-timeout", "nan"], "argument --read-timeout: must be a positive finite"),
    (["serve", "--index", "IDX", "--default-topk", "7", "--max-topk", "5"], "default_topk 7 exceeds max_topk 5"),
    (["build", "--corpus", "CORPUS", "--out", "CORPUS"], "is an existing file; give a new or index directory"),
    (["build", "--corpus", "CORPUS", "--out", "NEW", "--b", "1.5"], "BM25 b must be in [0, 1], got 1.5"),
    (["build", "--corpus", "CORPUS", "--out", "NEW", "--bm25-preset", "lucene", "--k1", "1"], "either the preset"),
    (["build", "--corpus", "CORPUS", "--out", "NEW", "--nlist", "8"], "--nlist only applies to --method dense"),
])
def test_bad_arguments_are_one_line_errors_with_exit_code_2(args, message, corpus_path, bm25_index_dir, tmp_path):
    substitutions = {"IDX": str(bm25_index_dir), "CORPUS": str(corpus_path), "NEW": str(tmp_path / "new")}
    result = _run_cli(*(substitutions.get(a, a) for a in args))
    assert result.returncode == 2
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("stepsearch retriever: error: ") and message in result.stderr
    assert not (tmp_path / "new").exists()


def test_a_taken_port_is_a_one_line_error(bm25_index_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = _run_cli("serve", "--index", str(bm25_index_dir), "--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("stepsearch retriever: error: cannot listen on")
    assert "Traceback" not in result.stderr


def test_http_client_leaves_no_unclosed_session_at_exit(bm25_index_dir):
    script = (
        "import sys\n"
        "from stepsearch.retrieval.client import HTTPRetriever\n"
        "from stepsearch.retrieval.index import load_index\n"
        "from stepsearch.retrieval.server import start_server_in_thread\n"
        f"handle = start_server_in_thread(load_index({str(bm25_index_dir)!r}))\n"
        "client = HTTPRetriever(handle.url)\n"
        "print(client.search(['marker4'], 1)[0][0].id)\n"
        "handle.stop()\n"  # the client is left for interpreter exit to close, as the eval/data commands leave it
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "doc-4", result.stderr
    assert "Unclosed" not in result.stderr, result.stderr
