"""Rewards of StePPO (docs/design.md, "Semantics"): answer metrics, outcome reward, search-key reward, step reward,
and `score_rollout`, the one function that assembles them for a rollout batch (training, evaluation, report).

Imports only the standard library, numpy and torch.

Parity with the released StepSearch code (`configs/parity.yaml` takes its choices: format penalty -1 with
`invalid_format: penalty_only`, `key_aggregation: released`, step weight 1.6, text identity for redundancy). The
deviations that remain, each kept on purpose:
- passage text: the released parser lets the next passage's "Doc k" label leak into each passage's text (gains
  differ by up to 0.036 and redundancy depends on rank); here gains and redundancy use the clean passage text.
- redundancy: the released code counts a second copy inside the same round as redundant; here only documents
  seen in an earlier round count, since one search returning a duplicate is the retriever's doing, not the query's.
- nested answer tags: the released regex takes `<answer>a<answer>b</answer>` as "a<answer>b"; here the block is
  the innermost "b", the answer comes from generated tokens only, and an empty answer is an invalid format (the
  released code lets `<answer></answer>` dodge the -1 penalty).
- search keys: the released code scores every `<search>…</search>` of the text (also one that got no information
  block); here the queries of the steps that received an information block count.
- F1 is not rounded to 4 decimals (differences below 5e-5).
- GAE (old verl, in `stepsearch.algo`): the released trainer does not skip retrieved tokens and whitens advantages
  over them too; at gamma = lambda = 1 the raw advantages of generated tokens are the same, the whitened ones differ
  (up to 0.08 measured). Whitening here is over generated tokens only in every preset: statistics over retrieved
  tokens would make the advantage scale depend on how long the retrieved documents are, which the policy does
  not control.
"""
from stepsearch.rewards.answer import exact_match, f1_score, normalize_answer
from stepsearch.rewards.batch import RewardBatch, TrajectoryReward, score_rollout
from stepsearch.rewards.outcome import INVALID_FORMAT_RULES, OutcomeScore, outcome_reward, outcome_reward_from_config
from stepsearch.rewards.search_key import KEY_AGGREGATIONS, search_key_reward
from stepsearch.rewards.step import (
    REDUNDANCY_IDENTITIES,
    GoldenTfidf,
    step_rewards,
    step_rewards_group,
    tfidf_cosine,
    tfidf_cosine_batch,
)

__all__ = [
    "INVALID_FORMAT_RULES",
    "KEY_AGGREGATIONS",
    "REDUNDANCY_IDENTITIES",
    "GoldenTfidf",
    "OutcomeScore",
    "RewardBatch",
    "TrajectoryReward",
    "exact_match",
    "f1_score",
    "normalize_answer",
    "outcome_reward",
    "outcome_reward_from_config",
    "score_rollout",
    "search_key_reward",
    "step_rewards",
    "step_rewards_group",
    "tfidf_cosine",
    "tfidf_cosine_batch",
]
