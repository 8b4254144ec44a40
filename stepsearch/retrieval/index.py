"""Search indexes over a passage corpus: BM25 (bm25s) and dense (HF encoder + FAISS inner product).

An index directory holds `meta.json` (method, encoder, corpus path, document count, build parameters), `docs.jsonl`
(the corpus, so the directory is self-contained) and the method's files (`bm25/` or `faiss.index`).
`build_index` writes one, `load_index` reads one back. FAISS uses the GPUs when faiss-gpu is installed and a CUDA
device is visible (sharded across GPUs in fp16), faiss-cpu otherwise. bm25s, faiss and torch are imported lazily.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stepsearch.retrieval.base import Document, RetrieverError
from stepsearch.retrieval.corpus import load_corpus, write_corpus

FORMAT_VERSION = 1
META_FILE = "meta.json"
DOCS_FILE = "docs.jsonl"
FAISS_FILE = "faiss.index"
BM25_DIR = "bm25"

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
        """The metadata a server reports on /health."""
        return {k: self.meta[k] for k in ("method", "encoder", "num_docs", "corpus_path") if k in self.meta}


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

        self.model = model
        scores = model.scores  # bm25s's CSC: column t holds the documents containing term t and their scores
        self.term_doc_scores = scipy.sparse.csr_matrix(
            (scores["data"], scores["indices"], scores["indptr"]),
            shape=(len(scores["indptr"]) - 1, scores["num_docs"]),
        )  # (V, N)

    @classmethod
    def build(cls, docs: list[Document], meta: dict[str, Any], k1: float = 0.9, b: float = 0.4) -> BM25Index:
        import bm25s

        tokens = bm25s.tokenize([d.contents for d in docs], stopwords="en", show_progress=True)
        model = bm25s.BM25(k1=k1, b=b)
        model.index(tokens, show_progress=True)
        meta["build"] = {"k1": k1, "b": b, "stopwords": "en"}
        return cls(docs, meta, model)

    def save_files(self, out_dir: Path) -> None:
        self.model.save(str(out_dir / BM25_DIR), show_progress=False)

    @classmethod
    def load_files(cls, index_dir: Path, docs: list[Document], meta: dict[str, Any]) -> BM25Index:
        import bm25s

        return cls(docs, meta, bm25s.BM25.load(str(index_dir / BM25_DIR), show_progress=False))

    def search_positions(self, queries: list[str], topk: int) -> Hits:
        positions: list[list[int]] = []
        scores: list[list[float]] = []
        for start in range(0, len(queries), self.queries_per_product):
            chunk_positions, chunk_scores = self._search_chunk(queries[start : start + self.queries_per_product], topk)
            positions += chunk_positions
            scores += chunk_scores
        return positions, scores

    def _search_chunk(self, queries: list[str], topk: int) -> Hits:
        import bm25s
        import scipy.sparse

        if not queries:
            return [], []
        vocab = self.model.vocab_dict
        tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
        rows, cols = [], []
        for row, query_tokens in enumerate(tokens):
            ids = [vocab[t] for t in query_tokens if t in vocab]  # a repeated term counts again, as in bm25s
            rows += [row] * len(ids)
            cols += ids
        query_terms = scipy.sparse.csr_matrix(
            (np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(queries), self.term_doc_scores.shape[0])
        )  # (nq, V); duplicate (row, term) entries are summed
        doc_scores = (query_terms @ self.term_doc_scores).tocsr()  # (nq, N), only documents sharing a term
        positions, scores = [], []
        for row in range(len(queries)):
            lo, hi = doc_scores.indptr[row], doc_scores.indptr[row + 1]
            row_docs, row_scores = doc_scores.indices[lo:hi], doc_scores.data[lo:hi]
            keep = row_scores > 0
            row_docs, row_scores = row_docs[keep], row_scores[keep]
            if len(row_scores) > topk:
                best = np.argpartition(-row_scores, topk - 1)[:topk]
                row_docs, row_scores = row_docs[best], row_scores[best]
            order = np.lexsort((row_docs, -row_scores))
            positions.append(row_docs[order].tolist())
            scores.append(row_scores[order].tolist())
        return positions, scores


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
        meta["encoder"] = str(encoder.path)
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
    def load_files(cls, index_dir: Path, docs: list[Document], meta: dict[str, Any]) -> DenseIndex:
        import faiss

        from stepsearch.retrieval.encoder import TextEncoder

        build = meta.get("build", {})
        encoder = TextEncoder(
            meta.get("encoder"),
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
        scores, positions = self.faiss_index.search(embeddings, min(topk, len(self.docs)))  # (Q, k) each
        keep = positions >= 0  # IVF/HNSW return -1 when fewer than k neighbours are reachable
        return (
            [row[m].tolist() for row, m in zip(positions, keep)],
            [row[m].tolist() for row, m in zip(scores, keep)],
        )


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

    `params` go to the method's builder: BM25 `k1`, `b`; dense `index_type` (flat|ivf|hnsw), `nlist`, `nprobe`,
    `hnsw_m`, `ef_search`, `batch_size`, `max_length`.
    """
    if method not in INDEX_CLASSES:
        raise RetrieverError(f"unknown index method {method!r} (expected one of {sorted(INDEX_CLASSES)})")
    if method == "bm25" and encoder_path is not None:
        raise RetrieverError("--encoder only applies to --method dense")
    corpus_path = Path(corpus_path).resolve()
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


def load_index(index_dir: str | Path) -> SearchIndex:
    """Load an index directory written by `build_index`."""
    index_dir = Path(index_dir)
    meta = read_index_meta(index_dir)
    docs = load_corpus(index_dir / DOCS_FILE)
    if len(docs) != meta["num_docs"]:
        raise RetrieverError(f"{index_dir}: {DOCS_FILE} has {len(docs)} documents, meta.json says {meta['num_docs']}")
    return INDEX_CLASSES[meta["method"]].load_files(index_dir, docs, meta)  # type: ignore[attr-defined]
