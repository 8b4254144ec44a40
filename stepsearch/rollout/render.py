"""How a trajectory is laid out in tokens, and the budgets that cut it: one renderer for the agent loop (which
samples trajectories) and the warm start (which renders gold ones), so both produce the same token sequences.

A response is generated turns and inserted information blocks, each tokenized on its own and concatenated (never
re-tokenized as a whole). An information block is

    "\\n<information>" + body + "</information>\\n"      body = `format_documents(docs)` or a notice

tokenized as prefix, body and suffix separately, so that the body can be cut to a token budget while the block
still closes. Budgets (`RolloutConfig`):

- a turn generates at most `max_new_tokens_per_turn` tokens, and never more than the response budget left
  (`turn_allowance`);
- a block holds at most `max_information_tokens` tokens and must leave room for one more generated token under
  `max_response_tokens`; when not even an empty block fits, the trajectory ends ("budget") (`body_budget` is None).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from stepsearch.config import RolloutConfig
    from stepsearch.retrieval.base import Document

INFORMATION_PREFIX = "\n<information>"
INFORMATION_SUFFIX = "</information>\n"
NO_RESULTS_NOTICE = "No documents were found for this query."


def format_documents(docs: Sequence["Document"]) -> str:
    """Search-R1's rendering of the retrieved documents inside an information block."""
    if not docs:
        return NO_RESULTS_NOTICE
    return "\n".join(f"Doc {rank}(Title: {doc.title}) {doc.text}" for rank, doc in enumerate(docs, start=1))


class TrajectoryRenderer:
    """Information blocks as token ids, and the token budgets of turns and blocks, for one tokenizer and config."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", rollout_cfg: "RolloutConfig") -> None:
        self.tokenizer = tokenizer
        self.cfg = rollout_cfg
        self.prefix = tokenizer.encode(INFORMATION_PREFIX, add_special_tokens=False)
        self.suffix = tokenizer.encode(INFORMATION_SUFFIX, add_special_tokens=False)

    @property
    def overhead(self) -> int:
        """Tokens of an information block around its body."""
        return len(self.prefix) + len(self.suffix)

    def turn_allowance(self, response_length: int) -> int:
        """Tokens the next turn may generate after `response_length` response tokens."""
        return min(self.cfg.max_new_tokens_per_turn, self.cfg.max_response_tokens - response_length)

    def body_budget(self, response_length: int) -> int | None:
        """Body tokens an information block may hold after `response_length` response tokens; None when the block
        cannot fit at all (the trajectory ends)."""
        room = min(self.cfg.max_information_tokens, self.cfg.max_response_tokens - response_length - 1)
        return None if room < self.overhead else room - self.overhead

    def blocks(self, bodies: list[str], body_budgets: list[int]) -> list[list[int]]:
        """Token ids of one information block per body, each body cut to its budget (one batched tokenizer call)."""
        encoded = self.tokenizer(bodies, add_special_tokens=False)["input_ids"] if bodies else []
        return [self.prefix + body[:budget] + self.suffix for body, budget in zip(encoded, body_budgets)]
