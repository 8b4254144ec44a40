"""Read the multi-hop QA formats researchers have on disk into `QARecord`s.

Formats (`load_records(path, format=...)`; `auto` looks at the first row):

- `stepsearch`: StepSearch's released jsonl — `question`, `final_answer` (or `answer`), `answer_aliases`,
  `sub_searchs` (per sub-question a list of reference queries), `sub_support_docs` ([{title, paragraph_text}]),
  optional `id`, `hops`, `type`, `sub_questions`, `sub_answers`. The synthetic world and the data pipeline write it.
- `searchr1`: Search-R1 / verl parquet (or jsonl) — `prompt` ([{role, content}], the question after
  "Question:"), `reward_model.ground_truth.target` (gold list), `extra_info` ({split, index}), `data_source`;
  a `question` column, which Search-R1's preprocessing keeps, wins over parsing the prompt.
- `flashrag`: FlashRAG jsonl — `id`, `question`, `golden_answers`, optional `metadata`.
- `musique`: raw MuSiQue jsonl — `question_decomposition` ([{id, question, answer, paragraph_support_idx}]) and
  `paragraphs` ([{idx, title, paragraph_text, is_supporting}]). Sub-question search keys are the decomposition
  questions with `#k` replaced by the k-th answer, and MuSiQue's "X >> relation" written as "relation of X".
- `hotpotqa`: raw HotpotQA JSON (a list) — `_id`, `question`, `answer`, `supporting_facts` ([[title, sent]]),
  `context` ([[title, [sentences]]]). Support docs are the supporting titles' paragraphs; no search keys.
- `2wiki`: raw 2WikiMultiHopQA JSON — as HotpotQA plus `evidences` ([[subject, relation, object]]); each evidence
  gives one sub-question search key "subject relation".

Errors name the file and line (jsonl) or index (json, parquet). With `skip_bad_rows=True` bad rows are skipped,
counted in `LoadResult.skipped`, and described in `LoadResult.bad_rows`. Rows must be strict JSON (no NaN or
Infinity), their strings valid Unicode (no lone surrogates), and nested no deeper than Python's parser allows.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from stepsearch.data.records import QARecord, SupportDoc
from stepsearch.errors import UserError

FORMATS = ("stepsearch", "searchr1", "flashrag", "musique", "hotpotqa", "2wiki")


class DataFormatError(UserError, ValueError):
    """A dataset file or row that cannot be read; the message names the file and line/index."""


class _RowError(ValueError):
    """A problem inside one row; `load_records` prefixes it with the row's location."""


@dataclass
class LoadResult:
    records: list[QARecord]
    skipped: int = 0
    bad_rows: list[str] = field(default_factory=list)  # "file:line: what is wrong", one per skipped row

    def skip_summary(self, first: int = 3) -> list[str]:
        """One line per kind of problem, most frequent first: how many rows, the first one in full, the next few
        locations."""
        kinds: dict[str, list[str]] = {}
        for line in self.bad_rows:
            problem = line.partition(_LOCATION_END)[2] or line
            kinds.setdefault(_problem_kind(problem), []).append(line)
        lines = []
        for rows in sorted(kinds.values(), key=len, reverse=True):
            others = [row.partition(_LOCATION_END)[0] for row in rows[1:first]]
            also = f"; also {', '.join(others)}" if others else ""
            more = f" and {len(rows) - first} more" if len(rows) > first else ""
            lines.append(f"{len(rows)} x {rows[0]}{also}{more}")
        return lines


_LOCATION_END = ": "  # bad_rows are "location: problem"


def _problem_kind(problem: str) -> str:
    """A problem without its row-specific numbers (columns, list indices), so rows broken alike count together."""
    return re.sub(r"\b\d+\b", "N", problem)


def detect_format(row: Any) -> str | None:
    """The format a row belongs to, from the fields it has; None when no known format matches."""
    if not isinstance(row, dict):
        return None
    if "question_decomposition" in row:
        return "musique"
    if "evidences" in row:
        return "2wiki"
    if "supporting_facts" in row and "context" in row:
        return "hotpotqa"
    if "sub_searchs" in row or "sub_support_docs" in row or "final_answer" in row:
        return "stepsearch"
    if "reward_model" in row:
        return "searchr1"
    if "golden_answers" in row:
        return "flashrag"
    return None


# ----------------------------------------------------------------------------------------------- field access
def _field(row: dict, name: str) -> Any:
    if name not in row or row[name] is None:
        raise _RowError(f"missing field '{name}'")
    return row[name]


def _text(row: dict, name: str) -> str:
    value = _field(row, name)
    if not isinstance(value, str):
        raise _RowError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(f"field '{name}' is empty")
    return value.strip()


def _string(value: Any, name: str) -> str | None:
    """The text of a string or a finite number (years, counts are answers too); None for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise _RowError(f"field '{name}' is {value}, not an answer or a text")
        return str(value)
    return None


def _strings(value: Any, name: str) -> list[str]:
    """A string or a list of strings (numbers are accepted as their text: years, counts)."""
    single = _string(value, name)
    if single is not None:
        return [single]
    if not isinstance(value, (list, tuple)):
        raise _RowError(f"field '{name}' must be a string or a list of strings, got {type(value).__name__}")
    texts = []
    for index, item in enumerate(value):
        text = _string(item, f"{name}[{index}]")
        if text is None:
            raise _RowError(f"field '{name}[{index}]' must be a string, got {type(item).__name__}")
        texts.append(text)
    return texts


def _answers(primary: list[str], aliases: list[str]) -> list[str]:
    out: list[str] = []
    for answer in primary + aliases:
        answer = answer.strip()
        if answer and answer not in out:
            out.append(answer)
    if not out:
        raise _RowError("no non-empty gold answer")
    return out


def _list(row: dict, name: str) -> list:
    value = _field(row, name)
    if not isinstance(value, (list, tuple)):
        raise _RowError(f"field '{name}' must be a list, got {type(value).__name__}")
    return list(value)


# ----------------------------------------------------------------------------------------------- per format
def _from_stepsearch(row: dict, default_id: str) -> QARecord:
    question = _text(row, "question")
    answer_key = next((k for k in ("final_answer", "answer", "golden_answers") if row.get(k) is not None), None)
    if answer_key is None:
        raise _RowError("missing field 'final_answer' (or 'answer')")
    answers = _answers(_strings(row[answer_key], answer_key), _strings(row.get("answer_aliases") or [],
                                                                       "answer_aliases"))
    search_keys = [_strings(keys, f"sub_searchs[{i}]") for i, keys in enumerate(row.get("sub_searchs") or [])]
    support_docs = []
    for i, doc in enumerate(row.get("sub_support_docs") or []):
        if not isinstance(doc, dict):
            raise _RowError(f"field 'sub_support_docs[{i}]' must be an object with title and paragraph_text")
        text = doc.get("paragraph_text", doc.get("text"))
        if not isinstance(text, str) or not isinstance(doc.get("title", ""), str):
            raise _RowError(f"field 'sub_support_docs[{i}]' needs string 'title' and 'paragraph_text'")
        support_docs.append(SupportDoc(title=doc.get("title", ""), text=text))
    sub_questions = _strings(row.get("sub_questions") or [], "sub_questions")
    hops = row.get("hops")
    if hops is not None and (isinstance(hops, bool) or not isinstance(hops, int) or hops < 1):
        raise _RowError(f"field 'hops' must be a positive integer, got {hops!r}")
    metadata = {k: row[k] for k in ("type", "sub_answers", "data_source") if k in row}
    return QARecord(id=str(row.get("id", default_id)), question=question, answers=answers,
                    sub_questions=sub_questions, search_keys=search_keys, support_docs=support_docs,
                    hops=hops if hops is not None else (len(search_keys) or None),
                    source=str(row.get("data_source", "stepsearch")), metadata=metadata)


_QUESTION_MARK = re.compile(r"Question:\s*(.*)", re.S)


def _question_from_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        content = prompt
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        users = [m for m in prompt if m.get("role") == "user"] or list(prompt)
        content = users[-1].get("content")
        if not isinstance(content, str):
            raise _RowError("field 'prompt' has a message without string 'content'")
    else:
        raise _RowError("field 'prompt' must be a list of {role, content} messages")
    found = _QUESTION_MARK.findall(content)
    question = found[-1] if found else content
    question = question.strip().split("\n")[0].strip()
    if not question:
        raise _RowError("field 'prompt' has no question after 'Question:'")
    return question


def _from_searchr1(row: dict, default_id: str) -> QARecord:
    if isinstance(row.get("question"), str) and row["question"].strip():
        question = row["question"].strip()
    else:
        question = _question_from_prompt(_field(row, "prompt"))
    reward_model = _field(row, "reward_model")
    if not isinstance(reward_model, dict):
        raise _RowError("field 'reward_model' must be an object with 'ground_truth'")
    truth = reward_model.get("ground_truth")
    if isinstance(truth, dict):
        if truth.get("target") is None:
            raise _RowError("missing field 'reward_model.ground_truth.target'")
        truth = truth["target"]
    if truth is None:
        raise _RowError("missing field 'reward_model.ground_truth'")
    answers = _answers(_strings(truth, "reward_model.ground_truth.target"), [])
    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    if "id" in row:
        record_id = str(row["id"])
    elif "index" in extra:
        record_id = f"{extra.get('split', 'row')}_{extra['index']}"
    else:
        record_id = default_id
    return QARecord(id=record_id, question=question, answers=answers, source=str(row.get("data_source", "searchr1")),
                    metadata={"extra_info": extra} if extra else {})


def _from_flashrag(row: dict, default_id: str) -> QARecord:
    answers = _answers(_strings(_field(row, "golden_answers"), "golden_answers"), [])
    metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    return QARecord(id=str(row.get("id", default_id)), question=_text(row, "question"), answers=answers,
                    source="flashrag", metadata=dict(metadata))


_HOP_REFERENCE = re.compile(r"#(\d+)")


def musique_sub_question(text: str, previous_answers: list[str]) -> str:
    """A decomposition question made searchable: "#k" -> the k-th answer, "X >> relation" -> "relation of X"."""
    def substitute(match: re.Match) -> str:
        k = int(match.group(1))
        if not 1 <= k <= len(previous_answers):
            raise _RowError(f"sub-question {text!r} refers to #{k} but only {len(previous_answers)} answers precede it")
        return previous_answers[k - 1]

    resolved = _HOP_REFERENCE.sub(substitute, text)
    if ">>" in resolved:
        subject, _, relation = resolved.partition(">>")
        resolved = f"{relation.strip()} of {subject.strip()}"
    return resolved.strip()


def _from_musique(row: dict, default_id: str) -> QARecord:
    question = _text(row, "question")
    answers = _answers(_strings(_field(row, "answer"), "answer"),
                       _strings(row.get("answer_aliases") or [], "answer_aliases"))
    paragraphs = _list(row, "paragraphs")
    by_idx: dict[int, dict] = {}
    for position, paragraph in enumerate(paragraphs):
        if not isinstance(paragraph, dict) or not isinstance(paragraph.get("paragraph_text"), str):
            raise _RowError(f"field 'paragraphs[{position}]' needs a string 'paragraph_text'")
        by_idx[paragraph.get("idx", position)] = paragraph
    sub_questions, sub_answers, support_docs = [], [], []
    all_supported = True
    for i, step in enumerate(_list(row, "question_decomposition")):
        if not isinstance(step, dict) or not isinstance(step.get("question"), str):
            raise _RowError(f"field 'question_decomposition[{i}]' needs a string 'question'")
        sub_questions.append(musique_sub_question(step["question"], sub_answers))
        sub_answers.append(str(step.get("answer", "")))
        support_idx = step.get("paragraph_support_idx")
        if support_idx is None:
            all_supported = False  # unanswerable variants: no golden passage for this hop
        elif support_idx not in by_idx:
            raise _RowError(f"question_decomposition[{i}].paragraph_support_idx={support_idx} names no paragraph")
        else:
            paragraph = by_idx[support_idx]
            support_docs.append(SupportDoc(title=str(paragraph.get("title", "")), text=paragraph["paragraph_text"]))
    return QARecord(id=str(row.get("id", default_id)), question=question, answers=answers,
                    sub_questions=sub_questions, search_keys=[[q] for q in sub_questions],
                    support_docs=support_docs if all_supported else [], hops=len(sub_questions), source="musique",
                    metadata={"sub_answers": sub_answers, "answerable": row.get("answerable", True)})


def _context_paragraphs(row: dict) -> dict[str, str]:
    paragraphs: dict[str, str] = {}
    for i, item in enumerate(_list(row, "context")):
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
                or not isinstance(item[1], (list, tuple))):
            raise _RowError(f"field 'context[{i}]' must be [title, [sentences]]")
        paragraphs[item[0]] = " ".join(str(s).strip() for s in item[1] if str(s).strip())
    return paragraphs


def _supporting_docs(row: dict) -> list[SupportDoc]:
    paragraphs = _context_paragraphs(row)
    titles: list[str] = []
    for i, fact in enumerate(_list(row, "supporting_facts")):
        if not isinstance(fact, (list, tuple)) or not fact or not isinstance(fact[0], str):
            raise _RowError(f"field 'supporting_facts[{i}]' must be [title, sentence_index]")
        if fact[0] not in paragraphs:
            raise _RowError(f"supporting_facts[{i}] names title {fact[0]!r}, which is not in 'context'")
        if fact[0] not in titles:
            titles.append(fact[0])
    return [SupportDoc(title=t, text=paragraphs[t]) for t in titles]


def _from_hotpotqa(row: dict, default_id: str) -> QARecord:
    support_docs = _supporting_docs(row)
    return QARecord(id=str(row.get("_id", row.get("id", default_id))), question=_text(row, "question"),
                    answers=_answers(_strings(_field(row, "answer"), "answer"), []), support_docs=support_docs,
                    hops=len(support_docs) or None, source="hotpotqa",
                    metadata={k: row[k] for k in ("type", "level") if k in row})


def _from_2wiki(row: dict, default_id: str) -> QARecord:
    search_keys = []
    for i, evidence in enumerate(_list(row, "evidences")):
        if not isinstance(evidence, (list, tuple)) or len(evidence) != 3:
            raise _RowError(f"field 'evidences[{i}]' must be [subject, relation, object]")
        search_keys.append([f"{evidence[0]} {evidence[1]}"])
    support_docs = _supporting_docs(row)
    return QARecord(id=str(row.get("_id", row.get("id", default_id))), question=_text(row, "question"),
                    answers=_answers(_strings(_field(row, "answer"), "answer"), []), search_keys=search_keys,
                    support_docs=support_docs, hops=len(search_keys) or None, source="2wiki",
                    metadata={"type": row["type"]} if "type" in row else {})


_CONVERTERS: dict[str, Callable[[dict, str], QARecord]] = {
    "stepsearch": _from_stepsearch, "searchr1": _from_searchr1, "flashrag": _from_flashrag,
    "musique": _from_musique, "hotpotqa": _from_hotpotqa, "2wiki": _from_2wiki,
}


# ----------------------------------------------------------------------------------------------- file reading
def _container(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".jsonl"):
        return "jsonl"
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return "json" if stripped.startswith(b"[") else "jsonl"


class _NotJSON(ValueError):
    """NaN / Infinity: Python's json module reads them, the JSON standard has no such values."""


def _reject_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not a JSON value")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _parse_json(text: str) -> Any:
    """Strict JSON: NaN/Infinity raise `_NotJSON`; nesting too deep for the parser raises `_RowError`."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise _RowError("nested too deeply") from None


def _lone_surrogate(value: Any, where: str = "") -> str | None:
    """Where the first lone surrogate (a "\\ud800" escape: not encodable Unicode) sits in a parsed row, or None."""
    if isinstance(value, str):
        found = _LONE_SURROGATE.search(value)
        return f"field '{where or 'the row'}' holds the lone surrogate \\u{ord(found.group()):04x}" if found else None
    if isinstance(value, dict):
        items = [(f"{where}.{key}" if where else str(key), key, item) for key, item in value.items()]
    elif isinstance(value, list):
        items = [(f"{where}[{index}]", None, item) for index, item in enumerate(value)]
    else:
        return None
    for name, key, item in items:
        if key is not None and _LONE_SURROGATE.search(key):
            return f"a key inside '{where or 'the row'}' holds a lone surrogate"
        problem = _lone_surrogate(item, name)
        if problem:
            return problem
    return None


def _parsed_row(text: str, location: str) -> tuple[str, Any, str | None]:
    """(location, row, error) of one JSON row's text."""
    try:
        row = _parse_json(text)
    except json.JSONDecodeError as err:
        return location, None, f"invalid JSON ({err.msg}, column {err.colno})"
    except (_NotJSON, _RowError) as err:
        return location, None, f"invalid JSON ({err})"
    problem = _lone_surrogate(row) if _SURROGATE_ESCAPE.search(text) else None
    if problem:
        return location, None, f"not valid Unicode: {problem}"
    return location, row, None


def _iter_rows(path: Path) -> Iterator[tuple[str, Any, str | None]]:
    """(location, row, error) for every row; a row that cannot even be parsed comes with its error."""
    container = _container(path)
    if container == "jsonl":
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                location = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield location, None, f"not valid UTF-8 ({err.reason} at byte {err.start})"
                    continue
                if not line.strip():
                    continue
                # without its line break, a row cut short is reported where it breaks, not at "line 2 column 1"
                yield _parsed_row(line.rstrip("\r\n"), location)
    elif container == "json":
        try:
            text = path.read_bytes().decode("utf-8")
            data = _parse_json(text)
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: invalid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
        except (_NotJSON, _RowError) as err:
            raise DataFormatError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(data, list):
            raise DataFormatError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
        check_surrogates = _SURROGATE_ESCAPE.search(text) is not None
        for index, row in enumerate(data):
            problem = _lone_surrogate(row) if check_surrogates else None
            yield f"{path}[{index}]", (None if problem else row), (f"not valid Unicode: {problem}" if problem else None)
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise DataFormatError(f"{path}: reading parquet needs pyarrow (pip install 'stepsearch[data]')") from err
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a damaged file; all mean the same to a user
            raise DataFormatError(f"{path}: cannot read parquet: {err}") from err
        for index, row in enumerate(rows):
            yield f"{path} row {index}", row, None


def load_records(path: str | os.PathLike, format: str = "auto", skip_bad_rows: bool = False) -> LoadResult:
    """Every question of `path` as a QARecord (see the module docstring for the formats)."""
    path = Path(path)
    if format != "auto" and format not in FORMATS:
        raise DataFormatError(f"unknown data format {format!r}; choose one of auto, {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataFormatError(f"{path}: no such data file")
    result = LoadResult(records=[])
    chosen = None if format == "auto" else format

    def bad(location: str, message: str) -> None:
        if not skip_bad_rows:
            raise DataFormatError(f"{location}: {message}")
        result.skipped += 1
        result.bad_rows.append(f"{location}: {message}")

    for position, (location, row, parse_error) in enumerate(_iter_rows(path)):
        if parse_error is not None:
            bad(location, parse_error)
            continue
        if chosen is None:
            if not isinstance(row, dict) and skip_bad_rows:
                bad(location, f"expected a JSON object, got {type(row).__name__}")
                continue
            chosen = detect_format(row)
            if chosen is None:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise DataFormatError(f"{location}: cannot tell the data format from the first row (fields: {keys}); "
                                      f"pass one of {', '.join(FORMATS)}")
        if not isinstance(row, dict):
            bad(location, f"expected a JSON object, got {type(row).__name__}")
            continue
        try:
            result.records.append(_CONVERTERS[chosen](row, f"{path.stem}-{position}"))
        except (_RowError, ValueError) as err:
            bad(location, f"{chosen} row: {err}")
    return result


# ----------------------------------------------------------------------------------------------- writing
def to_stepsearch_row(record: QARecord) -> dict:
    """The StepSearch released-format row of a record (what `load_records(format='stepsearch')` reads back)."""
    row = {
        "id": record.id,
        "question": record.question,
        "final_answer": record.answers[0],
        "answer_aliases": record.answers[1:],
        "type": record.metadata.get("type", record.source),
        "hops": record.hops,
        "sub_questions": record.sub_questions,
        "sub_searchs": record.search_keys,
        "sub_support_docs": [{"title": d.title, "paragraph_text": d.text} for d in record.support_docs],
        "data_source": record.source,
    }
    if "sub_answers" in record.metadata:
        row["sub_answers"] = record.metadata["sub_answers"]
    return row
