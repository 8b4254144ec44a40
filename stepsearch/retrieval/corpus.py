"""Passage corpora in the Search-R1/FlashRAG JSONL convention, read once into `Document`s.

A row is `{"id": ..., "contents": "\\"Title\\"\\ntext"}`; rows of the form `{"id", "title", "text"}` are accepted too.
The title is the first line of `contents` with its surrounding quotes removed, the body everything after it, so
`Document.contents` gives back the original string. Every malformed row fails with the file and line it is on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from stepsearch.retrieval.base import Document


class CorpusError(ValueError):
    """A corpus file that cannot be read: names the file, and the line where there is one."""


def split_contents(contents: str) -> tuple[str, str]:
    """'"Title"\\nbody' -> ('Title', 'body'). Contents without a line break are all body, with an empty title."""
    first_line, newline, body = contents.partition("\n")
    if not newline:
        return "", contents
    title = first_line.strip()
    if len(title) >= 2 and title[0] == '"' and title[-1] == '"':
        title = title[1:-1]
    return title, body


def document_from_row(row: object, where: str) -> Document:
    """One corpus row (already JSON-decoded) as a `Document`; `where` ('file:line') goes into every error."""
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    doc_id = row.get("id", row.get("_id"))
    if doc_id is None or isinstance(doc_id, (bool, dict, list)):
        raise CorpusError(f"{where}: missing or invalid 'id' (a string or integer is required)")
    if "contents" in row:
        contents = row["contents"]
        if not isinstance(contents, str):
            raise CorpusError(f"{where}: 'contents' must be a string, got {type(contents).__name__}")
        title, text = split_contents(contents)
    elif "text" in row:
        title, text = row.get("title", ""), row["text"]
        if not isinstance(title, str) or not isinstance(text, str):
            raise CorpusError(f"{where}: 'title' and 'text' must be strings")
    else:
        raise CorpusError(f"{where}: a row needs 'contents' (or 'title' and 'text'); keys are {sorted(row)}")
    return Document(id=str(doc_id), title=title, text=text)


def iter_corpus(path: str | Path) -> Iterator[Document]:
    """Documents of a JSONL corpus in file order. Blank lines are skipped; duplicate ids are an error."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found")
    seen: set[str] = set()
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(
                    f"{where}: not valid UTF-8 (byte {err.start} of the line is 0x{raw[err.start]:02x}); "
                    "re-encode the corpus as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
            doc = document_from_row(row, where)
            if doc.id in seen:
                raise CorpusError(f"{where}: duplicate document id {doc.id!r}")
            seen.add(doc.id)
            yield doc


def load_corpus(path: str | Path) -> list[Document]:
    """All documents of a JSONL corpus; an empty corpus is an error (there would be nothing to retrieve)."""
    docs = list(iter_corpus(path))
    if not docs:
        raise CorpusError(f"{path}: the corpus has no documents")
    return docs


def write_corpus(path: str | Path, docs: Iterable[Document]) -> int:
    """Write documents as Search-R1 JSONL rows (`id`, `contents`); returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({"id": doc.id, "contents": doc.contents}, ensure_ascii=False) + "\n")
            count += 1
    return count
