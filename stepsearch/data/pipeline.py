"""The StepSearch data pipeline: decomposed multi-hop questions -> validated sub-question search keys.

For every sub-question of a record (MuSiQue's `question_decomposition`, with `#k` resolved), a query writer
proposes N search queries: an LLM behind any OpenAI-compatible `/v1/chat/completions` endpoint (SGLang, vLLM,
OpenAI) prompted with `prompts/search_queries.txt`, or `RuleQueryWriter` when no endpoint is given. A query is kept
only if the retriever returns the sub-question's support passage in its top-k (the paper's validity filter) and it
does not contain the hop's own answer (a searcher cannot know it yet). A record is written only if every
sub-question keeps at least one query.

Output is StepSearch's training format (`loaders.to_stepsearch_row`), appended one line per record and flushed,
so an interrupted run resumes where it stopped: ids already in the output are skipped and a half-written last line
is cut off.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Protocol

from stepsearch.data.records import QARecord, SupportDoc
from stepsearch.retrieval.base import Document, Retriever

PROMPT_PATH = Path(__file__).with_name("prompts") / "search_queries.txt"

_STOPWORDS = frozenset(
    "a an the of in on at to for by with from and or is was were are be been who whom whose what which when where "
    "why how did does do has have had that this these those it its as into".split())
_SPACES = re.compile(r"\s+")
_WORDS = re.compile(r"\w+", re.UNICODE)


class LLMError(RuntimeError):
    """The chat endpoint failed (unreachable after retries, or a 4xx that retrying cannot fix)."""


class QueryWriter(Protocol):
    def write(self, question: str, sub_question: str, n: int) -> list[str]:
        """Up to `n` distinct search queries for `sub_question` (a step of `question`)."""
        ...


def _normalise(text: str) -> str:
    return _SPACES.sub(" ", text).strip().lower()


def _dedupe(queries: Iterable[str], n: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for query in queries:
        query = _SPACES.sub(" ", query).strip()
        if query and _normalise(query) not in seen:
            seen.add(_normalise(query))
            out.append(query)
    return out[:n]


class RuleQueryWriter:
    """Queries without an LLM: the sub-question itself, its content words, and the content words minus the
    question's own shared context (the words that name this step's entity and relation)."""

    def write(self, question: str, sub_question: str, n: int) -> list[str]:
        plain = sub_question.strip().rstrip("?").strip()
        words = _WORDS.findall(plain)
        content = [w for w in words if w.lower() not in _STOPWORDS]
        capitalised = [w for w in content if w[:1].isupper() or w[:1].isdigit()]
        relation = [w for w in content if w not in capitalised]
        return _dedupe([plain, " ".join(content), " ".join(capitalised + relation[-1:])], n)


class LLMQueryWriter:
    """Queries from a chat model behind an OpenAI-compatible endpoint (stdlib HTTP; thread-safe).

    `url` is the server's base URL (`http://host:port` or `.../v1`). Connection errors, timeouts and 5xx/429 are
    retried with exponential backoff, then `LLMError` names the URL; other 4xx fail at once with the server's text.
    """

    def __init__(self, url: str, model: str, prompt_path: str | os.PathLike = PROMPT_PATH, temperature: float = 0.7,
                 max_tokens: int = 256, timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 1.0,
                 api_key: str | None = None) -> None:
        base = url.rstrip("/")
        if base.endswith("/chat/completions"):
            self.endpoint = base
        else:
            self.endpoint = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self.model = model
        self.template = Path(prompt_path).read_text(encoding="utf-8")
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    def prompt(self, question: str, sub_question: str, n: int) -> str:
        # Plain replacement rather than str.format: a prompt file may contain literal braces.
        return (self.template.replace("{question}", question).replace("{sub_question}", sub_question)
                .replace("{n}", str(n)))

    def complete(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": self.temperature, "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", "replace")[:300]
                if err.code in (429, 500, 502, 503, 504):
                    last_error = f"HTTP {err.code}: {detail}"
                    continue
                raise LLMError(f"{self.endpoint}: HTTP {err.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                last_error = str(getattr(err, "reason", err))
                continue
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise LLMError(f"{self.endpoint}: response is not JSON ({err})") from None
            try:
                content = payload["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise LLMError(f"{self.endpoint}: response has no choices[0].message.content: "
                               f"{json.dumps(payload)[:300]}") from None
            return content if isinstance(content, str) else ""
        raise LLMError(f"{self.endpoint}: unreachable after {self.max_retries + 1} attempts ({last_error})")

    def write(self, question: str, sub_question: str, n: int) -> list[str]:
        return _dedupe(parse_query_lines(self.complete(self.prompt(question, sub_question, n))), n)


_LINE_DECORATION = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|query\s*\d*\s*:)\s*", re.I)


def parse_query_lines(content: str) -> list[str]:
    """One query per line; numbering, bullets and quotes removed; preambles ("Here are ...:") dropped."""
    queries = []
    for line in content.splitlines():
        line = _LINE_DECORATION.sub("", line).strip().strip('"\'`').strip()
        if not line or line.endswith(":") or len(line.split()) > 30:
            continue
        queries.append(line)
    return queries


def passage_matches(doc: Document, support: SupportDoc) -> bool:
    """Whether a retrieved document is the support passage: same text (whitespace/case-insensitive), or the same
    title with one text containing the other (corpus versions of a paragraph differ in trimming)."""
    doc_text, support_text = _normalise(doc.text), _normalise(support.text)
    if doc_text == support_text:
        return True
    if support.title and _normalise(doc.title) == _normalise(support.title) and doc_text and support_text:
        return doc_text in support_text or support_text in doc_text
    return False


def _leaks_answer(query: str, answer: str) -> bool:
    answer_words = _WORDS.findall(answer.lower())
    if not answer_words:
        return False
    query_text = " " + " ".join(_WORDS.findall(query.lower())) + " "
    return f" {' '.join(answer_words)} " in query_text


@dataclass
class PipelineStats:
    """Counts of one run; `proposed`/`kept` count queries, the rest count records."""

    read: int = 0
    already_done: int = 0
    no_decomposition: int = 0
    dropped: int = 0
    written: int = 0
    proposed: int = 0
    kept: int = 0

    def summary(self) -> str:
        rate = self.kept / self.proposed if self.proposed else 0.0
        return (f"read {self.read}, already done {self.already_done}, without decomposition {self.no_decomposition}, "
                f"dropped (a sub-question kept no query) {self.dropped}, written {self.written}; "
                f"queries kept {self.kept}/{self.proposed} ({rate:.1%})")


@dataclass(frozen=True)
class _Outcome:
    record: QARecord | None  # None: dropped
    proposed: int
    kept: int


def validate_queries(record: QARecord, writer: QueryWriter, retriever: Retriever, n_queries: int,
                     topk: int) -> _Outcome:
    """The record with `search_keys` replaced by the valid proposed queries, or record None if a hop has none."""
    sub_answers = record.metadata.get("sub_answers") or []
    proposals: list[list[str]] = []
    for i, sub_question in enumerate(record.sub_questions):
        answer = sub_answers[i] if i < len(sub_answers) else ""
        queries = writer.write(record.question, sub_question, n_queries)
        proposals.append([q for q in queries if not _leaks_answer(q, answer)])
    flat = [q for queries in proposals for q in queries]
    results = retriever.search(flat, topk) if flat else []
    valid: list[list[str]] = []
    position = 0
    for queries, support in zip(proposals, record.support_docs):
        hits = results[position:position + len(queries)]
        position += len(queries)
        valid.append([q for q, docs in zip(queries, hits) if any(passage_matches(d, support) for d in docs[:topk])])
    kept = sum(len(v) for v in valid)
    if not all(valid):
        return _Outcome(None, len(flat), kept)
    return _Outcome(replace(record, search_keys=valid), len(flat), kept)


def done_ids(out_path: str | os.PathLike) -> set[str]:
    """Ids already written to `out_path`; a half-written last line (an interrupted run) is truncated away."""
    path = Path(out_path)
    if not path.exists():
        return set()
    ids: set[str] = set()
    with open(path, "rb+") as fh:
        data = fh.read()
        complete_end = data.rfind(b"\n") + 1
        if complete_end < len(data):
            fh.truncate(complete_end)
        for lineno, line in enumerate(data[:complete_end].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                ids.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
                raise ValueError(f"{path}:{lineno}: not a pipeline output row ({err}); "
                                 "choose another --out or remove the file") from None
    return ids


def run_pipeline(records: Iterable[QARecord], out_path: str | os.PathLike, retriever: Retriever,
                 writer: QueryWriter | None = None, n_queries: int = 3, topk: int = 3, workers: int = 4,
                 progress: bool = True) -> PipelineStats:
    """Validate search keys for every record with a decomposition and append survivors to `out_path`."""
    from stepsearch.data.loaders import to_stepsearch_row

    if n_queries <= 0 or topk <= 0 or workers <= 0:
        raise ValueError(f"n_queries, topk and workers must be positive (got {n_queries}, {topk}, {workers})")
    writer = writer or RuleQueryWriter()
    stats = PipelineStats()
    skip = done_ids(out_path)
    todo: list[QARecord] = []
    for record in records:
        stats.read += 1
        if record.id in skip:
            stats.already_done += 1
        elif not record.sub_questions or len(record.sub_questions) != len(record.support_docs):
            stats.no_decomposition += 1
        else:
            todo.append(record)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        with open(out_path, "a", encoding="utf-8") as out:
            outcomes = pool.map(lambda r: validate_queries(r, writer, retriever, n_queries, topk), todo)
            for outcome in tqdm(outcomes, total=len(todo), desc="search keys", disable=not progress):
                stats.proposed += outcome.proposed
                stats.kept += outcome.kept
                if outcome.record is None:
                    stats.dropped += 1
                    continue
                out.write(json.dumps(to_stepsearch_row(outcome.record), ensure_ascii=False) + "\n")
                out.flush()
                stats.written += 1
    finally:
        # On an error (endpoint down, Ctrl-C) do not keep querying for records that will not be written.
        pool.shutdown(wait=True, cancel_futures=True)
    return stats
