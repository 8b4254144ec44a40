"""The retriever interface that rollout, rewards and evaluation use, and the document type it returns.

Two implementations stand behind it: an in-process index (BM25 or dense) and an HTTP client of a server speaking
Search-R1's `/retrieve` contract. Both take a batch of queries and return, per query, the top-k documents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Document:
    """One retrieved passage. `contents` is the corpus form: '"Title"\\ntext' (Search-R1/FlashRAG convention)."""

    id: str
    title: str
    text: str
    score: float | None = None

    @property
    def contents(self) -> str:
        return f'"{self.title}"\n{self.text}'


class RetrieverError(RuntimeError):
    """The retriever could not answer (server unreachable after retries, bad index directory, ...)."""


@runtime_checkable
class Retriever(Protocol):
    def search(self, queries: list[str], topk: int) -> list[list[Document]]:
        """Top-`topk` documents for each query, best first. Empty queries return an empty list."""
        ...

    async def asearch(self, queries: list[str], topk: int) -> list[list[Document]]:
        """Async form of `search` for rollouts that overlap retrieval with generation."""
        ...
