"""An aiohttp retrieval server speaking Search-R1's `/retrieve` contract, with request micro-batching.

    POST /retrieve {"queries": [str, ...], "topk": int, "return_scores": bool}
      -> {"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}   (no "score" when false)
    GET /health -> {"status": "ok", "index": {...}, "cache": {...}, "batches": int, "queries": int}

Concurrent requests are not searched one by one: handlers park their queries in a pending list and a single batching
loop merges everything that arrived (waiting at most `max_wait_ms` for requests still being read) into one index call
per distinct topk, run in a worker thread so the event loop keeps accepting requests meanwhile. Every bound (body
size, number of queries, query length, topk) answers a 4xx JSON error `{"error": ...}`; the server never crashes on
input. It binds loopback unless told otherwise: it has no authentication.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepsearch.retrieval.base import Document, RetrieverError
from stepsearch.retrieval.index import SearchIndex, load_index
from stepsearch.retrieval.local import LocalRetriever

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServerLimits:
    """Bounds on what one request may ask, and the batching window."""

    max_body_bytes: int = 1 << 20
    """Largest accepted request body (413 above)."""
    max_queries: int = 512
    """Most queries in one request (413 above)."""
    max_query_chars: int = 4096
    """Longest accepted query (400 above)."""
    max_topk: int = 100
    """Largest accepted topk (400 above)."""
    default_topk: int = 3
    """topk when a request does not say (Search-R1's default)."""
    max_batch_queries: int = 1024
    """Most queries merged into one index call."""
    max_wait_ms: float = 2.0
    """How long a batch waits for requests that are still being read before it is searched."""


class BadRequest(Exception):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Pending:
    queries: list[str]
    topk: int
    future: asyncio.Future = field(repr=False)


def parse_retrieve_request(body: bytes, limits: ServerLimits) -> tuple[list[str], int, bool]:
    """Validate a /retrieve body -> (queries, topk, return_scores); raises BadRequest naming the bad field."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(400, f"request body is not valid JSON: {err}") from None
    except RecursionError:
        raise BadRequest(400, "request body nests JSON too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, "request body must be a JSON object with a 'queries' list")
    queries = payload.get("queries")
    if not isinstance(queries, list) or not queries:
        raise BadRequest(400, "'queries' must be a non-empty list of strings")
    if len(queries) > limits.max_queries:
        raise BadRequest(413, f"too many queries: {len(queries)} > {limits.max_queries} per request")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise BadRequest(400, f"queries[{i}] must be a string, got {type(query).__name__}")
        if not query.strip():
            raise BadRequest(400, f"queries[{i}] is empty")
        if len(query) > limits.max_query_chars:
            raise BadRequest(400, f"queries[{i}] is {len(query)} characters, more than {limits.max_query_chars}")
    topk = payload.get("topk", limits.default_topk)
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= limits.max_topk:
        raise BadRequest(400, f"'topk' must be an integer in [1, {limits.max_topk}], got {topk!r}")
    return_scores = payload.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest(400, f"'return_scores' must be true or false, got {return_scores!r}")
    return queries, topk, return_scores


def _document_json(doc: Document, return_scores: bool) -> dict[str, Any]:
    item: dict[str, Any] = {"document": {"id": doc.id, "contents": doc.contents}}
    if return_scores:
        item["score"] = doc.score
    return item


class RetrievalServer:
    """The aiohttp application around a `LocalRetriever`; `make_app()` gives the app to run."""

    def __init__(self, retriever: LocalRetriever, limits: ServerLimits | None = None) -> None:
        self.retriever = retriever
        self.limits = limits or ServerLimits()
        self._pending: deque[_Pending] = deque()
        self._arrived: asyncio.Event | None = None
        self._reading = 0  # requests whose body is still being read: worth waiting for
        self._batch_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-index")
        self.batches = 0
        self.queries = 0

    def make_app(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=self.limits.max_body_bytes)
        app.router.add_post("/retrieve", self.handle_retrieve)
        app.router.add_get("/health", self.handle_health)
        app.on_startup.append(self._start_batching)
        app.on_cleanup.append(self._stop_batching)
        return app

    async def _start_batching(self, app: Any) -> None:
        self._arrived = asyncio.Event()
        self._batch_task = asyncio.create_task(self._batch_loop())

    async def _stop_batching(self, app: Any) -> None:
        if self._batch_task is not None:
            self._batch_task.cancel()
        for pending in self._pending:
            if not pending.future.done():
                pending.future.set_exception(RetrieverError("server shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _batch_loop(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            deadline = loop.time() + self.limits.max_wait_ms / 1000
            while (self._reading and loop.time() < deadline
                   and sum(len(p.queries) for p in self._pending) < self.limits.max_batch_queries):
                await asyncio.sleep(0.0002)
            batch, budget = [], self.limits.max_batch_queries
            while self._pending and (not batch or len(self._pending[0].queries) <= budget):
                budget -= len(self._pending[0].queries)
                batch.append(self._pending.popleft())
            if not self._pending:
                self._arrived.clear()
            try:
                await self._search_batch(batch)
            except Exception as err:  # the loop must outlive any one batch: its requests get a 500
                log.exception("retrieval batch failed")
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(err)

    async def _search_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        by_topk: dict[int, list[_Pending]] = {}
        for pending in batch:
            by_topk.setdefault(pending.topk, []).append(pending)
        for topk, group in by_topk.items():
            queries = [q for p in group for q in p.queries]
            try:
                results = await loop.run_in_executor(self._executor, self.retriever.search, queries, topk)
            except Exception as err:  # answered as a 500 to exactly the requests of this batch
                log.exception("index search failed for a batch of %d queries", len(queries))
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(err)
                continue
            self.batches += 1
            self.queries += len(queries)
            start = 0
            for p in group:
                if not p.future.done():  # the client may have gone away
                    p.future.set_result(results[start : start + len(p.queries)])
                start += len(p.queries)

    async def handle_retrieve(self, request: Any) -> Any:
        from aiohttp import web

        self._reading += 1
        try:
            if request.content_length is not None and request.content_length > self.limits.max_body_bytes:
                raise BadRequest(413, f"request body of {request.content_length} bytes exceeds "
                                      f"{self.limits.max_body_bytes}")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise BadRequest(413, f"request body exceeds {self.limits.max_body_bytes} bytes") from None
            queries, topk, return_scores = parse_retrieve_request(body, self.limits)
            future = asyncio.get_running_loop().create_future()
            self._pending.append(_Pending(queries, topk, future))
            assert self._arrived is not None
            self._arrived.set()
        except BadRequest as err:
            return web.json_response({"error": str(err)}, status=err.status)
        finally:
            self._reading -= 1
        try:
            results = await future
        except Exception as err:
            return web.json_response({"error": f"search failed: {type(err).__name__}: {err}"}, status=500)
        payload = {"result": [[_document_json(d, return_scores) for d in docs] for docs in results]}
        return web.json_response(payload)

    async def handle_health(self, request: Any) -> Any:
        from aiohttp import web

        cache = self.retriever.cache
        return web.json_response({
            "status": "ok",
            "index": self.retriever.index.describe(),
            "cache": {"size": len(cache), "capacity": cache.capacity, "hits": cache.hits, "misses": cache.misses},
            "batches": self.batches,
            "queries": self.queries,
        })


def _as_retriever(index: SearchIndex | LocalRetriever, cache_size: int) -> LocalRetriever:
    return index if isinstance(index, LocalRetriever) else LocalRetriever(index, cache_size=cache_size,
                                                                          max_query_chars=1 << 30)


def _warn_if_exposed(host: str) -> None:
    if host not in LOOPBACK_HOSTS:
        log.warning("retrieval server binds %s: it has no authentication; anyone who can reach it can query it", host)


class ServerHandle:
    """A server running on its own event loop in a daemon thread; `.url`, `.port`, `.stop()`."""

    def __init__(self, server: RetrievalServer, host: str, port: int) -> None:
        self.server = server
        self.host = host
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._runner: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"retrieval-server-{port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as err:  # handed to the starting thread, which re-raises it
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    async def _start(self) -> None:
        from aiohttp import web

        self._runner = web.AppRunner(self.server.make_app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, backlog=1024)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def start(self) -> ServerHandle:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RetrieverError(f"cannot start the retrieval server on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self) -> None:
        """Close the listening socket and open connections, and wait for the thread to end."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server_in_thread(
    index: SearchIndex | LocalRetriever,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: ServerLimits | None = None,
    cache_size: int = 4096,
) -> ServerHandle:
    """Serve `index` in this process on a background thread; port 0 picks a free port (see `handle.url`)."""
    _warn_if_exposed(host)
    server = RetrievalServer(_as_retriever(index, cache_size), limits)
    return ServerHandle(server, host, port).start()


def serve(
    index_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: ServerLimits | None = None,
    cache_size: int = 4096,
) -> None:
    """Load an index and serve it until SIGINT/SIGTERM (the `stepsearch retriever serve` command)."""
    _warn_if_exposed(host)
    index = load_index(index_dir)
    server = RetrievalServer(_as_retriever(index, cache_size), limits)

    async def run() -> None:
        from aiohttp import web

        runner = web.AppRunner(server.make_app(), access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise RetrieverError(f"cannot listen on {host}:{port}: {err}") from None
        bound_port = site._server.sockets[0].getsockname()[1]
        described = index.describe()
        print(f"stepsearch retriever: serving {described['method']} index of {described['num_docs']} documents "
              f"on http://{host}:{bound_port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(run())


class ServerProcess:
    """`stepsearch retriever serve` in a child process; `.url`, `.stop()`."""

    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process = process
        self.url = url

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server_subprocess(
    index_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    extra_args: list[str] | None = None,
    startup_timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start `python -m stepsearch.cli retriever serve` and wait until it prints the URL it listens on."""
    cmd = [sys.executable, "-m", "stepsearch.cli", "retriever", "serve", "--index", str(index_dir),
           "--host", host, "--port", str(port), *(extra_args or [])]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {})})
    deadline = time.monotonic() + startup_timeout_s
    seen: list[str] = []
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(r"on (http://\S+)", line)
        if match:
            threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
            return ServerProcess(process, match.group(1))
    process.kill()
    process.wait()
    raise RetrieverError(f"retrieval server process did not start ({' '.join(cmd)}):\n{''.join(seen[-20:])}")


def _drain(stream: Any) -> None:
    """Keep reading a child's output so a full pipe never blocks it."""
    for _ in stream:
        pass
