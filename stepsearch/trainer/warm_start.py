"""Supervised warm start on gold search trajectories, so that a tiny randomly initialised policy learns the tag
format (think -> search -> read -> answer) before StePPO.

A gold trajectory (`stepsearch.data.gold_trajectory`) gives per hop a sub-question, a reference query and the hop's
answer. It is rendered exactly as the agent loop would produce it, token by token:

    prompt ids                                                            (no loss)
    "<think> {sub-question 1} </think>\\n<search> {query 1} </search>"     (loss)
    "\\n<information>{the retriever's real top-k for query 1}</information>\\n"   (no loss: the environment's text)
    "<think> {evidence 1} {sub-question 2} </think>\\n<search> {query 2} </search>"   (loss)
    ...
    "<think> {evidence n} </think>\\n<answer> {final answer} </answer>"             (loss)

where evidence k is the sentence of hop k's support passage that states its answer (`evidence_sentence`). A
fraction of the demonstrations can take a detour (`DETOURS`): imperfect searching for RL to improve on.
`CheckpointSelector` keeps the weights of the step that answers held-out questions best (`answer_score`).

Each piece is tokenized on its own and the ids are concatenated, and the budgets are the agent loop's, through the
one renderer both use (`stepsearch.rollout.render`): a gold trajectory is laid out exactly as the agent loop would
lay it out if the policy wrote the gold turns, so under tight budgets (`rollout.max_new_tokens_per_turn`,
`max_information_tokens`, `max_response_tokens`, `max_turns`) it is cut where a rollout would be. Training is
next-token cross-entropy on the loss tokens (plus, optionally, on the text the policy reads), AdamW, mini-batches
of similar length drawn with a seeded generator.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from stepsearch.data import gold_trajectory
from stepsearch.data.synth import FreshNames
from stepsearch.rollout.agent_loop import SEARCH_REFUSED_NOTICE
from stepsearch.rollout.prompts import build_prompt_ids
from stepsearch.rollout.render import TrajectoryRenderer, format_documents

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from stepsearch.config import RewardConfig, RolloutConfig
    from stepsearch.data.records import QARecord
    from stepsearch.retrieval.base import Document, Retriever


log = logging.getLogger("stepsearch.trainer")

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def evidence_sentence(doc_text: str, answer: str) -> str:
    """The first sentence of a support passage that states `answer` (case-insensitive), or "" if none does.

    Quoting the evidence before using it is what makes a small model able to read an answer out of a retrieved
    passage: having written "The father of Mibe Tusos was", it continues by copying what followed the same words
    in the information block (an induction pattern that even a 2-layer transformer learns).
    """
    if not answer.strip():
        return ""
    needle = answer.strip().lower()
    for sentence in _SENTENCE_END.split(doc_text.strip()):
        if needle in sentence.lower():
            return sentence.strip()
    return ""


DETOURS = ("question_query", "repeated_query", "early_answer")
"""The imperfect demonstrations a warm start can mix in (`gold_turns(detour=...)`):
`question_query`: the first search sends the whole question (a common first move of weak search agents), whose
results go unused: the first hop is then searched with its reference query; `repeated_query`: one search is sent
twice (the second retrieves nothing new: redundancy); `early_answer`: the trajectory answers with an intermediate
hop's answer instead of finishing the chain. Apart from these, `gold_turns(refused_after=...)` demonstrates the
search limit: no other demonstration ever shows the agent loop's refusal notice, and `gold_turns(bridge_answer=True)`
a reading slip: the whole chain searched, then the hop before the last one's answer given as the final answer."""


QUESTION_SEARCH_THOUGHT = "I search the question."
"""The thought before a question-first search when the demonstration does not restate the question."""


def gold_turns(record: "QARecord", rng: random.Random | None = None, detour: str | None = None,
               question_first: bool = False, refused_after: int | None = None, bridge_answer: bool = False,
               restate_question: bool = True) -> tuple[list[str], list[str]]:
    """(generated turn texts, search queries) of the record's gold trajectory; one more turn than queries.

    Each turn after a search first quotes the passage sentence that answers the hop (its intermediate answer when no
    sentence states it), then asks the next sub-question. `question_first`: the first search sends the question itself
    instead of the first hop's reference query (what `render_gold_examples` chooses when that search retrieves the first
    hop's passage): the question names the entity the chain starts from, so its search needs no name copied out of the
    question, only the question copied; its thought restates the question, or, with `restate_question=False`, is only
    `QUESTION_SEARCH_THOUGHT`, so that the question is copied once. `detour` (one of `DETOURS`, drawn positions from
    `rng`) turns the demonstration into an imperfect one, so that a policy warm-started on a mix is not already optimal
    at searching and RL has something to improve. `refused_after` (the agent loop's `max_turns`): after the chain, the
    last search is repeated until there are `refused_after` + 1 searches, so that the agent loop refuses the last one
    with its notice, and the trajectory then answers. `bridge_answer`: every hop is searched and quoted, but the answer
    given is the answer of the hop before the last (a chain's bridge entity, the first of two compared years, a compared
    person's father): the answer-type slip of a reader that stops one hop short, a mistake that only the answer reward
    can correct. With `detour="early_answer"`, or on a one-hop record, it changes nothing.
    """
    if detour is not None and detour not in DETOURS:
        raise ValueError(f"unknown warm-start detour {detour!r} (expected one of {DETOURS})")
    if refused_after is not None and refused_after < 1:
        raise ValueError(f"refused_after must be >= 1 (the agent loop's max_turns), got {refused_after}")
    gold = gold_trajectory(record, rng)
    rng = rng or random.Random(0)
    steps = list(gold.steps)
    final_answer = gold.final_answer
    if detour == "early_answer" and len(steps) >= 2:
        cut = rng.randrange(1, len(steps))
        if steps[cut - 1].answer:
            steps, final_answer = steps[:cut], steps[cut - 1].answer
    elif bridge_answer and len(steps) >= 2 and steps[-2].answer:
        final_answer = steps[-2].answer
    searches = [(step.sub_question, step.query) for step in steps]
    findings = [_finding(step) for step in steps]
    question = record.question.strip()
    if detour == "question_query":  # with or without `question_first`: the question's results go unused
        searches.insert(0, (question, question.rstrip("?")))
        findings.insert(0, "")
    elif question_first:
        searches[0] = (question if restate_question else QUESTION_SEARCH_THOUGHT, question.rstrip("?"))
    if detour == "repeated_query":
        again = rng.randrange(len(searches))
        searches.insert(again + 1, searches[again])
        findings.insert(again + 1, findings[again])
    if refused_after is not None:
        while len(searches) <= refused_after:
            searches.append(searches[-1])
            findings.append(findings[-1])
    turns, queries, previous = [], [], ""
    for (sub_question, query), finding in zip(searches, findings):
        thought = f"{previous} {sub_question}".strip()
        turns.append(f"<think> {thought} </think>\n<search> {query} </search>")
        queries.append(query)
        previous = finding
    turns.append(f"<think> {previous or 'I have the answer.'} </think>\n<answer> {final_answer} </answer>")
    return turns, queries


def _finding(step) -> str:
    """What a hop's search established, as the next thought starts: the evidence sentence, else the answer."""
    quoted = evidence_sentence(step.doc.text, step.answer)
    if quoted:
        return quoted if quoted.endswith((".", "!", "?")) else quoted + "."
    return f"{step.answer}." if step.answer else ""


def render_gold_examples(records: Sequence["QARecord"], tokenizer: "PreTrainedTokenizerBase", retriever: "Retriever",
                         rollout_cfg: "RolloutConfig", topk: int, seed: int = 0,
                         detour_prob: float = 0.0, question_first: bool = False,
                         fresh_names_avoiding: set[str] | frozenset[str] | None = None, limit_prob: float = 0.0,
                         bridge_answer_prob: float = 0.0, restate_question: bool = True,
                         ) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) per record with a gold trajectory; records without one are skipped.

    With `question_first`, a record whose question, searched as is, retrieves its first hop's passage is
    demonstrated starting with that search (`gold_turns(question_first=True, restate_question=...)`). With
    probability `detour_prob` a record's demonstration takes one of the `DETOURS` (drawn uniformly); with
    probability `limit_prob` (drawn from a stream of its own, so that 0 changes nothing else) it then repeats its
    last search until the agent loop refuses one, and answers (`gold_turns(refused_after=rollout_cfg.max_turns)`);
    with probability `bridge_answer_prob` (a stream of its own as well) it answers with the hop before the last
    one's answer (`gold_turns(bridge_answer=True)`). With `fresh_names_avoiding` (the world's own names), each
    demonstration is searched with the world's names and then rendered with its made-up names renamed to fresh ones
    (`synth.FreshNames`), its question, turns and retrieved passages alike.
    """
    rng = random.Random(seed)
    limit_rng = random.Random(f"search-limit-{seed}")
    slip_rng = random.Random(f"bridge-answer-{seed}")
    renamers = _renamers(fresh_names_avoiding, seed)
    records = list(records)
    question_hits = _question_finds_first_hop(records, retriever, topk) if question_first else [False] * len(records)
    rendered = []
    for record, hit in zip(records, question_hits):
        detour = rng.choice(DETOURS) if detour_prob > 0 and rng.random() < detour_prob else None
        refused_after = rollout_cfg.max_turns if limit_prob > 0 and limit_rng.random() < limit_prob else None
        slip = bridge_answer_prob > 0 and slip_rng.random() < bridge_answer_prob
        try:
            turns, queries = gold_turns(record, rng, detour, question_first=hit, refused_after=refused_after,
                                        bridge_answer=slip, restate_question=restate_question)
        except ValueError:
            continue
        rendered.append((record, turns, queries))
    all_queries = [q for _, _, queries in rendered for q in queries]
    results = iter(retriever.search(all_queries, topk) if all_queries else [])
    renderer = TrajectoryRenderer(tokenizer, rollout_cfg)
    examples, cut = [], 0
    for record, turns, queries in rendered:
        rename = next(renamers)
        documents = [[dataclasses.replace(doc, title=rename(doc.title), text=rename(doc.text)) for doc in next(results)]
                     for _ in queries]
        response, loss_mask, complete = _render_response(renderer, [rename(turn) for turn in turns], documents)
        cut += not complete
        prompt = build_prompt_ids(tokenizer, rename(record.question), rollout_cfg.template)
        examples.append((prompt + response, [0] * len(prompt) + loss_mask))
    if cut:
        log.warning("%d of %d warm-start demonstrations do not fit the rollout budgets (rollout."
                    "max_new_tokens_per_turn, max_response_tokens, max_information_tokens) and are trained cut, where "
                    "a rollout would stop", cut, len(examples))
    return examples


def _renamers(avoid: set[str] | frozenset[str] | None, seed: int) -> Iterator[Callable[[str], str]]:
    """One text transform per demonstration: a fresh `FreshNames` each (own seeded stream), or the identity."""
    if avoid is None:
        return itertools.repeat(str)
    rng = random.Random(f"fresh-names-{seed}")
    return (FreshNames(rng, avoid) for _ in itertools.count())


def _question_finds_first_hop(records: list["QARecord"], retriever: "Retriever", topk: int) -> list[bool]:
    """Per record: does searching its question retrieve the first hop's support passage in the top `topk`?"""
    hits = [False] * len(records)
    searchable = [i for i, r in enumerate(records) if r.support_docs and r.question.strip()]
    if not searchable:
        return hits
    results = retriever.search([records[i].question.strip().rstrip("?") for i in searchable], topk)
    for index, docs in zip(searchable, results):
        wanted = records[index].support_docs[0].text.strip()
        hits[index] = any(doc.text.strip() == wanted for doc in docs)
    return hits


def _render_response(renderer: TrajectoryRenderer, turns: list[str],
                     documents: list[list["Document"]]) -> tuple[list[int], list[int], bool]:
    """(response ids, loss mask, whether the last turn is laid out in full) of a gold trajectory as the agent loop
    would lay it out if the policy wrote the gold turns: a turn longer than its allowance is cut and ends the
    trajectory, a block that no longer fits ends it, and the search after `max_turns` searches gets the refusal
    notice, after which the next turn is the last."""
    ids: list[int] = []
    mask: list[int] = []
    refused = complete = False
    for index, turn in enumerate(turns):
        turn_ids = renderer.tokenizer.encode(turn, add_special_tokens=False)
        allowance = renderer.turn_allowance(len(ids))
        ids, mask = ids + turn_ids[:allowance], mask + [1] * min(len(turn_ids), allowance)
        complete = index == len(turns) - 1 and len(turn_ids) <= allowance
        if len(turn_ids) > allowance or refused or index >= len(documents):
            break
        body_budget = renderer.body_budget(len(ids))
        if body_budget is None:
            break
        refused = index >= renderer.cfg.max_turns
        body = SEARCH_REFUSED_NOTICE if refused else format_documents(documents[index])
        [block] = renderer.blocks([body], [body_budget])
        ids, mask = ids + block, mask + [0] * len(block)
    return ids, mask, complete


def supervised_warm_start(model: "PreTrainedModel", examples: Sequence[tuple[list[int], list[int]]], pad_token_id: int,
                          *, steps: int, lr: float, batch_size: int = 16, seed: int = 0, reading_weight: float = 0.0,
                          first_turn_steps: int = 0, first_turns: Sequence[tuple[list[int], list[int]]] | None = None,
                          after_step: Callable[[int], None] | None = None, progress: bool = True) -> list[float]:
    """`steps` AdamW steps of masked next-token loss on `examples`; returns the loss per step (model left in eval).

    The loss is the mean cross-entropy of the policy's tokens (loss mask 1). With `reading_weight` > 0 the other
    tokens (the question's prompt and the retrieved passages) add `reading_weight` times their own mean
    cross-entropy: a model that starts from random weights, unlike a pretrained checkpoint, has never read text,
    and reading the passages teaches it their wording and names. The returned loss is the policy part.

    `first_turn_steps` of the `steps` come first and train on first turns only (the prompt and the first
    think/search: `first_turns`, by default each example cut after its first generated turn), in batches four times
    larger: a few times cheaper than whole trajectories, they teach the first thing every trajectory needs,
    carrying the question's names into the first search. Given a pool of first turns much larger than the
    examples (`render_first_turns`), that is copying: too many names to recall them.

    `after_step(n)` runs after optimizer step n (1-based) with the model in training mode, and leaves it so (e.g. a
    `CheckpointSelector`).

    Learning rate: linear warm-up over the first 5% of the steps, then cosine decay to a tenth. Batches group
    examples of similar length (drawn at random, sorted within a pool of eight batches), which cuts padding; the
    vocabulary projection runs only at the positions that carry loss (about a tenth of a search trajectory's
    tokens: the prompt and the information blocks carry none).
    """
    if not examples:
        raise ValueError("warm start: no record has a gold trajectory (one search key and support doc per hop)")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    first_turn_steps = min(first_turn_steps, steps)
    if first_turns is None:
        first_turns = [_first_turn(ids, mask) for ids, mask in examples]
    batches = [(first_turns, chosen) for chosen in _length_grouped_batches(first_turns, 4 * batch_size,
                                                                           first_turn_steps, seed)]
    batches += [(examples, chosen) for chosen in _length_grouped_batches(examples, batch_size,
                                                                         steps - first_turn_steps, seed + 1)]
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="warm start", unit="step")
    losses = []
    model.train()
    for source, chosen in batches:
        width = max(len(source[i][0]) for i in chosen)
        input_ids = torch.full((len(chosen), width), pad_token_id, dtype=torch.long)  # (B, L)
        attention_mask = torch.zeros((len(chosen), width), dtype=torch.long)  # (B, L)
        loss_mask = torch.zeros((len(chosen), width), dtype=torch.bool)  # (B, L)
        for row, index in enumerate(chosen):
            ids, mask = source[index]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
            loss_mask[row, :len(ids)] = torch.tensor(mask, dtype=torch.bool)
        input_ids, attention_mask, loss_mask = input_ids.to(device), attention_mask.to(device), loss_mask.to(device)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        targets = input_ids[:, 1:]  # (B, L-1): position p predicts token p+1
        policy = loss_mask[:, 1:]  # (B, L-1)
        policy_loss = torch.nn.functional.cross_entropy(head(hidden[:, :-1][policy]).float(), targets[policy])
        loss = policy_loss
        if reading_weight > 0:
            reading = attention_mask[:, 1:].bool() & ~policy  # (B, L-1)
            loss = loss + reading_weight * torch.nn.functional.cross_entropy(
                head(hidden[:, :-1][reading]).float(), targets[reading])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(policy_loss.detach())
        if after_step is not None:
            after_step(len(losses))
        if bar is not None:
            bar.update(1)
            if len(losses) % 25 == 0:
                bar.set_postfix(loss=f"{losses[-1].item():.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return torch.stack(losses).tolist() if losses else []


def answer_score(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", retriever: "Retriever",
                 records: Sequence["QARecord"], rollout_cfg: "RolloutConfig", reward_cfg: "RewardConfig", topk: int,
                 max_query_chars: int = 512) -> dict[str, float]:
    """Greedy agent rollouts of `model` on `records`: {"score", "f1", "valid_format"}, where score is the mean of
    the answer F1, or `reward_cfg.format_penalty` for an invalid format (the outcome reward without its search-key
    term, so that it ranks answers, not searches)."""
    from stepsearch.eval import evaluate
    from stepsearch.rollout.engine import HFEngine

    with torch.no_grad():
        result = evaluate(HFEngine(model, tokenizer), retriever, tokenizer, {"held_out": records}, rollout_cfg, topk,
                          max_query_chars=max_query_chars, progress=False, reward_cfg=reward_cfg)
    rows = result.trajectories["held_out"]
    scores = [row["f1"] if row["valid_format"] else reward_cfg.format_penalty for row in rows]
    return {"score": sum(scores) / len(scores), "f1": result.datasets["held_out"].f1,
            "valid_format": result.datasets["held_out"].valid_format_rate}


class CheckpointSelector:
    """An `after_step` for `supervised_warm_start` that scores the model every `every` steps from half of `steps`
    on, and at the last step, with `score(model)` (a dict with a "score" key, higher is better), and keeps a copy
    of the best weights (the later step on a tie); `restore()` loads them back. A warm start's last step is not
    always its best: a tiny policy's greedy trajectories can start looping or searching past the limit while its
    training loss still falls."""

    def __init__(self, model: "PreTrainedModel", score: Callable[["PreTrainedModel"], dict[str, float]], every: int,
                 steps: int) -> None:
        if every < 1:
            raise ValueError(f"CheckpointSelector: every must be >= 1, got {every}")
        self.model, self.score, self.every, self.steps = model, score, every, steps
        self.history: list[dict[str, float]] = []
        self.best_step = 0
        self._best_score = -math.inf
        self._best_weights: dict[str, torch.Tensor] | None = None

    def __call__(self, step: int) -> None:
        if step != self.steps and (step % self.every or 2 * step < self.steps):
            return
        was_training = self.model.training
        self.model.eval()
        result = {"step": step, **self.score(self.model)}
        self.model.train(was_training)
        self.history.append(result)
        if result["score"] >= self._best_score:
            self.best_step, self._best_score = step, result["score"]
            self._best_weights = {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()}

    def restore(self) -> None:
        """Load the best-scoring weights into the model (nothing to do before the first evaluation)."""
        if self._best_weights is not None:
            self.model.load_state_dict(self._best_weights)


def render_first_turns(records: Sequence["QARecord"], tokenizer: "PreTrainedTokenizerBase", retriever: "Retriever",
                       rollout_cfg: "RolloutConfig", topk: int,
                       question_first: bool = False, seed: int = 0,
                       fresh_names_avoiding: set[str] | frozenset[str] | None = None, restate_question: bool = True,
                       ) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) of each record's prompt and first gold turn, the start `render_gold_examples` would
    give it without a detour (with `fresh_names_avoiding`, each renamed with fresh names of its own); no search
    results are rendered, so a large pool costs little."""
    records = list(records)
    renamers = _renamers(fresh_names_avoiding, seed + 1)
    hits = _question_finds_first_hop(records, retriever, topk) if question_first else [False] * len(records)
    allowance = TrajectoryRenderer(tokenizer, rollout_cfg).turn_allowance(0)  # the agent loop's first-turn cut
    rendered = []
    for record, hit in zip(records, hits):
        try:
            turns, _ = gold_turns(record, None, None, question_first=hit, restate_question=restate_question)
        except ValueError:
            continue
        rename = next(renamers)
        prompt = build_prompt_ids(tokenizer, rename(record.question), rollout_cfg.template)
        turn = tokenizer.encode(rename(turns[0]), add_special_tokens=False)[:allowance]
        rendered.append((prompt + turn, [0] * len(prompt) + [1] * len(turn)))
    return rendered


def _first_turn(ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
    """The example cut after its first run of loss tokens (the prompt and the first generated turn)."""
    start = mask.index(1) if 1 in mask else len(mask)
    end = start
    while end < len(mask) and mask[end]:
        end += 1
    return ids[:end], mask[:end]


def _length_grouped_batches(examples: Sequence[tuple[list[int], list[int]]], batch_size: int, steps: int,
                            seed: int, pool_batches: int = 8) -> list[list[int]]:
    """`steps` batches of example indices: pools of `pool_batches` random batches, sorted by length within the
    pool and cut into batches again, in shuffled order."""
    generator = torch.Generator().manual_seed(seed)
    size = min(batch_size, len(examples))
    batches: list[list[int]] = []
    while len(batches) < steps:
        pool = torch.randint(len(examples), (size * pool_batches,), generator=generator).tolist()
        pool.sort(key=lambda index: len(examples[index][0]))
        group = [pool[i:i + size] for i in range(0, len(pool), size)]
        order = torch.randperm(len(group), generator=generator).tolist()
        batches += [group[i] for i in order]
    return batches[:steps]
