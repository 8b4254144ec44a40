"""The one record type every dataset loader produces and every stage (rollout, rewards, evaluation) reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SupportDoc:
    """A golden supporting passage of one sub-question (title excluded from similarity, per the paper)."""

    title: str
    text: str


@dataclass
class QARecord:
    """A (multi-hop) question with everything StePPO's rewards need.

    `answers[0]` is the final answer and the rest are aliases. `search_keys[i]` are reference search queries of
    sub-question i (empty when the dataset has no decomposition); `support_docs` are the golden passages, in
    sub-question order (empty: no step rewards for this question).
    """

    id: str
    question: str
    answers: list[str]
    sub_questions: list[str] = field(default_factory=list)
    search_keys: list[list[str]] = field(default_factory=list)
    support_docs: list[SupportDoc] = field(default_factory=list)
    hops: int | None = None
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise ValueError(f"record {self.id!r}: empty question")
        if not self.answers:
            raise ValueError(f"record {self.id!r}: no gold answer")
