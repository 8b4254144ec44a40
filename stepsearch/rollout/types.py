"""The typed output of a rollout: what the agent loop hands to the trainer (docs/design.md, "Data flow").

Shapes: B trajectories, T response tokens (right-padded), S search steps (-1 padded), K documents per search.
Index t in the response tensors is the t-th token after the prompt; the prompt itself is kept ragged in
`prompt_ids`, exactly as it was fed to the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from stepsearch.retrieval.base import Document


@dataclass
class Generation:
    """One engine continuation: sampled ids (a stop string included), their log-probs, and why it ended.

    `finish_reason` is "stop" (a stop string completed), "eos" (the end-of-sequence token), or "length"
    (max_new_tokens reached).
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass
class RolloutBatch:
    """B trajectories of the multi-turn search agent.

    Tensors:
      response_ids  (B, T) long   generated and inserted information tokens, right-padded with the pad id
      response_mask (B, T) long   1 on real tokens (generated + information), 0 on padding
      loss_mask     (B, T) float  1 on generated tokens; 0 on the inserted information blocks (the whole
                                  "\\n<information>…</information>\\n" text) and padding
      step_ends     (B, S) long   response index of the token closing each `</search>` that received an
                                  `<information>` block, in round order; -1 padded
      rollout_logp  (B, T) fp32   engine log-probs of the sampled tokens at the sampling temperature; 0 off loss_mask
                                  (the trainer logs their distance to the actor's old_logp: rollout/logp_mismatch)
    loss_mask, step_ends, queries, answers and valid_format come from one segmentation of the token ids by the
    segmenter (`stepsearch.rollout.segmenter`, span rule with `inserted_spans`).
    Per trajectory and step s (one per `step_ends` entry): `queries[b][s]` the query, `retrieved[b][s]` its K
    documents (empty for a notice step: an empty query or a refused search); `response_texts[b]` the decoded
    response (special tokens skipped; for reading, never parsed); `answers[b]` the last answer block of the
    generated text (None without one); `valid_format[b]` the segmenter's format verdict; `inserted_spans[b]` the
    token ranges [start, end) of the inserted blocks; `num_searches[b]` the steps that actually searched;
    `record_indices[b]` the input record answered; `finish_reasons[b]` how the trajectory ended ("answer", "eos",
    "turn_budget", "budget", "search_limit"; see `stepsearch.rollout.agent_loop`). `timings`: seconds per stage of
    the whole rollout (generate_s, retrieve_s, bookkeeping_s, total_s) and the number of turns.
    """

    prompt_ids: list[list[int]]
    response_ids: torch.Tensor  # (B, T)
    response_mask: torch.Tensor  # (B, T)
    loss_mask: torch.Tensor  # (B, T)
    step_ends: torch.Tensor  # (B, S)
    queries: list[list[str]]
    retrieved: list[list[list["Document"]]]
    response_texts: list[str]
    answers: list[str | None]
    valid_format: list[bool]
    inserted_spans: list[list[tuple[int, int]]]
    num_searches: list[int]
    record_indices: list[int]
    rollout_logp: torch.Tensor  # (B, T)
    timings: dict[str, float] = field(default_factory=dict)
    finish_reasons: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def batch_size(self) -> int:
        return len(self.prompt_ids)

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) number of real response tokens per trajectory."""
        return self.response_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """A copy whose tensors live on `device` (lists are shared, not copied)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)
