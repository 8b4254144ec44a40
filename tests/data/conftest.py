"""Shared helpers for the data tests: the fixture directory and a tiny in-process BM25 `Retriever`.

`TinyBM25` is a real (if small) implementation of the Retriever protocol, BM25 with Lucene-style IDF and the
parameters of our BM25 index (k1 0.9, b 0.4, English stop words), so tests need neither bm25s nor a server.
"""
from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from pathlib import Path

import pytest

from stepsearch.retrieval.base import Document

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
_STOP = frozenset("a an and are as at be but by for if in into is it no not of on or such that the their then there "
                  "these they this to was will with".split())


def _tokens(text: str) -> list[str]:
    return [t for t in re.findall(r"\w\w+", text.lower()) if t not in _STOP]


class TinyBM25:
    def __init__(self, docs: list[Document], k1: float = 0.9, b: float = 0.4) -> None:
        self.docs = docs
        self.k1, self.b = k1, b
        self.term_counts = [Counter(_tokens(d.contents)) for d in docs]
        self.lengths = [sum(c.values()) for c in self.term_counts]
        self.avg_length = sum(self.lengths) / max(len(docs), 1)
        df = Counter(t for c in self.term_counts for t in c)
        self.idf = {t: math.log(1 + (len(docs) - n + 0.5) / (n + 0.5)) for t, n in df.items()}
        self.calls = 0

    def _score(self, query_terms: list[str], i: int) -> float:
        counts, norm = self.term_counts[i], self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avg_length)
        return sum(self.idf[t] * counts[t] * (self.k1 + 1) / (counts[t] + norm) for t in query_terms if t in counts)

    def search(self, queries: list[str], topk: int) -> list[list[Document]]:
        self.calls += 1
        out = []
        for query in queries:
            terms = _tokens(query)
            scored = [(self._score(terms, i), i) for i in range(len(self.docs))]
            ranked = sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], s[1]))[:topk]
            out.append([Document(str(i), self.docs[i].title, self.docs[i].text, score) for score, i in ranked])
        return out

    async def asearch(self, queries: list[str], topk: int) -> list[list[Document]]:
        return await asyncio.to_thread(self.search, queries, topk)


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture
def tiny_bm25() -> type[TinyBM25]:
    """The class, so a test builds it over its own documents (test modules cannot import a conftest by name)."""
    return TinyBM25
