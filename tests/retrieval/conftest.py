"""Shared retrieval fixtures: a generated 200-passage corpus and a BM25 index of it, built once per session."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ("alpha beta gamma delta river mountain city king queen war battle science music film novel painter "
         "born died capital harbour bridge castle forest island").split()


def write_generated_corpus(path: Path, num_docs: int = 200, seed: int = 0) -> Path:
    """Passages 'Entity i' whose text holds a unique word `marker<i>`, so a query for it has one right answer."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for i in range(num_docs):
            text = f"Entity {i} is a " + " ".join(rng.choice(WORDS) for _ in range(25)) + f" marker{i}."
            handle.write(json.dumps({"id": f"doc-{i}", "contents": f'"Entity {i}"\n{text}'}) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory) -> Path:
    return write_generated_corpus(tmp_path_factory.mktemp("corpus") / "corpus.jsonl")


@pytest.fixture(scope="session")
def bm25_index_dir(tmp_path_factory, corpus_path) -> Path:
    from stepsearch.retrieval.index import build_index

    out = tmp_path_factory.mktemp("bm25")
    build_index(corpus_path, out, method="bm25")
    return out


@pytest.fixture(scope="session")
def bm25_index(bm25_index_dir):
    from stepsearch.retrieval.index import load_index

    return load_index(bm25_index_dir)
