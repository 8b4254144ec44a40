"""An aiohttp retrieval server speaking Search-R1's `/retrieve` contract, with fair batching over worker threads.

    POST /retrieve {"queries": [str, ...], "topk": int, "return_scores": bool}
      -> {"result": [[{"document": {"id", "contents"}, "score": float}, ...], ...]}   (return_scores true)
      -> {"result": [[{"id", "contents"}, ...], ...]}                                (false or absent: bare documents)
    GET /health -> {"status": "ok", "version", "index": {method, num_docs, ...}, "cache": {...}, counters}

As in Search-R1's server, a missing, null or 0 `topk` means the server's default, `queries` may be an empty list,
and an empty query is searched like any other (BM25 finds nothing; a dense index answers what the encoder makes of
the empty text). Every other malformed request, and every bound (body size, number of queries, query length,
topk), answers a 4xx JSON error `{"error": ...}`; the server never crashes on input.

Scheduling: requests' queries wait in a queue; whenever one of `workers` index threads is free it takes a batch of
up to `max_batch_queries`, at most `request_share` from each request: up to half of it from the request at the head
of the queue (which then moves to the back, so every request's turn comes round), then from the requests with the
fewest queries left. A small request therefore waits for at most one batch per worker, however many maximum-size
requests are queued. The waiting work is split evenly over the free workers (no batch larger than needed), and each
worker runs the encoder/FAISS with `intra_op_threads` threads, so all cores work on concurrent requests (by default
one single-threaded worker per core, at least two, so one's Python code overlaps the other's operations).

Connections: at most `max_connections` are open; a new one beyond that first evicts the connection idle or reading
for the longest (a request being answered is never evicted), and is refused with a 503 when every connection is
busy answering. A connection must deliver a whole request (headers and body) within `read_timeout_s` of its first
byte and may sit idle for `idle_timeout_s`; slow or silent clients are closed, never held forever. It binds loopback
unless told otherwise: it has no authentication.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepsearch.retrieval.base import Document, RetrieverError
from stepsearch.retrieval.index import SearchIndex, load_index
from stepsearch.retrieval.local import LocalRetriever

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
RESERVED_FDS = 64
"""File descriptors kept free for the index, logs and the listening socket when capping connections."""
LINGER_S = 1.0
"""How long a refused connection may still send its request (discarded) before it is reset."""
LISTEN_BACKLOG = 128
"""Pending connections the kernel queues (fewer under a low open-file limit, see `ConnectionGuard`)."""


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class ServerLimits:
    """Bounds on what one request may ask, how work is scheduled, and how long a connection may dawdle."""

    max_body_bytes: int = 1 << 20
    """Largest accepted request body (413 above)."""
    max_queries: int = 512
    """Most queries in one request (413 above)."""
    max_query_chars: int = 4096
    """Longest accepted query (400 above)."""
    max_topk: int = 100
    """Largest accepted topk (400 above)."""
    default_topk: int = 3
    """topk when a request gives none, null or 0 (Search-R1's default)."""
    max_batch_queries: int = 32
    """Most queries in one index call: bounds how long a worker is busy with one batch. On 2 idle CPU cores a dense
    encoder answered 695 q/s at 32 and 648 at 16 (64 clients, 8 queries per request); on a GPU raise it."""
    request_share: int = 16
    """Most queries one request puts into a batch before other waiting requests get their turn."""
    workers: int = 0
    """Index worker threads; 0 = available cores / `intra_op_threads`, at least 2."""
    intra_op_threads: int = 1
    """torch/FAISS threads inside each worker's index call. One per worker and one worker per core: two workers of
    two threads on 2 idle cores run four OpenMP threads on two cores and answered 589 q/s against 648 for two
    workers of one thread (dense, 64 clients, 8 queries per request; benchmarks/README.md, "Retrieval server")."""
    max_connections: int = 1000
    """Open connections at most (further capped by the file-descriptor limit)."""
    read_timeout_s: float = 10.0
    """A request's headers and body must arrive within this many seconds of its first byte."""
    idle_timeout_s: float = 30.0
    """An idle keep-alive (or silent new) connection is closed after this many seconds."""

    def validate(self) -> None:
        """Raise ValueError naming the first bound that would make the server refuse everything or misbehave."""
        positive_ints = ("max_body_bytes", "max_queries", "max_query_chars", "max_topk", "default_topk",
                         "max_batch_queries", "request_share", "intra_op_threads", "max_connections")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"workers must be an integer >= 0 (0 = one per core), got {self.workers!r}")
        if self.default_topk > self.max_topk:
            raise ValueError(f"default_topk {self.default_topk} exceeds max_topk {self.max_topk}")
        for name in ("read_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


class BadRequest(Exception):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
    if not isinstance(queries, list):
        raise BadRequest(400, "'queries' must be a list of strings")
    if len(queries) > limits.max_queries:
        raise BadRequest(413, f"too many queries: {len(queries)} > {limits.max_queries} per request")
    for i, query in enumerate(queries):
        if not isinstance(query, str):
            raise BadRequest(400, f"queries[{i}] must be a string, got {type(query).__name__}")
        if len(query) > limits.max_query_chars:
            raise BadRequest(400, f"queries[{i}] is {len(query)} characters, more than {limits.max_query_chars}")
    topk = payload.get("topk")
    if topk is None or (topk == 0 and not isinstance(topk, bool)):
        topk = limits.default_topk  # Search-R1: `if not request.topk` falls back to the server's default
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= limits.max_topk:
        raise BadRequest(400, f"'topk' must be an integer in [1, {limits.max_topk}] (or 0/absent for the "
                              f"default {limits.default_topk}), got {topk!r}")
    return_scores = payload.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest(400, f"'return_scores' must be true or false, got {return_scores!r}")
    return queries, topk, return_scores


def _document_json(doc: Document, return_scores: bool) -> dict[str, Any]:
    document = {"id": doc.id, "contents": doc.contents}
    return {"document": document, "score": doc.score} if return_scores else document


# -- scheduling ------------------------------------------------------------------------------------------------------

@dataclass
class _Request:
    """One request's queries on their way through the round-robin queue."""

    queries: list[str]
    topk: int
    future: asyncio.Future = field(repr=False)
    results: list[list[Document]] = field(default_factory=list, repr=False)
    dispatched: int = 0
    answered: int = 0


@dataclass
class _Slice:
    request: _Request
    start: int
    stop: int


class FairScheduler:
    """Round-robin batches of queries over a pool of worker threads (see the module docstring)."""

    def __init__(self, retriever: LocalRetriever, limits: ServerLimits) -> None:
        self.retriever = retriever
        self.limits = limits
        self.workers = limits.workers or max(2, available_cores() // limits.intra_op_threads)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="retrieval-index",
                                            initializer=_limit_threads, initargs=(limits.intra_op_threads,))
        self._waiting: deque[_Request] = deque()
        self._waiting_queries = 0
        self._free = self.workers
        self.batches = 0
        self.queries = 0

    async def search(self, queries: list[str], topk: int) -> list[list[Document]]:
        if not queries:
            return []
        future = asyncio.get_running_loop().create_future()
        request = _Request(queries, topk, future, results=[[] for _ in queries])
        self._waiting.append(request)
        self._waiting_queries += len(queries)
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._free and self._waiting:
            size = min(self.limits.max_batch_queries, math.ceil(self._waiting_queries / self._free))
            batch = self._take(size)
            if not batch:
                continue
            self._free -= 1
            queries = [q for piece in batch for q in piece.request.queries[piece.start : piece.stop]]
            topk = max(piece.request.topk for piece in batch)  # smaller asks take a prefix: ties break by position
            done = loop.run_in_executor(self._executor, self.retriever.search, queries, topk)
            done.add_done_callback(lambda fut, batch=batch: self._finish(batch, fut))

    def _take(self, size: int) -> list[_Slice]:
        """Up to `size` queries, at most `request_share` per request: up to half the batch from the request at the
        head of the queue (its turn comes round, so none starves), then from those with the fewest queries left (a
        small request is answered after at most one batch per worker, however much large work is queued), then
        the head again if room is left."""
        live = []
        for request in self._waiting:
            if request.future.done():  # the client went away, or an earlier batch of it failed
                self._waiting_queries -= len(request.queries) - request.dispatched
            else:
                live.append(request)
        if not live:
            self._waiting.clear()
            return []
        head, others = live[0], sorted(live[1:], key=lambda r: len(r.queries) - r.dispatched)
        taken = {id(request): 0 for request in live}
        batch: list[_Slice] = []

        def take(request: _Request, most: int) -> None:
            nonlocal size
            count = min(len(request.queries) - request.dispatched, most - taken[id(request)], size)
            if count > 0:
                batch.append(_Slice(request, request.dispatched, request.dispatched + count))
                request.dispatched += count
                taken[id(request)] += count
                self._waiting_queries -= count
                size -= count

        share = self.limits.request_share
        take(head, share if not others else max(1, min(share, size // 2)))  # the head's turn leaves room for others
        for request in others:
            take(request, share)
        take(head, share)  # what the others left
        # the head goes to the back of the queue; everyone else keeps their place in arrival order
        self._waiting = deque(r for r in (*live[1:], head) if r.dispatched < len(r.queries))
        return batch

    def _finish(self, batch: list[_Slice], done: asyncio.Future) -> None:
        self._free += 1
        error = done.exception() if not done.cancelled() else RetrieverError("search cancelled")
        if error is not None:
            log.error("index search failed for a batch of %d queries: %s: %s",
                      sum(p.stop - p.start for p in batch), type(error).__name__, error)
        else:
            results = done.result()
            self.batches += 1
            self.queries += len(results)
        offset = 0
        for piece in batch:
            request = piece.request
            if request.future.done():
                pass
            elif error is not None:
                request.future.set_exception(error)
            else:
                for i in range(piece.start, piece.stop):
                    request.results[i] = results[offset + i - piece.start][: request.topk]
                request.answered += piece.stop - piece.start
                if request.answered == len(request.queries):
                    request.future.set_result(request.results)
            offset += piece.stop - piece.start
        self._dispatch()

    def close(self) -> None:
        for request in self._waiting:
            if not request.future.done():
                request.future.set_exception(RetrieverError("server shutting down"))
        self._waiting.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _limit_threads(threads: int) -> None:
    """Worker-thread initialiser: the torch/FAISS thread count of each index call (torch only if loaded)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)


# -- connections -----------------------------------------------------------------------------------------------------

_OVERLOADED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: 35\r\n\r\n" b'{"error": "too many open requests"}')


class ConnectionGuard:
    """Counts connections, closes dawdlers, and makes room for new ones (see the module docstring)."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.max_connections = limits.max_connections
        self.backlog = LISTEN_BACKLOG
        soft_fds, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft_fds != resource.RLIM_INFINITY:
            # asyncio accepts up to `backlog` connections in one go before an evicted one's descriptor is freed,
            # and up to `backlog` refused ones may linger: open connections plus both must fit under the limit,
            # or accept() fails with EMFILE and stalls for a second.
            usable = max(4, soft_fds - RESERVED_FDS)
            self.backlog = min(self.backlog, usable // 4)
            if usable - 2 * self.backlog < self.max_connections:
                self.max_connections = usable - 2 * self.backlog
                log.warning("open-file limit %d caps the retrieval server at %d connections",
                            soft_fds, self.max_connections)
        self.evictable: OrderedDict[_GuardedConnection, None] = OrderedDict()  # oldest first
        self.by_transport: dict[Any, _GuardedConnection] = {}
        self.busy = 0
        self.lingering = 0
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0

    @property
    def open(self) -> int:
        return len(self.evictable) + self.busy

    def admit(self) -> bool:
        """Make room for one more connection; False when every open connection is busy answering a request."""
        while self.open >= self.max_connections:
            if not self.evictable:
                self.refused += 1
                return False
            oldest = next(iter(self.evictable))
            self.evicted += 1
            oldest.close()
        return True

    def busy_with(self, transport: Any) -> _GuardedConnection | None:
        """Mark the connection of `transport` as answering a fully read request (no timer, not evictable)."""
        connection = self.by_transport.get(transport)
        if connection is not None:
            connection.set_busy()
        return connection


class _GuardedConnection(asyncio.Protocol):
    """Wraps aiohttp's per-connection protocol: states idle -> reading -> busy -> idle, a timer on the first two."""

    def __init__(self, inner: Any, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: Any = None
        self.state = "new"
        self.admitted = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if not self.guard.admit():
            self.state = "closed"
            transport.write(_OVERLOADED)
            if self.guard.lingering >= self.guard.backlog:
                transport.abort()
                return
            # Closing now, with the client's request unread, would reset the connection before it reads the 503:
            # send it, stop writing, and discard what comes in until the client closes (or LINGER_S passes).
            self.guard.lingering += 1
            transport.write_eof()
            self.timer = asyncio.get_running_loop().call_later(LINGER_S, transport.abort)
            return
        self.admitted = True
        self.guard.by_transport[transport] = self
        self.inner.connection_made(transport)
        self._enter("idle")

    def _enter(self, state: str) -> None:
        if self.state == "busy":
            self.guard.busy -= 1
        self.guard.evictable.pop(self, None)
        self.state = state
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if state == "busy":
            self.guard.busy += 1
        elif state in ("idle", "reading"):
            self.guard.evictable[self] = None
            limit = self.guard.limits.idle_timeout_s if state == "idle" else self.guard.limits.read_timeout_s
            self.timer = asyncio.get_running_loop().call_later(limit, self._time_out)

    def set_busy(self) -> None:
        if self.state != "closed":
            self._enter("busy")

    def set_idle(self) -> None:
        if self.state != "closed":
            self._enter("idle")

    def _time_out(self) -> None:
        self.timer = None
        self.guard.timed_out += 1
        self.close()

    def close(self) -> None:
        if self.state != "closed":
            self._enter("closed")
            self.transport.abort()  # the peer is not reading either: do not wait to flush

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        if self.state == "idle":
            self._enter("reading")
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self.admitted:
            self.transport.close()
            return None
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted and self.timer is not None:  # a refused connection that was lingering
            self.timer.cancel()
            self.guard.lingering -= 1
        if self.state != "closed":
            self._enter("closed")
        self.guard.by_transport.pop(self.transport, None)
        if self.admitted:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


# -- the application -------------------------------------------------------------------------------------------------

class RetrievalServer:
    """The aiohttp application around a `LocalRetriever`; `make_app()` gives the app, `listen()` serves it."""

    def __init__(self, retriever: LocalRetriever, limits: ServerLimits | None = None) -> None:
        self.retriever = retriever
        self.limits = limits or ServerLimits()
        self.limits.validate()
        self.scheduler: FairScheduler | None = None
        self.guard = ConnectionGuard(self.limits)

    @property
    def batches(self) -> int:
        return self.scheduler.batches if self.scheduler else 0

    @property
    def queries(self) -> int:
        return self.scheduler.queries if self.scheduler else 0

    def make_app(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=self.limits.max_body_bytes, middlewares=[self._track_connection()])
        app.router.add_post("/retrieve", self.handle_retrieve)
        app.router.add_get("/health", self.handle_health)
        app.on_startup.append(self._start_scheduler)
        app.on_cleanup.append(self._stop_scheduler)
        return app

    async def listen(self, runner: Any, host: str, port: int) -> asyncio.AbstractServer:
        """Listen on host:port with every connection behind the guard (after `await runner.setup()`)."""
        handler_factory = runner.server
        return await asyncio.get_running_loop().create_server(
            lambda: _GuardedConnection(handler_factory(), self.guard), host, port, reuse_address=True,
            backlog=self.guard.backlog)

    async def _start_scheduler(self, app: Any) -> None:
        self.scheduler = FairScheduler(self.retriever, self.limits)

    async def _stop_scheduler(self, app: Any) -> None:
        if self.scheduler is not None:
            self.scheduler.close()

    def _track_connection(self) -> Any:
        """Middleware: once a handler has answered, its connection is idle again (timed, evictable)."""
        from aiohttp import web

        @web.middleware
        async def track(request: Any, handler: Any) -> Any:
            try:
                return await handler(request)
            finally:
                connection = self.guard.by_transport.get(request.transport)
                if connection is not None:
                    connection.set_idle()

        return track

    async def handle_retrieve(self, request: Any) -> Any:
        from aiohttp import web

        try:
            if request.content_length is not None and request.content_length > self.limits.max_body_bytes:
                raise BadRequest(413, f"request body of {request.content_length} bytes exceeds "
                                      f"{self.limits.max_body_bytes}")
            try:
                body = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise BadRequest(413, f"request body exceeds {self.limits.max_body_bytes} bytes") from None
            self.guard.busy_with(request.transport)
            queries, topk, return_scores = parse_retrieve_request(body, self.limits)
        except BadRequest as err:
            return web.json_response({"error": str(err)}, status=err.status)
        assert self.scheduler is not None
        try:
            results = await self.scheduler.search(queries, topk)
        except Exception as err:
            return web.json_response({"error": f"search failed: {type(err).__name__}: {err}"}, status=500)
        payload = {"result": [[_document_json(d, return_scores) for d in docs] for docs in results]}
        return web.json_response(payload)

    async def handle_health(self, request: Any) -> Any:
        from aiohttp import web

        from stepsearch import __version__

        self.guard.busy_with(request.transport)
        cache = self.retriever.cache
        guard = self.guard
        return web.json_response({
            "status": "ok",
            "version": __version__,
            "index": self.retriever.index.describe(),
            "cache": {"size": len(cache), "capacity": cache.capacity, "hits": cache.hits, "misses": cache.misses},
            "workers": self.scheduler.workers if self.scheduler else 0,
            "batches": self.batches,
            "queries": self.queries,
            "connections": {"open": guard.open, "max": guard.max_connections, "evicted": guard.evicted,
                            "refused": guard.refused, "timed_out": guard.timed_out},
        })


def _as_retriever(index: SearchIndex | LocalRetriever, cache_size: int) -> LocalRetriever:
    if isinstance(index, LocalRetriever):
        return index
    return LocalRetriever(index, cache_size=cache_size, max_query_chars=1 << 30, search_empty_queries=True)


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
        self._listener: asyncio.AbstractServer | None = None
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
        self._loop.run_until_complete(self._shutdown())
        self._loop.close()

    async def _start(self) -> None:
        from aiohttp import web

        self._runner = web.AppRunner(self.server.make_app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        self._listener = await self.server.listen(self._runner, self.host, self.port)
        self.port = self._listener.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()

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
    encoder_path: str | None = None,
) -> None:
    """Load an index and serve it until SIGINT/SIGTERM (the `stepsearch retriever serve` command)."""
    _warn_if_exposed(host)
    index = load_index(index_dir, encoder_path=encoder_path)
    server = RetrievalServer(_as_retriever(index, cache_size), limits)

    async def run() -> None:
        from aiohttp import web

        runner = web.AppRunner(server.make_app(), access_log=None, shutdown_timeout=5.0)
        await runner.setup()
        try:
            listener = await server.listen(runner, host, port)
        except OSError as err:
            await runner.cleanup()
            raise RetrieverError(f"cannot listen on {host}:{port}: {err}") from None
        bound_port = listener.sockets[0].getsockname()[1]
        described = index.describe()
        print(f"stepsearch retriever: serving {described['method']} index of {described['num_docs']} documents "
              f"on http://{host}:{bound_port} ({server.scheduler.workers if server.scheduler else 0} workers)",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        listener.close()
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
