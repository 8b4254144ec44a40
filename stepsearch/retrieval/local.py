"""In-process retrieval: a loaded `SearchIndex` behind the `Retriever` protocol, with a query LRU cache.

RL rollouts repeat queries a lot (the same question sampled n times issues the same first search), so a small cache
in front of the index saves whole encoder passes. Cache misses of one call are searched in one batched index call.
"""
from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict

from stepsearch.retrieval.base import Document
from stepsearch.retrieval.index import SearchIndex


class QueryCache:
    """Thread-safe LRU map (query, topk) -> documents. `capacity` 0 disables it."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, int], list[Document]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, query: str, topk: int) -> list[Document] | None:
        with self._lock:
            docs = self._entries.get((query, topk))
            if docs is None:
                self.misses += 1
                return None
            self._entries.move_to_end((query, topk))
            self.hits += 1
            return docs

    def put(self, query: str, topk: int, docs: list[Document]) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[(query, topk)] = docs
            self._entries.move_to_end((query, topk))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class LocalRetriever:
    """`Retriever` over an in-process index. Queries are stripped and cut to `max_query_chars` before searching.

    An empty query returns no documents (the `Retriever` contract rollouts rely on) unless `search_empty_queries`,
    which the server sets so an empty query gets what the index itself answers, as Search-R1's server does (nothing
    from BM25, the encoder's nearest passages to the empty text from a dense index).
    """

    def __init__(self, index: SearchIndex, cache_size: int = 4096, max_query_chars: int = 512,
                 search_empty_queries: bool = False) -> None:
        self.index = index
        self.cache = QueryCache(cache_size)
        self.max_query_chars = max_query_chars
        self.search_empty_queries = search_empty_queries

    def search(self, queries: list[str], topk: int) -> list[list[Document]]:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        cleaned = [q.strip()[: self.max_query_chars] for q in queries]
        found: dict[str, list[Document]] = {}
        missing: list[str] = []
        for query in dict.fromkeys(q for q in cleaned if q or self.search_empty_queries):
            docs = self.cache.get(query, topk)
            if docs is None:
                missing.append(query)
            else:
                found[query] = docs
        if missing:
            for query, docs in zip(missing, self.index.search(missing, topk)):
                self.cache.put(query, topk, docs)
                found[query] = docs
        return [list(found[q]) if q in found else [] for q in cleaned]  # copies: callers cannot alter the cache

    async def asearch(self, queries: list[str], topk: int) -> list[list[Document]]:
        return await asyncio.to_thread(self.search, queries, topk)
