"""The multi-turn search agent: generate, search, insert the results, repeat; one `RolloutBatch` out.

Per turn, every active trajectory is continued by the engine until `</search>` or `</answer>` (or a budget). Token
ids are kept from sampling to loss: the prompt plus the response so far is fed back as ids, and the inserted text
is tokenized on its own, never the trajectory. Outcomes of a turn, decided here and pinned by tests:

- `</answer>` closes the turn: the trajectory is done ("answer").
- `</search>` closes the turn: the query is the content of the search block it closes, as the segmenter reads it
  from the turn's token ids (stripped; the retriever gets its first `max_query_chars` characters). A non-empty
  query is searched (all queries of a turn in one `retriever.search` call) and
  "\\n<information>Doc 1(Title: t) text\\nDoc 2(Title: …) …</information>\\n" is appended with loss mask 0. An
  empty query gets an information block holding a short notice instead of documents. After `max_turns`
  information blocks, a further search is refused with a notice block, and the turn after the refusal is the
  last one. Every `</search>` that received an information block (notices included) is a step; `retrieved` has
  one entry per step (a notice step retrieved nothing, which gives step reward 0), and `num_searches` counts only
  the steps that searched.
- Segmentation: which token spans were inserted is known only here, so the finished trajectories are segmented
  here, once, by the C++ segmenter (`stepsearch.rollout.segmenter`, span rule): the loss mask (0 exactly on the
  inserted spans, newlines around each block included), the step ends, the step queries, the answer and the format
  verdict of the `RolloutBatch` all come from that one segmentation of the token ids, for training and evaluation.
  Which tag closed a turn, and its query, come from the segmenter too (on the turn's ids).
- The end-of-sequence token: done ("eos"). The per-turn token budget without a closing tag (a model that never
  closes a tag): done ("turn_budget"); the round is dropped and the format reward applies.
- Budgets (`stepsearch.rollout.render`, shared with the warm start): `max_new_tokens_per_turn`,
  `max_information_tokens` per block (the document text is truncated so that the block still closes),
  `max_response_tokens` in total. A block that cannot fit while leaving room for one more generated token is not
  inserted and the trajectory ends ("budget"), as it does when generation fills the budget.
- Row groups (`row_groups`): the trajectories advance in independent groups, each turn-synchronous on its own, so
  a turn waits only for the slowest row of its group and a group's retrieval overlaps the others' generation. The
  rules above hold per trajectory whatever the grouping; a fixed grouping gives a reproducible rollout.
- A retriever failure raises `RetrieverError` naming the turn and the queries (the HTTP client has already retried
  with backoff). Training on notices in place of a broken retriever would teach the policy the wrong environment,
  so the rollout stops and the trainer's last checkpoint stays the resume point.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from stepsearch.retrieval.base import Document, RetrieverError
from stepsearch.rollout.prompts import build_prompt_ids
from stepsearch.rollout.render import TrajectoryRenderer, format_documents
from stepsearch.rollout.segmenter import Segmentation, TagTable, segment_batch
from stepsearch.rollout.types import RolloutBatch
from stepsearch.seeds import derive_seed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from stepsearch.config import RolloutConfig
    from stepsearch.data.records import QARecord
    from stepsearch.retrieval.base import Retriever
    from stepsearch.rollout.engine import Engine

SEARCH_CLOSE = "</search>"
SEARCH_OPEN = "<search>"
ANSWER_CLOSE = "</answer>"
STOP_STRINGS = [SEARCH_CLOSE, ANSWER_CLOSE]
EMPTY_QUERY_NOTICE = "The search query was empty: write the query text between the search tags."
SEARCH_REFUSED_NOTICE = "Search limit reached: no more searches are allowed. Give the final answer now."


_TAG_TABLES: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, TagTable]" = weakref.WeakKeyDictionary()


def agent_tag_table(tokenizer: "PreTrainedTokenizerBase") -> TagTable:
    """The segmenter's table of `tokenizer` (built once per tokenizer). Special tokens contribute no bytes, so an
    end-of-sequence token after `</answer>` leaves the format valid, as in the decoded response text."""
    table = _TAG_TABLES.get(tokenizer)
    if table is None:
        table = _TAG_TABLES[tokenizer] = TagTable.from_tokenizer(tokenizer, skip_special_tokens=True)
    return table


@dataclass
class _Trajectory:
    record_index: int
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    inserted: list[tuple[int, int]] = field(default_factory=list)  # token spans [start, end) of the blocks
    retrieved: list[list[Document]] = field(default_factory=list)
    num_searches: int = 0
    refused: bool = False
    finish_reason: str | None = None

    def extend(self, token_ids: list[int], logprobs: list[float] | None) -> None:
        """Generated tokens (logprobs given) or an inserted block (None: logp 0, span recorded)."""
        if logprobs is None:
            self.inserted.append((len(self.ids), len(self.ids) + len(token_ids)))
            self.logp.extend([0.0] * len(token_ids))
        else:
            self.logp.extend(logprobs)
        self.ids.extend(token_ids)


@dataclass
class _PendingBlock:
    """An information block owed to a trajectory whose turn ended with `</search>`."""

    trajectory: _Trajectory
    query: str
    notice: str | None  # set for empty-query and refused searches; None = search `query`
    docs: list[Document] = field(default_factory=list)


def closing_tag_and_query(turn: Segmentation) -> tuple[str | None, str]:
    """Which stop string ended a turn (the first `</search>` or `</answer>` tag of its segmentation: the engine
    stops there) and, for `</search>`, the query of the search block it closes ("" when it closes none)."""
    opened = False
    for tag in turn.tags:
        if tag.name == SEARCH_OPEN:
            opened = True
        elif tag.name in STOP_STRINGS:
            # Queries are numbered in closing order, so the first `</search>` closes queries[0] when it pairs.
            return tag.name, (turn.queries[0] if tag.name == SEARCH_CLOSE and opened else "")
    return None, ""


@dataclass
class _LoopState:
    """What the row groups of one rollout share. `lock` guards everything but the engine and retriever calls."""

    engine: "Engine"
    retriever: "Retriever"
    renderer: TrajectoryRenderer
    table: TagTable
    rollout_cfg: "RolloutConfig"
    topk: int
    temperature: float
    seed: int | None
    max_query_chars: int
    num_groups: int
    timings: dict[str, float]
    bar: object | None
    retrieval: "_RetrievalBatcher | None" = None  # several groups: one retrieval thread merging their searches
    lock: threading.RLock = field(default_factory=threading.RLock)
    failed: bool = False


class _RetrievalBatcher:
    """One retrieval thread fed by the row groups: every search queued while the previous call ran goes out as one
    `retriever.search` call (a retriever never sees two calls at once), and each group gets its own results."""

    def __init__(self, retriever: "Retriever", topk: int) -> None:
        self._retriever, self._topk = retriever, topk
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="rollout-retrieval", daemon=True)
        self._thread.start()

    def search(self, queries: list[str]) -> list[list[Document]]:
        done: Future = Future()
        self._requests.put((queries, done))
        return done.result()

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join()

    def _serve(self) -> None:
        while True:
            request = self._requests.get()
            if request is None:
                return
            batch = [request]
            while True:
                try:
                    request = self._requests.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    self._requests.put(None)  # serve what is queued, then stop
                    break
                batch.append(request)
            merged = [query for queries, _ in batch for query in queries]
            try:
                results = self._retriever.search(merged, self._topk)
                if len(results) != len(merged):
                    raise RetrieverError(f"the retriever returned {len(results)} result lists for {len(merged)} "
                                         "queries")
            except BaseException as exc:  # handed to every waiting group, which raises it with its own context
                for _, done in batch:
                    done.set_exception(exc)
                continue
            offset = 0
            for queries, done in batch:
                done.set_result(results[offset:offset + len(queries)])
                offset += len(queries)


def run_agent_loop(engine: "Engine", retriever: "Retriever", tokenizer: "PreTrainedTokenizerBase",
                   records: Sequence["QARecord"], rollout_cfg: "RolloutConfig", *, topk: int, greedy: bool = False,
                   seed: int | None = None, samples_per_prompt: int | None = None, max_query_chars: int = 512,
                   progress: bool = False, tag_table: TagTable | None = None, row_groups: int = 1) -> RolloutBatch:
    """Roll out `samples_per_prompt` (default `rollout_cfg.samples_per_prompt`) trajectories per record.

    Trajectories are record-major (`record_indices` = 0,0,…,1,1,…). `greedy` decodes with temperature 0; otherwise
    `rollout_cfg.temperature`/`top_p`. `seed` makes sampling reproducible for a given engine. `tag_table`: the
    segmenter's table of `tokenizer` (default `agent_tag_table(tokenizer)`).

    `row_groups`: the trajectories are dealt round-robin into this many groups, each advancing through its own turns
    in its own thread, so a turn waits only for the slowest row of its group, and one group's retrieval overlaps the
    generation of the others; one retrieval thread sends the searches queued meanwhile as one call. An engine with
    `concurrent_calls = True` (SGLang, in-process or over HTTP) serves the groups' calls at once (its scheduler
    batches them); any other engine runs one call at a time. Each group's engine calls and their seeds depend only
    on the group, never on thread timing, so a fixed `row_groups` gives reproducible rollouts; 1 is the
    turn-synchronous loop. Timings are summed over groups (they can exceed `total_s`).
    """
    if row_groups < 1:
        raise ValueError(f"row_groups must be >= 1, got {row_groups}")
    table = agent_tag_table(tokenizer) if tag_table is None else tag_table
    start = time.perf_counter()
    timings = {"generate_s": 0.0, "retrieve_s": 0.0, "segment_s": 0.0}
    samples = rollout_cfg.samples_per_prompt if samples_per_prompt is None else samples_per_prompt
    if samples < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples}")

    trajectories: list[_Trajectory] = []
    for record_index, record in enumerate(records):
        prompt_ids = build_prompt_ids(tokenizer, record.question, rollout_cfg.template)
        trajectories.extend(_Trajectory(record_index, list(prompt_ids)) for _ in range(samples))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(trajectories), desc="rollout", unit="traj", leave=False)
    groups = [trajectories[g::row_groups] for g in range(min(row_groups, len(trajectories)))]
    state = _LoopState(engine, retriever, TrajectoryRenderer(tokenizer, rollout_cfg), table, rollout_cfg, topk,
                       0.0 if greedy else rollout_cfg.temperature, seed, max_query_chars, len(groups), timings, bar)
    if len(groups) <= 1:
        turns = [_advance_group(state, 0, group) for group in groups]
    else:
        state.retrieval = _RetrievalBatcher(retriever, topk)
        try:
            with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="rollout-group",
                                    initializer=_use_cuda_device, initargs=(_current_cuda_device(),)) as pool:
                futures = [pool.submit(_advance_group, state, index, group) for index, group in enumerate(groups)]
                turns = [future.result() for future in futures]
        finally:
            state.retrieval.close()
    if bar is not None:
        bar.close()

    tick = time.perf_counter()
    batch = _to_batch(trajectories, tokenizer, table, timings)
    batch.timings["bookkeeping_s"] = max(time.perf_counter() - start - timings["generate_s"] - timings["retrieve_s"]
                                         - batch.timings["segment_s"], 0.0)
    batch.timings["total_s"] = time.perf_counter() - start
    batch.timings["collate_s"] = time.perf_counter() - tick
    batch.timings["turns"] = float(max(turns, default=0))
    return batch


def _current_cuda_device() -> int | None:
    return torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None


def _use_cuda_device(device: int | None) -> None:
    """A new thread's CUDA device is device 0 whatever its rank's is: the group threads take the caller's, so the
    CUDA calls they make (the SGLang engine's `empty_cache` before it resumes its memory) stay on the rank's GPU."""
    if device is not None:
        torch.cuda.set_device(device)


def _advance_group(state: _LoopState, group_index: int, trajectories: list[_Trajectory]) -> int:
    """Run one group of trajectories turn by turn until all are done; returns its number of turns."""
    engine_is_concurrent = getattr(state.engine, "concurrent_calls", False)
    budget = state.rollout_cfg.max_response_tokens
    call_index = 0
    turn = 0
    active = list(trajectories)
    try:
        with state.lock:
            while active and not state.failed:
                # 1. generate: one engine call per distinct token allowance (all equal except near the total budget)
                by_allowance: dict[int, list[_Trajectory]] = defaultdict(list)
                for trajectory in active:
                    by_allowance[state.renderer.turn_allowance(len(trajectory.ids))].append(trajectory)
                pending: list[_PendingBlock] = []
                for allowance, group in by_allowance.items():
                    prompts = [t.prompt_ids + t.ids for t in group]
                    # Seeds depend on (group, call) only: call k of group g is stream position k * groups + g.
                    seed = (None if state.seed is None
                            else derive_seed(state.seed, "generate", call_index * state.num_groups + group_index))
                    tick = time.perf_counter()
                    with _released(state.lock) if engine_is_concurrent else nullcontext():
                        generations = state.engine.generate(
                            prompts, max_new_tokens=allowance, stop_strings=STOP_STRINGS,
                            temperature=state.temperature, top_p=state.rollout_cfg.top_p, seed=seed,
                        )
                    state.timings["generate_s"] += time.perf_counter() - tick
                    call_index += 1
                    tick = time.perf_counter()
                    turns = segment_batch([generation.token_ids for generation in generations], state.table,
                                          inserted=[[] for _ in generations])
                    state.timings["segment_s"] += time.perf_counter() - tick
                    for trajectory, generation, turn_segmentation in zip(group, generations, turns):
                        trajectory.extend(generation.token_ids, generation.logprobs)
                        block = _end_of_turn(trajectory, turn_segmentation, generation.finish_reason,
                                             state.rollout_cfg, budget, state.max_query_chars)
                        if block is not None:
                            pending.append(block)

                # 2. retrieve: every query of this group's turn in one call, the other groups running meanwhile
                to_search = [block for block in pending if block.notice is None]
                if to_search:
                    queries = [block.query for block in to_search]
                    with _released(state.lock):
                        tick = time.perf_counter()
                        results = _search(state, queries, turn)
                        elapsed = time.perf_counter() - tick
                    state.timings["retrieve_s"] += elapsed
                    for block, docs in zip(to_search, results):
                        block.docs = list(docs)

                # 3. insert the information blocks (or end trajectories that have no room for one)
                _insert_blocks(pending, state.renderer)

                still_active = [t for t in active if t.finish_reason is None]
                if state.bar is not None:
                    state.bar.update(len(active) - len(still_active))
                active = still_active
                turn += 1
    except BaseException:
        state.failed = True  # the other groups stop at their next turn instead of rolling out for nothing
        raise
    return turn


def _search(state: _LoopState, queries: list[str], turn: int) -> list[list[Document]]:
    try:
        if state.retrieval is not None:
            return state.retrieval.search(queries)
        results = state.retriever.search(queries, state.topk)
    except Exception as exc:
        shown = ", ".join(repr(q[:60]) for q in queries[:3]) + (" …" if len(queries) > 3 else "")
        raise RetrieverError(f"retrieval failed in rollout turn {turn} for {len(queries)} queries ({shown}): "
                             f"{exc}") from exc
    if len(results) != len(queries):
        raise RetrieverError(f"the retriever returned {len(results)} result lists for {len(queries)} queries")
    return results


@contextmanager
def _released(lock: threading.RLock) -> Iterator[None]:
    """Let the other groups run while this one waits on the engine or the retriever."""
    lock.release()
    try:
        yield
    finally:
        lock.acquire()


def _end_of_turn(trajectory: _Trajectory, turn: Segmentation, finish_reason: str, rollout_cfg: "RolloutConfig",
                 budget: int, max_query_chars: int) -> _PendingBlock | None:
    """Decide what follows a turn: done (sets finish_reason) or an information block owed (returned)."""
    closing, query = closing_tag_and_query(turn) if finish_reason == "stop" else (None, "")
    if closing == ANSWER_CLOSE:
        trajectory.finish_reason = "answer"
        return None
    if closing is None:
        if finish_reason == "eos":
            trajectory.finish_reason = "eos"
        else:
            trajectory.finish_reason = "budget" if len(trajectory.ids) >= budget else "turn_budget"
        return None
    if trajectory.refused:
        trajectory.finish_reason = "search_limit"
        return None
    query = query[:max_query_chars].strip()
    if len(trajectory.inserted) >= rollout_cfg.max_turns:
        trajectory.refused = True
        return _PendingBlock(trajectory, query, notice=SEARCH_REFUSED_NOTICE)
    if not query:
        return _PendingBlock(trajectory, query, notice=EMPTY_QUERY_NOTICE)
    return _PendingBlock(trajectory, query, notice=None)


def _insert_blocks(pending: list[_PendingBlock], renderer: TrajectoryRenderer) -> None:
    fitting, body_budgets = [], []
    for block in pending:
        body_budget = renderer.body_budget(len(block.trajectory.ids))
        if body_budget is None:
            block.trajectory.finish_reason = "budget"
            continue
        fitting.append(block)
        body_budgets.append(body_budget)
    bodies = [block.notice if block.notice is not None else format_documents(block.docs) for block in fitting]
    for block, tokens in zip(fitting, renderer.blocks(bodies, body_budgets)):
        trajectory = block.trajectory
        trajectory.extend(tokens, None)
        trajectory.retrieved.append(block.docs)
        trajectory.num_searches += block.notice is None


def _to_batch(trajectories: list[_Trajectory], tokenizer: "PreTrainedTokenizerBase", table: TagTable,
              timings: dict[str, float]) -> RolloutBatch:
    tick = time.perf_counter()
    segmentation = segment_batch([t.ids for t in trajectories], table, inserted=[t.inserted for t in trajectories])
    timings["segment_s"] += time.perf_counter() - tick
    batch_size = len(trajectories)
    width = max((len(t.ids) for t in trajectories), default=0)
    step_ends = torch.from_numpy(segmentation.padded_step_ends())  # (B, S)
    loss_mask = torch.from_numpy(segmentation.padded_loss_mask(width)).float()  # (B, T)
    response_ids = torch.full((batch_size, width), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    response_mask = torch.zeros((batch_size, width), dtype=torch.long)  # (B, T)
    rollout_logp = torch.zeros((batch_size, width), dtype=torch.float32)  # (B, T)
    sequences = segmentation.to_list()
    for row, trajectory in enumerate(trajectories):
        if len(sequences[row].step_ends) != len(trajectory.inserted):
            raise RuntimeError(f"trajectory {row}: the segmenter found {len(sequences[row].step_ends)} steps for "
                               f"{len(trajectory.inserted)} inserted blocks; every block must follow the token "
                               "completing a `</search>`")
        length = len(trajectory.ids)
        response_ids[row, :length] = torch.tensor(trajectory.ids, dtype=torch.long)
        response_mask[row, :length] = 1
        rollout_logp[row, :length] = torch.tensor(trajectory.logp)
    return RolloutBatch(
        prompt_ids=[t.prompt_ids for t in trajectories],
        response_ids=response_ids,
        response_mask=response_mask,
        loss_mask=loss_mask,
        step_ends=step_ends,
        queries=[sequence.step_queries for sequence in sequences],
        retrieved=[t.retrieved for t in trajectories],
        response_texts=tokenizer.batch_decode([t.ids for t in trajectories], skip_special_tokens=True),
        answers=[sequence.answer for sequence in sequences],
        valid_format=[sequence.valid_format for sequence in sequences],
        inserted_spans=[list(t.inserted) for t in trajectories],
        num_searches=[t.num_searches for t in trajectories],
        record_indices=[t.record_index for t in trajectories],
        rollout_logp=rollout_logp,
        timings=dict(timings),
        finish_reasons=[t.finish_reason or "budget" for t in trajectories],
    )
