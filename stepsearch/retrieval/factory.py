"""One entry point from configuration to a `Retriever`: HTTP client, loaded index, or an index built on the spot."""
from __future__ import annotations

from pathlib import Path

from stepsearch.config import RetrieverConfig
from stepsearch.retrieval.base import Retriever, RetrieverError


def make_retriever(
    cfg: RetrieverConfig, corpus_path: str | Path | None = None, work_dir: str | Path | None = None
) -> Retriever:
    """`cfg.url` -> `HTTPRetriever`; else `cfg.index_dir` -> `LocalRetriever` over it; else index `corpus_path`
    with `cfg.method` into `work_dir/index-<method>` (reused when it already indexes that same corpus file)."""
    if cfg.url:
        from stepsearch.retrieval.client import HTTPRetriever

        return HTTPRetriever(cfg.url, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                             max_query_chars=cfg.max_query_chars)

    from stepsearch.retrieval.index import build_index, load_index
    from stepsearch.retrieval.local import LocalRetriever

    if cfg.index_dir:
        return LocalRetriever(load_index(cfg.index_dir), max_query_chars=cfg.max_query_chars)
    if corpus_path is None or work_dir is None:
        raise RetrieverError("retriever: set retriever.url or retriever.index_dir, or give a corpus and a work "
                             "directory to build an index in")
    corpus_path = Path(corpus_path).resolve()
    index_dir = Path(work_dir) / f"index-{cfg.method}"
    if _indexes(index_dir, corpus_path, cfg.encoder_path if cfg.method == "dense" else None):
        index = load_index(index_dir)
    else:
        index = build_index(corpus_path, index_dir, method=cfg.method,
                            encoder_path=cfg.encoder_path if cfg.method == "dense" else None)
    return LocalRetriever(index, max_query_chars=cfg.max_query_chars)


def _indexes(index_dir: Path, corpus_path: Path, encoder_path: str | None) -> bool:
    """Whether `index_dir` already holds an index of this very corpus file (same path, size, mtime, encoder)."""
    from stepsearch.retrieval.index import META_FILE, read_index_meta

    if not (index_dir / META_FILE).is_file() or not corpus_path.is_file():
        return False
    meta = read_index_meta(index_dir)
    stat = corpus_path.stat()
    same_encoder = encoder_path is None or Path(encoder_path).resolve() == Path(meta.get("encoder") or "").resolve()
    return (meta.get("corpus_path") == str(corpus_path) and meta.get("corpus_size_bytes") == stat.st_size
            and meta.get("corpus_mtime_ns") == stat.st_mtime_ns and same_encoder)
