"""The whole StePPO reward of a rollout batch, in one function used by training, evaluation and the report.

`score_rollout(rollout, records, reward_cfg)` groups the trajectories by question (the golden docs of a question
are tokenised once and each distinct retrieved text is scored once for all its samples), then for every
trajectory b:

    outcome[b]        = outcome_reward(answer, valid_format, golds, queries, search keys)   (`rewards.outcome`)
    step_scores[b, t] = step_weight * (G^t - P^t)                                          (`rewards.step`)

with `answer`, `valid_format` and the step queries taken from the rollout's segmentation (generated tokens only),
`G^t`/`P^t` from the documents each step retrieved (a notice step, with no documents, scores 0), and the step
scores set to 0 when the invalid-format rule says the trajectory keeps no step reward
(`reward.invalid_format="penalty_only"`). The search-key reward r_key scores the non-empty step queries in order.

Metrics (means over the batch): reward/outcome, reward/f1, reward/em, reward/key_reward, reward/valid_format,
reward/step_reward (sum of a trajectory's step scores), reward/info_gain and reward/redundancy (G^t and P^t over
the rounds that retrieved documents, of questions that have golden docs).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from stepsearch.rewards.outcome import OutcomeScore, outcome_reward_from_config
from stepsearch.rewards.step import step_rewards_group

if TYPE_CHECKING:
    from stepsearch.config import RewardConfig


class ScoredRollout(Protocol):
    """What `score_rollout` reads of a rollout (`stepsearch.rollout.types.RolloutBatch` provides it)."""

    record_indices: list[int]
    answers: list[str | None]
    valid_format: list[bool]
    queries: list[list[str]]
    retrieved: list[list[list[Any]]]  # documents with `.id`, `.text`
    response_texts: list[str]
    step_ends: torch.Tensor  # (B, S)


@dataclass
class TrajectoryReward:
    """Every part of one trajectory's reward."""

    outcome: OutcomeScore
    gains: list[float]
    """(S_b,) information gain G^t of each step (0 for a notice step or without golden docs)."""
    penalties: list[float]
    """(S_b,) redundancy P^t of each step."""
    step_scores: list[float]
    """(S_b,) s^t as placed on the step ends (0 everywhere when the trajectory keeps no step reward)."""
    searched: list[bool]
    """(S_b,) whether step t retrieved documents."""
    has_golden: bool
    """Whether the question has golden docs (otherwise G and P are all 0 by definition, not measured)."""


@dataclass
class RewardBatch:
    """Rewards of B trajectories with S step slots (the rollout's `step_ends` width)."""

    outcome: torch.Tensor  # (B,) float32, placed on the last response token
    step_scores: torch.Tensor  # (B, S) float32, placed on the step ends
    trajectories: list[TrajectoryReward]
    details: list[dict[str, Any]]
    """Per trajectory, for trajectories.jsonl and the report."""
    metrics: dict[str, float]

    def measured_gains_and_penalties(self) -> tuple[list[float], list[float]]:
        """G^t and P^t of every round that retrieved documents, over questions with golden docs."""
        gains, penalties = [], []
        for trajectory in self.trajectories:
            if trajectory.has_golden:
                gains += [g for g, searched in zip(trajectory.gains, trajectory.searched) if searched]
                penalties += [p for p, searched in zip(trajectory.penalties, trajectory.searched) if searched]
        return gains, penalties


def score_rollout(rollout: ScoredRollout, records: Sequence[Any], reward_cfg: RewardConfig) -> RewardBatch:
    """The StePPO reward of every trajectory of `rollout`; `records[rollout.record_indices[b]]` is b's question."""
    batch_size, num_steps = rollout.step_ends.shape
    outcome = torch.zeros(batch_size)
    step_scores = torch.zeros((batch_size, num_steps))  # (B, S)
    rows_of_record: dict[int, list[int]] = {}
    for row, record_index in enumerate(rollout.record_indices):
        rows_of_record.setdefault(record_index, []).append(row)
    trajectories: list[TrajectoryReward | None] = [None] * batch_size
    details: list[dict[str, Any] | None] = [None] * batch_size
    for record_index, rows in rows_of_record.items():
        record = records[record_index]
        rounds = [[[(doc.id, doc.text) for doc in docs] for docs in rollout.retrieved[row]] for row in rows]
        golden = [doc.text for doc in record.support_docs]
        for row, (gains, penalties) in zip(rows, step_rewards_group(rounds, golden, reward_cfg.redundancy_identity)):
            score = outcome_reward_from_config(rollout.answers[row], rollout.valid_format[row], record.answers,
                                               [q for q in rollout.queries[row] if q], record.search_keys, reward_cfg)
            outcome[row] = score.reward
            if score.keeps_step_rewards:
                step_values = [reward_cfg.step_weight * (g - p) for g, p in zip(gains, penalties)]
            else:
                step_values = [0.0] * len(gains)
            step_scores[row, :len(step_values)] = torch.tensor(step_values)
            searched = [bool(docs) for docs in rollout.retrieved[row]]
            trajectories[row] = TrajectoryReward(score, gains, penalties, step_values, searched, bool(golden))
            details[row] = {"question": record.question, "answers": list(record.answers),
                            "response": rollout.response_texts[row], "queries": list(rollout.queries[row]),
                            "retrieved": [[doc.id for doc in docs] for docs in rollout.retrieved[row]],
                            "gains": gains, "penalties": penalties, "step_scores": step_values,
                            "outcome": score.reward, "f1": score.f1, "em": score.em, "key_reward": score.key_reward,
                            "valid_format": score.valid_format}
    result = RewardBatch(outcome, step_scores, trajectories, details, {})  # type: ignore[arg-type]
    scores = [trajectory.outcome for trajectory in result.trajectories]
    gains_measured, penalties_measured = result.measured_gains_and_penalties()
    result.metrics = {
        "reward/outcome": outcome.mean().item(),
        "reward/f1": float(np.mean([s.f1 for s in scores])),
        "reward/em": float(np.mean([s.em for s in scores])),
        "reward/key_reward": float(np.mean([s.key_reward for s in scores])),
        "reward/valid_format": float(np.mean([s.valid_format for s in scores])),
        "reward/step_reward": step_scores.sum(dim=1).mean().item(),
        "reward/info_gain": float(np.mean(gains_measured)) if gains_measured else 0.0,
        "reward/redundancy": float(np.mean(penalties_measured)) if penalties_measured else 0.0,
    }
    return result
