"""The HTTP server and client, against the real aiohttp server on loopback: the Search-R1 contract, bad input,
hundreds of concurrent requests, a restart in the middle of a client session, and an unreachable server."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from stepsearch.retrieval.base import Document, Retriever, RetrieverError
from stepsearch.retrieval.client import HTTPRetriever, parse_retrieve_response
from stepsearch.retrieval.server import ServerLimits, start_server_in_thread, start_server_subprocess


@pytest.fixture(scope="module")
def server(bm25_index):
    limits = ServerLimits(max_queries=64, max_topk=50, max_body_bytes=64 * 1024, max_query_chars=1000)
    handle = start_server_in_thread(bm25_index, limits=limits)
    yield handle
    handle.stop()


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url + "/retrieve", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _post_json(url: str, payload: object) -> tuple[int, dict]:
    return _post(url, json.dumps(payload).encode())


def test_contract_with_scores(server, bm25_index):
    status, body = _post_json(server.url, {"queries": ["marker11", "river castle"], "topk": 3, "return_scores": True})
    assert status == 200 and len(body["result"]) == 2
    expected = bm25_index.search(["marker11", "river castle"], 3)
    for items, docs in zip(body["result"], expected):
        assert [set(item) for item in items] == [{"document", "score"}] * len(docs)
        assert [item["document"] for item in items] == [{"id": d.id, "contents": d.contents} for d in docs]
        assert [item["score"] for item in items] == pytest.approx([d.score for d in docs])


def test_contract_without_scores_returns_bare_documents_like_search_r1(server):
    status, body = _post_json(server.url, {"queries": ["marker11"], "topk": 2, "return_scores": False})
    assert status == 200
    (item,) = body["result"][0]
    assert set(item) == {"id", "contents"} and item["id"] == "doc-11"
    assert item["contents"].startswith('"Entity 11"\nEntity 11 is a ')
    status, default = _post_json(server.url, {"queries": ["marker11 river"]})  # Search-R1 defaults: topk 3, no scores
    assert status == 200 and len(default["result"][0]) == 3 and set(default["result"][0][0]) == {"id", "contents"}


@pytest.mark.parametrize("topk", [0, None, "absent"])
def test_missing_null_or_zero_topk_means_the_server_default(server, topk):
    payload = {"queries": ["marker11 river king"], "return_scores": True}
    if topk != "absent":
        payload["topk"] = topk
    status, body = _post_json(server.url, payload)
    assert status == 200 and len(body["result"][0]) == 3  # ServerLimits.default_topk


def test_empty_queries_are_answered_as_search_r1_trainers_send_them(server):
    assert _post_json(server.url, {"queries": [], "topk": 3}) == (200, {"result": []})
    status, body = _post_json(server.url, {"queries": ["", "marker3", "   "], "topk": 2})
    assert status == 200
    assert body["result"][0] == [] and body["result"][2] == []  # BM25: no query term, no document
    assert body["result"][1][0]["id"] == "doc-3"


def test_health_reports_counts_method_and_version_but_no_paths(server, bm25_index_dir):
    from stepsearch import __version__

    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        raw = response.read().decode()
    health = json.loads(raw)
    assert health["status"] == "ok" and health["version"] == __version__
    assert health["index"] == {"method": "bm25", "num_docs": 200, "k1": 1.2, "b": 0.75}
    assert str(bm25_index_dir) not in raw and "corpus" not in raw and "/" not in raw


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'"just a string"', 400, "JSON object"),
        (json.dumps({"topk": 3}).encode(), 400, "'queries' must be a list of strings"),
        (json.dumps({"queries": "marker1"}).encode(), 400, "'queries' must be a list of strings"),
        (json.dumps({"queries": None}).encode(), 400, "'queries' must be a list of strings"),
        (json.dumps({"queries": ["ok", 5]}).encode(), 400, r"queries\[1\] must be a string"),
        (json.dumps({"queries": ["ok", None]}).encode(), 400, r"queries\[1\] must be a string"),
        (json.dumps({"queries": ["x" * 1001]}).encode(), 400, "more than 1000"),
        (json.dumps({"queries": ["ok"], "topk": -1}).encode(), 400, "'topk' must be an integer in"),
        (json.dumps({"queries": ["ok"], "topk": 2.5}).encode(), 400, "'topk' must be an integer in"),
        (json.dumps({"queries": ["ok"], "topk": 10**9}).encode(), 400, "'topk' must be an integer in"),
        (json.dumps({"queries": ["ok"], "topk": "3"}).encode(), 400, "'topk'"),
        (json.dumps({"queries": ["ok"], "topk": True}).encode(), 400, "'topk'"),
        (json.dumps({"queries": ["ok"], "return_scores": "yes"}).encode(), 400, "return_scores"),
        (json.dumps({"queries": ["q"] * 65}).encode(), 413, "too many queries"),
        (json.dumps({"queries": ["q" * 900] * 80}).encode(), 413, "exceeds"),
    ],
)
def test_bad_requests_get_4xx_json_errors(server, body, status, message):
    got_status, got = _post(server.url, body)
    assert got_status == status
    assert set(got) == {"error"}
    assert __import__("re").search(message, got["error"])


def test_server_survives_bad_requests(server):
    for body in (b"\xff\xfe", b"[" * 10000, b""):
        assert _post(server.url, body)[0] == 400
    assert _post_json(server.url, {"queries": ["marker2"], "topk": 1})[1]["result"][0][0]["id"] == "doc-2"


def test_hundreds_of_concurrent_requests_all_answered_and_equal_to_direct_search(bm25_index):
    import aiohttp

    handle = start_server_in_thread(bm25_index, cache_size=0)
    queries = [f"marker{i % 200} {('river', 'king', 'film', 'castle')[i % 4]}" for i in range(400)]
    topks = [1 + i % 5 for i in range(400)]

    async def fire() -> list[dict]:
        async with aiohttp.ClientSession() as session:
            async def one(query: str, topk: int) -> dict:
                payload = {"queries": [query], "topk": topk, "return_scores": True}
                async with session.post(handle.url + "/retrieve", json=payload) as response:
                    assert response.status == 200
                    return await response.json()
            return await asyncio.gather(*(one(q, k) for q, k in zip(queries, topks)))

    try:
        answers = asyncio.run(fire())
        with urllib.request.urlopen(handle.url + "/health", timeout=10) as response:
            health = json.loads(response.read())
    finally:
        handle.stop()
    assert len(answers) == 400
    for query, topk, answer in zip(queries, topks, answers):
        (direct,) = bm25_index.search([query], topk)
        got = parse_retrieve_response(answer, 1, "test")[0]
        assert [d.id for d in got] == [d.id for d in direct]
        assert [d.score for d in got] == pytest.approx([d.score for d in direct])
    assert health["queries"] == 400
    assert health["batches"] < 400  # concurrent requests were merged into fewer index calls


def test_client_search_and_asearch_match_the_index(server, bm25_index):
    client = HTTPRetriever(server.url, timeout_s=10, max_retries=1, backoff_s=0.01, max_queries_per_request=3)
    try:
        assert isinstance(client, Retriever)
        queries = ["marker1", "", "castle river", "marker77", "  ", "king", "marker150"]
        results = client.search(queries, topk=4)
        direct = bm25_index.search(queries, 4)
        assert results[1] == [] and results[4] == []
        for i in (0, 2, 3, 5, 6):
            assert results[i] == direct[i]

        async def inside_a_running_loop() -> tuple[list[list[Document]], list[list[Document]]]:
            sync_result = client.search(["marker5"], 2)  # the sync form also works while a loop runs here
            async_result = await client.asearch(["marker5"], 2)
            await client.aclose()
            return sync_result, async_result

        sync_result, async_result = asyncio.run(inside_a_running_loop())
        assert sync_result == async_result == bm25_index.search(["marker5"], 2)
        with pytest.raises(RetrieverError, match=r"rejected the request \(HTTP 400\).*topk"):
            client.search(["marker5"], topk=51)
    finally:
        client.close()


def test_restart_during_a_client_session(bm25_index):
    handle = start_server_in_thread(bm25_index)
    port = handle.port
    client = HTTPRetriever(handle.url, timeout_s=5, max_retries=8, backoff_s=0.05, max_backoff_s=0.5, seed=0)
    try:
        before = client.search(["marker33"], 1)
        handle.stop()
        restarted: list = []
        restarter = threading.Timer(0.4, lambda: restarted.append(start_server_in_thread(bm25_index, port=port)))
        restarter.start()
        down_at = time.monotonic()
        during = client.search(["marker33"], 1)  # sent while the server is down: retried until it is back
        restarter.join()
        assert time.monotonic() - down_at >= 0.3
        assert restarted and during == before and during[0][0].id == "doc-33"
    finally:
        client.close()
        for again in restarted:
            again.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_server_fails_fast_with_a_clear_error():
    url = f"http://127.0.0.1:{_free_port()}"
    client = HTTPRetriever(url, timeout_s=2, max_retries=3, backoff_s=0.01, max_backoff_s=0.05)
    started = time.monotonic()
    try:
        with pytest.raises(RetrieverError, match=rf"{url}/retrieve is unreachable after 4 tries"):
            client.search(["anything"], 3)
    finally:
        client.close()
    assert time.monotonic() - started < 5


def test_starting_on_a_taken_port_is_a_clear_error(server, bm25_index):
    with pytest.raises(RetrieverError, match=rf"cannot start the retrieval server on 127.0.0.1:{server.port}"):
        start_server_in_thread(bm25_index, port=server.port)


def test_client_parses_search_r1_responses():
    bare = {"result": [[{"id": "1", "contents": '"T"\nbody'}], []]}
    scored = {"result": [[{"document": {"id": "1", "contents": '"T"\nbody', "title": "ignored"}, "score": 0.5}]]}
    assert parse_retrieve_response(bare, 2, "u") == [[Document("1", "T", "body")], []]
    assert parse_retrieve_response(scored, 1, "u") == [[Document("1", "T", "body", 0.5)]]
    with pytest.raises(RetrieverError, match="u: response has 1 result lists for 2 queries"):
        parse_retrieve_response(scored, 2, "u")
    with pytest.raises(RetrieverError, match="neither 'contents' nor 'text'"):
        parse_retrieve_response({"result": [[{"document": {"id": 1}}]]}, 1, "u")
    with pytest.raises(RetrieverError, match="non-numeric score 'high'"):
        parse_retrieve_response({"result": [[{"document": {"text": "x"}, "score": "high"}]]}, 1, "u")


def test_cli_serve_subprocess_answers(bm25_index_dir):
    with start_server_subprocess(bm25_index_dir, env={"OMP_NUM_THREADS": "1"}) as process:
        client = HTTPRetriever(process.url, timeout_s=10, max_retries=2, backoff_s=0.05)
        try:
            assert client.search(["marker8"], 1)[0][0].id == "doc-8"
        finally:
            client.close()
    assert process.process.returncode == 0
