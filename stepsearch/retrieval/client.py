"""HTTP client of a `/retrieve` server (ours or Search-R1's) behind the `Retriever` protocol.

Batched (a call's queries go in as few requests as the server allows, sent concurrently), async on aiohttp, with a
sync `search` that works whether or not the calling thread runs an event loop (it runs the request on the client's
own background loop, whose session is closed by `close()`, when the client is garbage-collected, or at interpreter
exit, so no run ends with aiohttp's "Unclosed client session"). Connection errors, timeouts, 5xx and 429 are retried
with exponential backoff and jitter; then a `RetrieverError` names the URL and says the server is unreachable. Other
4xx are not retried: they carry the server's message.
"""
from __future__ import annotations

import asyncio
import random
import threading
import weakref
from typing import Any

from stepsearch.retrieval.base import Document, RetrieverError
from stepsearch.retrieval.corpus import split_contents

RETRIABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


class _Retriable(Exception):
    """One failed attempt worth retrying; the message says why."""


def parse_retrieve_response(payload: Any, expected: int, where: str) -> list[list[Document]]:
    """`{"result": [[...], ...]}` -> documents. Items may be `{"document": {...}, "score": s}` (ours, Search-R1 with
    return_scores) or bare documents (Search-R1 without scores); documents have `contents` or `title`/`text`."""
    if not isinstance(payload, dict) or not isinstance(payload.get("result"), list):
        raise RetrieverError(f"{where}: response has no 'result' list")
    result = payload["result"]
    if len(result) != expected:
        raise RetrieverError(f"{where}: response has {len(result)} result lists for {expected} queries")
    parsed: list[list[Document]] = []
    for qi, items in enumerate(result):
        if not isinstance(items, list):
            raise RetrieverError(f"{where}: result[{qi}] is not a list")
        docs = []
        for di, item in enumerate(items):
            doc = item.get("document", item) if isinstance(item, dict) else None
            if not isinstance(doc, dict):
                raise RetrieverError(f"{where}: result[{qi}][{di}] is not a document object")
            score = item.get("score") if "document" in item else None
            if isinstance(doc.get("contents"), str):
                title, text = split_contents(doc["contents"])
            elif isinstance(doc.get("text"), str):
                title, text = str(doc.get("title", "")), doc["text"]
            else:
                raise RetrieverError(f"{where}: result[{qi}][{di}] has neither 'contents' nor 'text'")
            if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
                raise RetrieverError(f"{where}: result[{qi}][{di}] has a non-numeric score {score!r}")
            docs.append(Document(str(doc.get("id", "")), title, text, None if score is None else float(score)))
        parsed.append(docs)
    return parsed


class HTTPRetriever:
    """`Retriever` over HTTP. `url` is the server's base URL (`/retrieve` is appended unless already there)."""

    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        max_queries_per_request: int = 256,
        max_query_chars: int = 512,
        seed: int | None = None,
    ) -> None:
        base = url.rstrip("/")
        self.url = base if base.endswith("/retrieve") else base + "/retrieve"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_queries_per_request = max_queries_per_request
        self.max_query_chars = max_query_chars
        self._rng = random.Random(seed)
        self._sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_closer: weakref.finalize | None = None
        self._loop_lock = threading.Lock()

    # -- async path -------------------------------------------------------------------------------------------

    def _session(self) -> Any:
        import aiohttp

        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            self._sessions[loop] = session
        return session

    async def asearch(self, queries: list[str], topk: int) -> list[list[Document]]:
        cleaned = [q.strip()[: self.max_query_chars] for q in queries]
        asked = [i for i, q in enumerate(cleaned) if q]
        chunks = [asked[s : s + self.max_queries_per_request]
                  for s in range(0, len(asked), self.max_queries_per_request)]
        answers = await asyncio.gather(*(self._post([cleaned[i] for i in chunk], topk) for chunk in chunks))
        results: list[list[Document]] = [[] for _ in queries]
        for chunk, docs_lists in zip(chunks, answers):
            for i, docs in zip(chunk, docs_lists):
                results[i] = docs
        return results

    async def _post(self, queries: list[str], topk: int) -> list[list[Document]]:
        payload = {"queries": queries, "topk": topk, "return_scores": True}
        attempts = self.max_retries + 1
        last_error = ""
        for attempt in range(attempts):
            try:
                return await self._post_once(payload, len(queries))
            except _Retriable as err:
                last_error = str(err)
            if attempt + 1 < attempts:
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                await asyncio.sleep(delay * (0.5 + 0.5 * self._rng.random()))  # jitter de-synchronises clients
        raise RetrieverError(
            f"retrieval server {self.url} is unreachable after {attempts} tries ({last_error}); "
            "is `stepsearch retriever serve` running there?"
        )

    async def _post_once(self, payload: dict[str, Any], expected: int) -> list[list[Document]]:
        import aiohttp

        try:
            async with self._session().post(self.url, json=payload) as response:
                if response.status in RETRIABLE_STATUSES:
                    raise _Retriable(f"HTTP {response.status}: {(await response.text())[:200]}")
                if response.status != 200:
                    text = (await response.text())[:500]
                    raise RetrieverError(f"retrieval server {self.url} rejected the request "
                                         f"(HTTP {response.status}): {text}")
                body = await response.json(content_type=None)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as err:
            raise _Retriable(f"{type(err).__name__}: {err}") from None
        except asyncio.TimeoutError:
            raise _Retriable(f"no answer within {self.timeout_s}s") from None
        except ValueError as err:  # the body was not JSON
            raise RetrieverError(f"retrieval server {self.url} sent a non-JSON answer: {err}") from None
        return parse_retrieve_response(body, expected, self.url)

    async def aclose(self) -> None:
        """Close the session of the running event loop."""
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session.close()

    # -- sync path --------------------------------------------------------------------------------------------

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="retriever-client", daemon=True)
                thread.start()
                self._loop = loop
                # Runs on close(), on garbage collection, or at interpreter exit, whichever comes first.
                self._loop_closer = weakref.finalize(self, _stop_background_loop, loop, thread, self._sessions)
            return self._loop

    def search(self, queries: list[str], topk: int) -> list[list[Document]]:
        future = asyncio.run_coroutine_threadsafe(self.asearch(queries, topk), self._background_loop())
        return future.result()

    def close(self) -> None:
        """Close the background loop's session and stop its thread (sessions of callers' loops: `aclose`)."""
        with self._loop_lock:
            closer, self._loop, self._loop_closer = self._loop_closer, None, None
        if closer is not None:
            closer()

    def __enter__(self) -> HTTPRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop_background_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                          sessions: weakref.WeakKeyDictionary) -> None:
    """Close the session living on `loop`, then stop the loop and its thread."""
    session = sessions.pop(loop, None)
    if session is not None and not session.closed and thread.is_alive():
        asyncio.run_coroutine_threadsafe(session.close(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    if not thread.is_alive():
        loop.close()
