"""The StepSearch data pipeline: query writers, the retriever validity filter, resumable output, the LLM client
against a real local OpenAI-compatible HTTP server, and the CLI."""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stepsearch.data.cli import main as data_main
from stepsearch.data.loaders import load_records
from stepsearch.data.pipeline import (
    LLMError,
    LLMQueryWriter,
    RuleQueryWriter,
    done_ids,
    parse_query_lines,
    passage_matches,
    run_pipeline,
    validate_queries,
)
from stepsearch.data.records import SupportDoc
from stepsearch.retrieval.base import Document


@pytest.fixture
def musique(fixtures_dir):
    return load_records(fixtures_dir / "musique_ans.jsonl").records


@pytest.fixture
def retriever(fixtures_dir, tiny_bm25):
    docs = []
    for line in open(fixtures_dir / "musique_ans.jsonl", encoding="utf-8"):
        for p in json.loads(line)["paragraphs"]:
            docs.append(Document(str(len(docs)), p["title"], p["paragraph_text"]))
    return tiny_bm25(docs)


class FixedWriter:
    """Writes the given queries for every sub-question (plus the sub-question itself when `echo`)."""

    def __init__(self, queries, echo=False):
        self.queries, self.echo = queries, echo

    def write(self, question, sub_question, n):
        return ([sub_question] if self.echo else []) + list(self.queries)


def test_rule_writer_queries():
    queries = RuleQueryWriter().write("Q", "Where was Billie Joe Armstrong born?", 3)
    assert queries == ["Where was Billie Joe Armstrong born", "Billie Joe Armstrong born"]
    assert RuleQueryWriter().write("Q", "Who founded Velmar Bank?", 1) == ["Who founded Velmar Bank"]


def test_parse_query_lines_strips_decoration():
    content = 'Here are the queries:\n1. Green Day lead vocalist\n2) "who sings in Green Day"\n- Green Day singer\n\n'
    assert parse_query_lines(content) == ["Green Day lead vocalist", "who sings in Green Day", "Green Day singer"]


def test_passage_matching():
    support = SupportDoc("Green Day", "Green Day is an American  rock band.")
    assert passage_matches(Document("1", "Other", "green day is an american rock band."), support)
    assert passage_matches(Document("1", "Green Day", "Green Day is an American rock band. Formed 1987."), support)
    assert not passage_matches(Document("1", "Green Day", "A different paragraph."), support)
    assert not passage_matches(Document("1", "Other", "Green Day is an American rock band. Formed 1987."), support)


def test_filter_keeps_only_queries_that_retrieve_the_support_doc(musique, retriever):
    outcome = validate_queries(musique[0], FixedWriter(["Lake Victoria Africa"], echo=True), retriever, 3, 2)
    assert outcome.record.search_keys == [["lead vocalist of Green Day"], ["Where was Billie Joe Armstrong born?"]]
    assert (outcome.proposed, outcome.kept) == (4, 2)
    assert validate_queries(musique[0], FixedWriter(["Lake Victoria Africa"]), retriever, 3, 2).record is None


def test_queries_containing_the_hop_answer_are_dropped(musique, retriever):
    leaky = FixedWriter(["Green Day Billie Joe Armstrong lead vocalist"], echo=True)
    outcome = validate_queries(musique[0], leaky, retriever, 3, 3)
    assert outcome.record.search_keys[0] == ["lead vocalist of Green Day"]
    assert "Green Day Billie Joe Armstrong lead vocalist" in outcome.record.search_keys[1]  # hop 2's answer differs


def test_pipeline_writes_training_format_and_resumes(musique, retriever, tmp_path):
    out = tmp_path / "keys.jsonl"
    stats = run_pipeline(musique, out, retriever, n_queries=3, topk=3, workers=2, progress=False)
    assert (stats.read, stats.written, stats.dropped) == (2, 2, 0) and stats.kept > 0
    back = load_records(out, format="stepsearch").records
    assert [r.id for r in back] == [r.id for r in musique]
    for record in back:
        for keys, support in zip(record.search_keys, record.support_docs):
            for docs in retriever.search(keys, 3):
                assert any(passage_matches(d, support) for d in docs)
    lines_before = out.read_text()
    again = run_pipeline(musique, out, retriever, progress=False)
    assert (again.already_done, again.written) == (2, 0) and out.read_text() == lines_before

    # An interrupted run leaves half a line: it is cut off and that record is done again.
    first_line = lines_before.splitlines()[0]
    out.write_text(first_line + "\n" + lines_before.splitlines()[1][:40])
    assert done_ids(out) == {musique[0].id}
    resumed = run_pipeline(musique, out, retriever, progress=False)
    assert (resumed.already_done, resumed.written) == (1, 1)
    assert [r.id for r in load_records(out).records] == [musique[0].id, musique[1].id]


def test_records_without_decomposition_are_counted_not_written(fixtures_dir, retriever, tmp_path):
    flashrag = load_records(fixtures_dir / "flashrag.jsonl").records
    stats = run_pipeline(flashrag, tmp_path / "o.jsonl", retriever, progress=False)
    assert (stats.no_decomposition, stats.written) == (3, 0)


def test_done_ids_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"o\.jsonl:1: not a pipeline output row"):
        done_ids(path)


# ------------------------------------------------------------------------------------------ OpenAI-compatible
class _ChatServer:
    """A stdlib HTTP server speaking /v1/chat/completions with canned answers built from the prompt."""

    def __init__(self, fail_first: int = 0, status: int = 500):
        self.requests: list[tuple[str, dict]] = []
        self.fail_first, self.status = fail_first, status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, body))
                if len(server.requests) <= server.fail_first:
                    self.send_response(server.status)
                    self.end_headers()
                    self.wfile.write(b'{"error": "canned failure"}')
                    return
                prompt = body["messages"][-1]["content"]
                sub_question = prompt.split("Current sub-question: ", 1)[1].split("\n", 1)[0]
                content = f"Here are the queries:\n1. {sub_question.rstrip('?')}\n2. unrelated zebra query\n"
                reply = {"id": "c1", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_llm_writer_end_to_end_through_a_local_chat_server(musique, retriever, tmp_path):
    with _ChatServer() as server:
        writer = LLMQueryWriter(server.url, "tiny-chat", backoff_s=0.01)
        stats = run_pipeline(musique, tmp_path / "llm.jsonl", retriever, writer, n_queries=2, topk=3,
                             progress=False)
    assert stats.written == 2 and stats.proposed == 10 and stats.kept == 5
    path, body = server.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "tiny-chat"
    prompts = [b["messages"][0]["content"] for _, b in server.requests]
    assert any("Current sub-question: lead vocalist of Green Day" in p for p in prompts)
    assert all("Write 2 different search queries" in p for p in prompts)
    record = load_records(tmp_path / "llm.jsonl").records[0]
    assert record.search_keys == [["lead vocalist of Green Day"], ["Where was Billie Joe Armstrong born"]]


def test_llm_writer_retries_server_errors_and_fails_fast_on_client_errors():
    with _ChatServer(fail_first=2, status=503) as server:
        writer = LLMQueryWriter(server.url + "/v1", "m", backoff_s=0.01, max_retries=3)
        assert writer.write("Q", "Who founded Velmar Bank?", 2)[0] == "Who founded Velmar Bank"
        assert len(server.requests) == 3
    with _ChatServer(fail_first=10, status=400) as server:
        with pytest.raises(LLMError, match="HTTP 400: .*canned failure"):
            LLMQueryWriter(server.url, "m", backoff_s=0.01).write("Q", "S?", 2)
        assert len(server.requests) == 1


def test_llm_writer_names_an_unreachable_endpoint():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    writer = LLMQueryWriter(f"http://127.0.0.1:{port}", "m", max_retries=1, backoff_s=0.01, timeout_s=2)
    with pytest.raises(LLMError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions: unreachable after 2 attempts"):
        writer.write("Q", "S?", 2)


def test_cli_pipeline_with_a_local_bm25_index(fixtures_dir, tmp_path, capsys):
    pytest.importorskip("bm25s")
    from stepsearch.retrieval.index import build_index

    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as fh:
        for line in open(fixtures_dir / "musique_ans.jsonl", encoding="utf-8"):
            for p in json.loads(line)["paragraphs"]:
                fh.write(json.dumps({"id": f"{p['title']}", "contents": f'"{p["title"]}"\n{p["paragraph_text"]}'})
                         + "\n")
    build_index(corpus, tmp_path / "index", method="bm25")
    out = tmp_path / "keys.jsonl"
    argv = ["pipeline", "--input", str(fixtures_dir / "musique_ans.jsonl"), "--out", str(out),
            "--retriever", str(tmp_path / "index"), "--n-queries", "3", "--topk", "3"]
    assert data_main(argv) == 0
    assert "written 2" in capsys.readouterr().out
    assert len(load_records(out).records) == 2
    assert data_main(argv[:-4] + ["--retriever", str(tmp_path / "no-index")]) == 1
    assert "not an index directory" in capsys.readouterr().err
    assert data_main(argv + ["--llm-url", "http://127.0.0.1:1"]) == 2
