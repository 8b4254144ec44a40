"""Search indexes over a passage corpus: BM25 (bm25s) and dense (HF encoder + FAISS inner product).

An index directory holds `meta.json` (method, encoder, corpus path, document count, build parameters), `docs.jsonl`
(the corpus, so the directory is self-contained) and the method's files (`bm25/` or `faiss.index`). The encoder is
recorded portably: the packaged default MiniLM by its package name (found again in whatever environment loads the
index), any other encoder by its directory, together with a fingerprint of its config and weight sizes that loading
checks, so an index never silently meets a different encoder.

Both methods rank by score, then by corpus position: the top-k of a query is always a prefix of its top-(k+1).
`build_index` writes one, `load_index` reads one back. FAISS uses the GPUs when faiss-gpu is installed and a CUDA
device is visible (sharded across GPUs in fp16), faiss-cpu otherwise. bm25s, faiss and torch are imported lazily.
"""
from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stepsearch.retrieval.base import Document, RetrieverError
from stepsearch.retrieval.corpus import load_corpus, write_corpus

FORMAT_VERSION = 1
BM25_DEFAULT_K1 = 1.2
"""BM25 term-frequency saturation; chosen by measurement (benchmarks/README.md, "BM25 parameters")."""
BM25_DEFAULT_B = 0.75
"""BM25 length normalisation; chosen by measurement (benchmarks/README.md, "BM25 parameters")."""
BM25_LUCENE_K1, BM25_LUCENE_B = 0.9, 0.4
"""Lucene/Pyserini's defaults, which Search-R1's BM25 server uses (`--bm25-preset lucene`)."""
META_FILE = "meta.json"
DOCS_FILE = "docs.jsonl"
FAISS_FILE = "faiss.index"
BM25_DIR = "bm25"

_TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")
"""bm25s's default token pattern (scikit-learn's CountVectorizer's)."""

Hits = tuple[list[list[int]], list[list[float]]]
"""Per query: document positions in the corpus, and their scores, best first."""


class SearchIndex:
    """A corpus plus a way to rank it. Subclasses implement `search_positions`; `search` turns hits into docs."""

    method: str

    def __init__(self, docs: list[Document], meta: dict[str, Any]) -> None:
        self.docs = docs
        self.meta = meta

    def search_positions(self, queries: list[str], topk: int) -> Hits:
        raise NotImplementedError

    def save_files(self, out_dir: Path) -> None:
        """Write the method's own files (the corpus and metadata are written by `save_index`)."""
        raise NotImplementedError

    def search(self, queries: list[str], topk: int) -> list[list[Document]]:
        """Top-`topk` documents per (non-empty) query, best first, with scores."""
        positions, scores = self.search_positions(queries, topk)
        return [
            [Document(self.docs[p].id, self.docs[p].title, self.docs[p].text, s) for p, s in zip(pos, sc)]
            for pos, sc in zip(positions, scores)
        ]

    def describe(self) -> dict[str, Any]:
        """What a server reports on /health: method, document count, build parameters, encoder name; no paths."""
        described: dict[str, Any] = {"method": self.meta["method"], "num_docs": len(self.docs)}
        build = self.meta.get("build", {})
        if self.method == "bm25":
            described["k1"], described["b"] = build.get("k1"), build.get("b")
        else:
            described["index_type"] = build.get("index_type")
            encoder = self.meta.get("encoder") or ""
            described["encoder"] = encoder if encoder.startswith(PACKAGE_ENCODER_PREFIX) else Path(encoder).name
        return described


class BM25Index(SearchIndex):
    """Lucene-flavoured BM25 (bm25s builds the index, English stop words). Documents with no query term are not
    returned; ties are broken by corpus position.

    Search does not loop over queries: the batch becomes a sparse query-term count matrix Q (nq, V) multiplied by
    bm25s's precomputed term-document score matrix (V, N), so a merged server batch costs one sparse product and
    each query touches only the postings of its own terms (never an O(N) dense pass). Scores equal bm25s's own.
    """

    method = "bm25"
    queries_per_product = 256
    """Queries per sparse product: bounds the (nq, N) intermediate for corpora with very common terms."""

    def __init__(self, docs: list[Document], meta: dict[str, Any], model: Any) -> None:
        super().__init__(docs, meta)
        import scipy.sparse

        bm25s = import_bm25s()

        self.model = model
        self._stopwords = frozenset(bm25s.stopwords.STOPWORDS_EN)
        scores = model.scores  # bm25s's CSC: column t holds the documents containing term t and their scores
        self.term_doc_scores = scipy.sparse.csr_matrix(
            (scores["data"], scores["indices"], scores["indptr"]),
            shape=(len(scores["indptr"]) - 1, scores["num_docs"]),
        )  # (V, N)

    @classmethod
    def build(cls, docs: list[Document], meta: dict[str, Any], k1: float = BM25_DEFAULT_K1,
              b: float = BM25_DEFAULT_B) -> BM25Index:
        bm25s = import_bm25s()
        check_bm25_params(k1, b)
        tokens = bm25s.tokenize([d.contents for d in docs], stopwords="en", show_progress=True)
        model = bm25s.BM25(k1=k1, b=b)
        model.index(tokens, show_progress=True)
        meta["build"] = {"k1": k1, "b": b, "stopwords": "en"}
        return cls(docs, meta, model)

    def save_files(self, out_dir: Path) -> None:
        self.model.save(str(out_dir / BM25_DIR), show_progress=False)

    @classmethod
    def load_files(cls, index_dir: Path, docs: list[Document], meta: dict[str, Any]) -> BM25Index:
        bm25s = import_bm25s()
        return cls(docs, meta, bm25s.BM25.load(str(index_dir / BM25_DIR), show_progress=False))

    def search_positions(self, queries: list[str], topk: int) -> Hits:
        positions: list[list[int]] = []
        scores: list[list[float]] = []
        for start in range(0, len(queries), self.queries_per_product):
            chunk_positions, chunk_scores = self._search_chunk(queries[start : start + self.queries_per_product], topk)
            positions += chunk_positions
            scores += chunk_scores
        return positions, scores

    def query_term_ids(self, query: str) -> list[int]:
        """The vocabulary ids of a query's terms, tokenised exactly as bm25s.tokenize(stopwords="en") does (lower
        case, `(?u)\\b\\w\\w+\\b`, English stop words dropped), without its per-call set-up cost."""
        vocab = self.model.vocab_dict
        return [vocab[t] for t in _TOKEN_PATTERN.findall(query.lower()) if t not in self._stopwords and t in vocab]

    def _search_chunk(self, queries: list[str], topk: int) -> Hits:
        import scipy.sparse

        if not queries:
            return [], []
        term_ids = [self.query_term_ids(q) for q in queries]  # a repeated term counts again, as in bm25s
        indptr = np.zeros(len(queries) + 1, dtype=np.int64)
        np.cumsum([len(ids) for ids in term_ids], out=indptr[1:])
        indices = np.fromiter((i for ids in term_ids for i in ids), dtype=np.int64, count=int(indptr[-1]))
        query_terms = scipy.sparse.csr_matrix(
            (np.ones(len(indices), dtype=np.float32), indices, indptr),
            shape=(len(queries), self.term_doc_scores.shape[0]),
        )  # (nq, V); a repeated (row, term) entry is summed by the product
        doc_scores = (query_terms @ self.term_doc_scores).tocsr()  # (nq, N), only documents sharing a term
        positions, scores = [], []
        for row in range(len(queries)):
            lo, hi = doc_scores.indptr[row], doc_scores.indptr[row + 1]
            row_docs, row_scores = doc_scores.indices[lo:hi], doc_scores.data[lo:hi]
            keep = row_scores > 0
            row_docs, row_scores = row_docs[keep], row_scores[keep]
            best = top_positions(row_docs, row_scores, topk)
            positions.append(row_docs[best].tolist())
            scores.append(row_scores[best].tolist())
        return positions, scores


def import_bm25s() -> Any:
    """`bm25s`, imported without letting JAX take the GPU.

    When JAX is installed, importing bm25s runs a JAX top-k, which starts JAX's default backend: on a GPU machine
    that preallocates 75% of the GPU's memory in every process that builds or loads a BM25 index (trainer ranks,
    the retrieval server), leaving a quarter of the card to the trainer and SGLang. Search here is our own sparse
    product, never bm25s's JAX path, so JAX is kept on the CPU unless `JAX_PLATFORMS` is already set.
    """
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import bm25s
    import bm25s.stopwords  # noqa: F401  (the submodule the stop-word list lives in)

    return bm25s


def check_bm25_params(k1: float, b: float) -> None:
    """BM25 needs k1 >= 0 (0: term frequency ignored) and b in [0, 1] (0: no length normalisation)."""
    if not (np.isfinite(k1) and k1 >= 0):
        raise RetrieverError(f"BM25 k1 must be a finite number >= 0, got {k1}")
    if not (np.isfinite(b) and 0 <= b <= 1):
        raise RetrieverError(f"BM25 b must be in [0, 1], got {b}")


def top_positions(doc_positions: np.ndarray, scores: np.ndarray, topk: int) -> np.ndarray:
    """Indices of the `topk` best entries, ordered by score descending then corpus position ascending.

    `argpartition` alone would pick an arbitrary subset of the documents tied at the cut; here every document whose
    score equals the k-th best score is kept as a candidate and the full (score, position) order decides.
    """
    if len(scores) > topk:
        kth_best = -np.partition(-scores, topk - 1)[topk - 1]
        candidates = np.flatnonzero(scores >= kth_best)
    else:
        candidates = np.arange(len(scores))
    order = np.lexsort((doc_positions[candidates], -scores[candidates]))
    return candidates[order[:topk]]


class DenseIndex(SearchIndex):
    """Encoder embeddings in a FAISS inner-product index (Flat, IVF or HNSW); scores are cosine similarities."""

    method = "dense"

    def __init__(self, docs: list[Document], meta: dict[str, Any], cpu_index: Any, encoder: Any) -> None:
        super().__init__(docs, meta)
        self.cpu_index = cpu_index
        self.faiss_index = _to_gpu_if_available(cpu_index, meta.get("build", {}).get("index_type", "flat"))
        self.encoder = encoder

    @classmethod
    def build(
        cls,
        docs: list[Document],
        meta: dict[str, Any],
        encoder_path: str | None = None,
        index_type: Literal["flat", "ivf", "hnsw"] = "flat",
        nlist: int = 1024,
        nprobe: int = 32,
        hnsw_m: int = 32,
        ef_search: int = 128,
        batch_size: int = 128,
        max_length: int = 256,
    ) -> DenseIndex:
        import faiss

        from stepsearch.retrieval.encoder import TextEncoder

        encoder = TextEncoder(encoder_path, max_length=max_length)
        embeddings = encoder.encode_passages([d.contents for d in docs], batch_size=batch_size)  # (N, H)
        dim = embeddings.shape[1]
        if index_type == "flat":
            index = faiss.IndexFlatIP(dim)
        elif index_type == "ivf":
            nlist = max(1, min(nlist, len(docs)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(embeddings)
            index.nprobe = nprobe
        elif index_type == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = ef_search
        else:
            raise RetrieverError(f"unknown dense index type {index_type!r} (expected flat, ivf or hnsw)")
        index.add(embeddings)
        meta["encoder"] = encoder_reference(encoder.path)
        meta["encoder_fingerprint"] = encoder_fingerprint(encoder.path)
        meta["build"] = {
            "index_type": index_type, "dim": dim, "nlist": nlist, "nprobe": nprobe, "hnsw_m": hnsw_m,
            "ef_search": ef_search, "max_length": max_length,
            "query_prefix": encoder.query_prefix, "passage_prefix": encoder.passage_prefix,
        }
        return cls(docs, meta, index, encoder)

    def save_files(self, out_dir: Path) -> None:
        import faiss

        faiss.write_index(self.cpu_index, str(out_dir / FAISS_FILE))

    @classmethod
    def load_files(cls, index_dir: Path, docs: list[Document], meta: dict[str, Any],
                   encoder_path: str | Path | None = None) -> DenseIndex:
        import faiss

        from stepsearch.retrieval.encoder import TextEncoder

        build = meta.get("build", {})
        path = resolve_encoder(meta, index_dir, encoder_path)
        encoder = TextEncoder(
            path,
            query_prefix=build.get("query_prefix"),
            passage_prefix=build.get("passage_prefix"),
            max_length=int(build.get("max_length", 256)),
        )
        index = faiss.read_index(str(index_dir / FAISS_FILE))
        if index.ntotal != len(docs):
            raise RetrieverError(f"{index_dir}: faiss index has {index.ntotal} vectors but {len(docs)} documents")
        return cls(docs, meta, index, encoder)

    def search_positions(self, queries: list[str], topk: int) -> Hits:
        if not queries:
            return [], []
        embeddings = self.encoder.encode_queries(queries)  # (Q, H)
        # One neighbour more than asked, so a tie at the cut is visible and settled by corpus position.
        wanted = min(topk + 1, len(self.docs))
        scores, positions = self.faiss_index.search(embeddings, wanted)  # (Q, wanted) each
        out_positions, out_scores = [], []
        for row in range(len(queries)):
            row_positions, row_scores = _reachable(positions[row], scores[row])
            if _tie_at_end(row_scores, topk) and wanted < len(self.docs):
                row_positions, row_scores = self._neighbours_past_ties(embeddings[row : row + 1], topk, 2 * wanted)
            best = top_positions(row_positions, row_scores, topk)
            out_positions.append(row_positions[best].tolist())
            out_scores.append(row_scores[best].tolist())
        return out_positions, out_scores

    def _neighbours_past_ties(self, embedding: np.ndarray, topk: int, wanted: int) -> tuple[np.ndarray, np.ndarray]:
        """Neighbours of one query embedding (1, H), widened until every document tied with the k-th is seen."""
        while True:
            wanted = min(wanted, len(self.docs))
            scores, positions = self.faiss_index.search(embedding, wanted)  # (1, wanted) each
            row_positions, row_scores = _reachable(positions[0], scores[0])
            if not _tie_at_end(row_scores, topk) or wanted == len(self.docs):
                return row_positions, row_scores
            wanted *= 2


def _reachable(positions: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = positions >= 0  # IVF/HNSW return -1 when fewer neighbours are reachable
    return positions[keep], scores[keep]


def _tie_at_end(scores: np.ndarray, topk: int) -> bool:
    """Whether the last neighbour found still ties with the k-th, so more tied documents may lie beyond."""
    return len(scores) > topk and scores[-1] == scores[topk - 1]


PACKAGE_ENCODER_PREFIX = "package:"


def encoder_reference(path: Path) -> str:
    """How `meta.json` names an encoder: `package:<module>` for the packaged default (its site-packages path differs
    between environments), else the encoder directory's absolute path."""
    from stepsearch.retrieval.encoder import MINILM_PACKAGE, default_encoder_path

    try:
        if Path(path).resolve() == default_encoder_path().resolve():
            return PACKAGE_ENCODER_PREFIX + MINILM_PACKAGE
    except RetrieverError:  # the default package is absent: this encoder cannot be it
        pass
    return str(Path(path).resolve())


def encoder_fingerprint(path: Path) -> str:
    """A hash of an encoder directory's config.json and the names and sizes of its weight files."""
    import hashlib

    digest = hashlib.sha256((Path(path) / "config.json").read_bytes())
    for weights in sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def resolve_encoder(meta: dict[str, Any], index_dir: Path, override: str | Path | None = None) -> Path:
    """The encoder directory for a dense index: `override` if given, else what `meta.json` names; its fingerprint
    must match the one recorded at build time."""
    from stepsearch.retrieval.encoder import MINILM_PACKAGE, default_encoder_path

    reference = meta.get("encoder")
    if override is not None:
        path = Path(override)
    elif reference == PACKAGE_ENCODER_PREFIX + MINILM_PACKAGE or reference is None:
        path = default_encoder_path()
    elif isinstance(reference, str) and reference.startswith(PACKAGE_ENCODER_PREFIX):
        raise RetrieverError(f"{index_dir}/{META_FILE}: unknown encoder package {reference!r}")
    else:
        path = Path(reference)
    if not (path / "config.json").is_file():
        raise RetrieverError(f"{index_dir}: the encoder {path} this index was built with is not here; pass the same "
                             "encoder's directory with --encoder / retriever.encoder_path")
    recorded = meta.get("encoder_fingerprint")
    if recorded is not None and encoder_fingerprint(path) != recorded:
        raise RetrieverError(f"{index_dir}: encoder {path} differs from the one this index was built with "
                             f"(fingerprint {encoder_fingerprint(path)} != {recorded})")
    return path


def _to_gpu_if_available(index: Any, index_type: str) -> Any:
    """Move a FAISS index onto all visible GPUs (sharded, fp16) when faiss-gpu and CUDA are present."""
    import faiss

    if index_type == "hnsw" or not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # each GPU holds 1/n of the vectors, so an index larger than one GPU still fits
    options.useFloat16 = True
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError as err:
        warnings.warn(f"faiss-gpu could not take the index ({err}); searching on CPU", stacklevel=2)
        return index


INDEX_CLASSES: dict[str, type[SearchIndex]] = {"bm25": BM25Index, "dense": DenseIndex}


def build_index(
    corpus_path: str | Path,
    out_dir: str | Path,
    method: Literal["bm25", "dense"] = "bm25",
    encoder_path: str | None = None,
    **params: Any,
) -> SearchIndex:
    """Index a JSONL corpus with `method` and save it (with its metadata and a copy of the corpus) to `out_dir`.

    `params` go to the method's builder: BM25 `k1`, `b` (defaults `BM25_DEFAULT_K1`, `BM25_DEFAULT_B`); dense
    `index_type` (flat|ivf|hnsw), `nlist`, `nprobe`, `hnsw_m`, `ef_search`, `batch_size`, `max_length`.
    """
    if method not in INDEX_CLASSES:
        raise RetrieverError(f"unknown index method {method!r} (expected one of {sorted(INDEX_CLASSES)})")
    if method == "bm25" and encoder_path is not None:
        raise RetrieverError("--encoder only applies to --method dense")
    corpus_path = Path(corpus_path).resolve()
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise RetrieverError(f"{out_dir}: exists and is not a directory; give --out a new or index directory")
    docs = load_corpus(corpus_path)
    stat = corpus_path.stat()
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "method": method,
        "encoder": None,
        "corpus_path": str(corpus_path),
        "corpus_size_bytes": stat.st_size,
        "corpus_mtime_ns": stat.st_mtime_ns,
        "num_docs": len(docs),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if method == "dense":
        index: SearchIndex = DenseIndex.build(docs, meta, encoder_path=encoder_path, **params)
    else:
        index = BM25Index.build(docs, meta, **params)
    save_index(index, out_dir)
    return index


def save_index(index: SearchIndex, out_dir: str | Path) -> None:
    """Write the index files first and `meta.json` last, so a directory with metadata is always complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)
    write_corpus(out_dir / DOCS_FILE, index.docs)
    index.save_files(out_dir)
    tmp = out_dir / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(index.meta, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out_dir / META_FILE)


def read_index_meta(index_dir: str | Path) -> dict[str, Any]:
    """The metadata of an index directory, with a clear error when it is not one."""
    meta_path = Path(index_dir) / META_FILE
    if not meta_path.is_file():
        raise RetrieverError(f"{index_dir}: not an index directory (no {META_FILE}); build one with "
                             "`stepsearch retriever build --corpus FILE --out DIR`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RetrieverError(f"{meta_path}: unreadable index metadata ({err})") from None
    if meta.get("format_version") != FORMAT_VERSION or meta.get("method") not in INDEX_CLASSES:
        raise RetrieverError(f"{meta_path}: unsupported index (format_version={meta.get('format_version')}, "
                             f"method={meta.get('method')!r})")
    return meta


def load_index(index_dir: str | Path, encoder_path: str | Path | None = None) -> SearchIndex:
    """Load an index directory written by `build_index`; `encoder_path` points a dense index at its encoder when the
    directory recorded at build time does not exist here (the fingerprint must still match)."""
    index_dir = Path(index_dir)
    meta = read_index_meta(index_dir)
    docs = load_corpus(index_dir / DOCS_FILE)
    if len(docs) != meta["num_docs"]:
        raise RetrieverError(f"{index_dir}: {DOCS_FILE} has {len(docs)} documents, meta.json says {meta['num_docs']}")
    if meta["method"] == "dense":
        return DenseIndex.load_files(index_dir, docs, meta, encoder_path=encoder_path)
    return BM25Index.load_files(index_dir, docs, meta)
