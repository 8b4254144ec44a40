"""Supervised warm start on gold search trajectories, so that a tiny randomly initialised policy learns the tag
format (think -> search -> read -> answer) before StePPO.

A gold trajectory (`stepsearch.data.gold_trajectory`) gives per hop a sub-question, a reference query and the hop's
answer. It is rendered exactly as the agent loop would produce it, token by token:

    prompt ids                                                            (no loss)
    "<think> {sub-question 1} </think>\\n<search> {query 1} </search>"     (loss)
    "\\n<information>{the retriever's real top-k for query 1}</information>\\n"   (no loss: the environment's text)
    "<think> {answer 1}. {sub-question 2} </think>\\n<search> {query 2} </search>"  (loss)
    ...
    "<think> {answer n}. </think>\\n<answer> {final answer} </answer>"       (loss)

Each piece is tokenized on its own and the ids are concatenated, and the budgets are the agent loop's, through the
one renderer both use (`stepsearch.rollout.render`): a gold trajectory is laid out exactly as the agent loop would
lay it out if the policy wrote the gold turns, so under tight budgets (`rollout.max_new_tokens_per_turn`,
`max_information_tokens`, `max_response_tokens`, `max_turns`) it is cut where a rollout would be. Training is
next-token cross-entropy on the loss tokens, AdamW, mini-batches drawn with a seeded generator.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from stepsearch.data import gold_trajectory
from stepsearch.rollout.agent_loop import SEARCH_REFUSED_NOTICE
from stepsearch.rollout.prompts import build_prompt_ids
from stepsearch.rollout.render import TrajectoryRenderer, format_documents

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from stepsearch.config import RolloutConfig
    from stepsearch.data.records import QARecord
    from stepsearch.retrieval.base import Document, Retriever


def gold_turns(record: "QARecord", rng: random.Random | None = None) -> tuple[list[str], list[str]]:
    """(generated turn texts, search queries) of the record's gold trajectory; one more turn than queries."""
    gold = gold_trajectory(record, rng)
    turns, queries, previous_answer = [], [], ""
    for step in gold.steps:
        thought = f"{previous_answer}. {step.sub_question}" if previous_answer else step.sub_question
        turns.append(f"<think> {thought.strip()} </think>\n<search> {step.query} </search>")
        queries.append(step.query)
        previous_answer = step.answer
    closing = f"{previous_answer}." if previous_answer else "I have the answer."
    turns.append(f"<think> {closing} </think>\n<answer> {gold.final_answer} </answer>")
    return turns, queries


def render_gold_examples(records: Sequence["QARecord"], tokenizer: "PreTrainedTokenizerBase", retriever: "Retriever",
                         rollout_cfg: "RolloutConfig", topk: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) per record with a gold trajectory; records without one are skipped."""
    rng = random.Random(seed)
    rendered = []
    for record in records:
        try:
            turns, queries = gold_turns(record, rng)
        except ValueError:
            continue
        rendered.append((record, turns, queries))
    all_queries = [q for _, _, queries in rendered for q in queries]
    results = iter(retriever.search(all_queries, topk) if all_queries else [])
    renderer = TrajectoryRenderer(tokenizer, rollout_cfg)
    examples = []
    for record, turns, queries in rendered:
        response, loss_mask = _render_response(renderer, turns, [next(results) for _ in queries])
        prompt = build_prompt_ids(tokenizer, record.question, rollout_cfg.template)
        examples.append((prompt + response, [0] * len(prompt) + loss_mask))
    return examples


def _render_response(renderer: TrajectoryRenderer, turns: list[str],
                     documents: list[list["Document"]]) -> tuple[list[int], list[int]]:
    """(response ids, loss mask) of a gold trajectory as the agent loop would lay it out if the policy wrote the gold
    turns: a turn longer than its allowance is cut and ends the trajectory, a block that no longer fits ends it, and
    the search after `max_turns` searches gets the refusal notice, after which the next turn is the last."""
    ids: list[int] = []
    mask: list[int] = []
    refused = False
    for index, turn in enumerate(turns):
        turn_ids = renderer.tokenizer.encode(turn, add_special_tokens=False)
        allowance = renderer.turn_allowance(len(ids))
        ids, mask = ids + turn_ids[:allowance], mask + [1] * min(len(turn_ids), allowance)
        if len(turn_ids) > allowance or refused or index >= len(documents):
            break
        body_budget = renderer.body_budget(len(ids))
        if body_budget is None:
            break
        refused = index >= renderer.cfg.max_turns
        body = SEARCH_REFUSED_NOTICE if refused else format_documents(documents[index])
        [block] = renderer.blocks([body], [body_budget])
        ids, mask = ids + block, mask + [0] * len(block)
    return ids, mask


def supervised_warm_start(model: "PreTrainedModel", examples: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                          *, steps: int, lr: float, batch_size: int = 16, seed: int = 0,
                          progress: bool = True) -> list[float]:
    """`steps` AdamW steps of masked next-token loss on `examples`; returns the loss per step (model left in eval)."""
    if not examples:
        raise ValueError("warm start: no record has a gold trajectory (one search key and support doc per hop)")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
    generator = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="warm start", unit="step")
    losses = []
    model.train()
    for _ in range(steps):
        chosen = torch.randint(len(examples), (min(batch_size, len(examples)),), generator=generator).tolist()
        width = max(len(examples[i][0]) for i in chosen)
        input_ids = torch.full((len(chosen), width), pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(chosen), width), dtype=torch.long)  # (B, L)
        labels = torch.full((len(chosen), width), -100, dtype=torch.long)  # (B, L)
        for row, index in enumerate(chosen):
            ids, mask = examples[index]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
            labels[row, :len(ids)] = torch.where(torch.tensor(mask, dtype=torch.bool), torch.tensor(ids), -100)
        loss = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                     labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return torch.stack(losses).tolist() if losses else []
