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
        return LocalRetriever(load_index(cfg.index_dir, encoder_path=cfg.encoder_path),
                              max_query_chars=cfg.max_query_chars)
    if corpus_path is None or work_dir is None:
        raise RetrieverError("retriever: set retriever.url or retriever.index_dir, or give a corpus and a work "
                             "directory to build an index in")
    corpus_path = Path(corpus_path).resolve()
    index_dir = Path(work_dir) / f"index-{cfg.method}"
    if cfg.method == "dense":
        encoder_path, params = cfg.encoder_path, {}
    else:
        encoder_path, params = None, {"k1": cfg.bm25_k1, "b": cfg.bm25_b}
    if _indexes(index_dir, corpus_path, encoder_path, params):
        index = load_index(index_dir, encoder_path=encoder_path)
    else:
        index = build_index(corpus_path, index_dir, method=cfg.method, encoder_path=encoder_path, **params)
    return LocalRetriever(index, max_query_chars=cfg.max_query_chars)


def _indexes(index_dir: Path, corpus_path: Path, encoder_path: str | None, params: dict[str, float]) -> bool:
    """Whether `index_dir` already holds an index of this very corpus file (same path, size, mtime), built the same
    way (BM25 k1/b; the same encoder, by fingerprint)."""
    from stepsearch.retrieval.encoder import default_encoder_path
    from stepsearch.retrieval.index import META_FILE, encoder_fingerprint, read_index_meta

    if not (index_dir / META_FILE).is_file() or not corpus_path.is_file():
        return False
    meta = read_index_meta(index_dir)
    stat = corpus_path.stat()
    if meta["method"] == "dense":
        encoder = Path(encoder_path) if encoder_path is not None else default_encoder_path()
        same_build = (encoder / "config.json").is_file() and encoder_fingerprint(encoder) == meta.get(
            "encoder_fingerprint")
    else:
        same_build = all(meta.get("build", {}).get(name) == value for name, value in params.items())
    return (meta.get("corpus_path") == str(corpus_path) and meta.get("corpus_size_bytes") == stat.st_size
            and meta.get("corpus_mtime_ns") == stat.st_mtime_ns and same_build)
