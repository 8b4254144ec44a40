"""Benchmark: retrieval server throughput and latency, ours (aiohttp + micro-batching) versus Search-R1-style servers.

Workload: a generated corpus of `--docs` passages (`--dense-docs` for the dense index, whose build encodes every
passage on CPU), 60-100 English words each (Zipf over MiniLM's whole-word vocabulary); `--requests` distinct
queries of 4-8 words, each sent as its own one-query request (as rollout workers do), `topk` 3 with scores,
from `c` concurrent keep-alive clients for c in `--concurrency`. The query cache is off in every server, so
every request costs real index work.

Servers (same index files, each in its own process with OMP_NUM_THREADS=`--server-threads`, default 1):
- ours: `stepsearch retriever serve` (aiohttp; concurrent requests merged into one encoder/index call; BM25 by
  one sparse query-term x term-document product per batch).
- blocking: a stdlib `http.server.HTTPServer` that handles one request at a time, like Search-R1's retrieval
  server does under load (one request -> one encoder/index call, nothing overlapped). Dense: the same encoder and
  FAISS code as ours, one query at a time. BM25: bm25s's own per-query `retrieve` (`--baseline-search stock`, the
  default) or our scorer (`--baseline-search ours`, which isolates the server design). Target: >= 5x its
  throughput at 64 clients.
- threaded: `ThreadingHTTPServer`, one thread per request and still no batching (closest to FastAPI's thread
  pool that Search-R1's `def` endpoint runs in); reported for context.

Prints a table and writes long-format CSV (method, server, concurrency, metric, value) to
benchmarks/results/retrieval.csv. `--quick` (small corpora, 64 requests, ours vs blocking only) takes about half a
minute on a laptop CPU, most of it building the dense index and starting servers.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "retrieval.csv"
SERVERS = ("ours", "blocking", "threaded")


def english_vocabulary() -> list[str]:
    """Whole English words (one WordPiece token each) from the MiniLM vocabulary, in the vocabulary's order."""
    from stepsearch.retrieval.encoder import default_encoder_path

    words = (default_encoder_path() / "vocab.txt").read_text(encoding="utf-8").split("\n")
    return [w for w in words if w.isalpha() and w.isascii() and len(w) >= 3]


def write_corpus(path: Path, vocabulary: list[str], num_docs: int, seed: int) -> None:
    """Passages of 60-100 words drawn from a Zipf distribution over `vocabulary`."""
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    with path.open("w", encoding="utf-8") as handle:
        for i in range(num_docs):
            words = rng.choices(vocabulary, weights=weights, k=rng.randint(60, 100))
            handle.write(json.dumps({"id": str(i), "contents": f'"Title {i}"\n' + " ".join(words)}) + "\n")


def make_queries(vocabulary: list[str], count: int, seed: int) -> list[str]:
    """Distinct 4-8 word queries (a serial number keeps them distinct, so no cache could help)."""
    rng = random.Random(seed)
    head = vocabulary[100:3000]  # past the most frequent words, as real queries skip stop words
    return [" ".join(rng.sample(head, rng.randint(3, 7))) + f" {i}" for i in range(count)]


# -- the Search-R1-style baseline server, run as `bench_retrieval.py --serve-baseline KIND --index DIR` ----------

def stock_bm25_search(index, queries: list[str], topk: int) -> list[list]:
    """BM25 the way a per-request server uses the library: bm25s's own `retrieve` (one dense score pass per query)."""
    import bm25s

    from stepsearch.retrieval.base import Document

    tokens = bm25s.tokenize(queries, stopwords="en", return_ids=False, show_progress=False)
    positions, scores = index.model.retrieve(tokens, k=min(topk, len(index.docs)), show_progress=False, n_threads=1)
    return [[Document(index.docs[p].id, index.docs[p].title, index.docs[p].text, float(s))
             for p, s in zip(row_pos, row_scores) if s > 0] for row_pos, row_scores in zip(positions, scores)]


def serve_baseline(kind: str, index_dir: str, search: str) -> None:
    from stepsearch.retrieval.index import load_index
    from stepsearch.retrieval.local import LocalRetriever

    index = load_index(index_dir)
    local = LocalRetriever(index, cache_size=0)

    def retrieve(queries: list[str], topk: int) -> list[list]:
        if search == "stock" and index.method == "bm25":
            return stock_bm25_search(index, queries, topk)
        return local.search(queries, topk)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            results = retrieve(payload["queries"], payload.get("topk", 3))
            body = json.dumps({"result": [
                [{"document": {"id": d.id, "contents": d.contents}, "score": d.score} for d in docs]
                for docs in results]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server_class = HTTPServer if kind == "blocking" else ThreadingHTTPServer
    server_class.request_queue_size = 1024  # a deep accept backlog, so the baseline never drops connections
    server = server_class(("127.0.0.1", 0), Handler)
    print(f"baseline {kind} server on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


def start(kind: str, index_dir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    if kind == "ours":
        cmd = [sys.executable, "-m", "stepsearch.cli", "retriever", "serve", "--index", str(index_dir),
               "--port", "0", "--cache-size", "0"]
    else:
        cmd = [sys.executable, __file__, "--serve-baseline", kind, "--index", str(index_dir),
               "--baseline-search", args.baseline_search]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(args.server_threads)})
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"on (http://\S+)", line)
        if match:
            return process, match.group(1) + "/retrieve"
    process.kill()
    raise RuntimeError(f"{kind} server did not start: {' '.join(cmd)}")


class RawHTTPClient:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams, so the load generator costs far less CPU than the
    servers it measures (the benchmark shares the machine with them). Reconnects when the server closes."""

    def __init__(self, url: str) -> None:
        match = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", url)
        assert match, url
        self.host, self.port, self.path = match.group(1), int(match.group(2)), match.group(3)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        header_block = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *header_lines = header_block.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        payload = await self.reader.readexactly(int(headers["content-length"]))
        if status_line.startswith("HTTP/1.0") or headers.get("connection", "").lower() == "close":
            await self.close()
        return int(status_line.split()[1]), payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def load(url: str, queries: list[str], concurrency: int) -> tuple[float, np.ndarray]:
    """Send every query as its own request from `concurrency` clients; (wall seconds, latencies in ms)."""
    latencies: list[float] = []
    cursor = iter(range(len(queries)))
    clients = [RawHTTPClient(url) for _ in range(concurrency)]

    async def run_client(client: RawHTTPClient) -> None:
        for i in cursor:
            body = json.dumps({"queries": [queries[i]], "topk": 3, "return_scores": True}).encode()
            sent = time.perf_counter()
            status, answer = await client.post(body)
            latencies.append((time.perf_counter() - sent) * 1000)
            assert status == 200 and len(json.loads(answer)["result"]) == 1, answer[:200]

    for client in clients[:4]:  # first-request costs (connection, lazy imports) are not throughput
        await client.post(json.dumps({"queries": ["warm up"], "topk": 3}).encode())
    started = time.perf_counter()
    await asyncio.gather(*(run_client(client) for client in clients))
    wall = time.perf_counter() - started
    for client in clients:
        await client.close()
    return wall, np.asarray(latencies)


def run(args: argparse.Namespace) -> list[dict]:
    from stepsearch.retrieval.index import build_index

    vocabulary = english_vocabulary()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as tmp:
        root = Path(args.work_dir or tmp)
        for method in args.methods:
            num_docs = args.dense_docs if method == "dense" else args.docs
            index_dir = root / f"{method}-{num_docs}-index"
            if not (index_dir / "meta.json").is_file():
                write_corpus(root / f"{method}-{num_docs}.jsonl", vocabulary, num_docs, seed=0)
                print(f"building {method} index of {num_docs} passages ...", flush=True)
                build_index(root / f"{method}-{num_docs}.jsonl", index_dir, method=method)
            for server in args.servers:
                process, url = start(server, index_dir, args)
                try:
                    for concurrency in args.concurrency:
                        requests = args.requests if concurrency > 1 else max(16, args.requests // 4)
                        queries = make_queries(vocabulary, requests, seed=concurrency)
                        wall, latencies = asyncio.run(load(url, queries, concurrency))
                        row = {"method": method, "server": server, "concurrency": concurrency,
                               "requests": requests, "qps": requests / wall,
                               "p50_ms": float(np.percentile(latencies, 50)),
                               "p99_ms": float(np.percentile(latencies, 99))}
                        rows.append(row)
                        print(f"  {method:<5} {server:<8} c={concurrency:<3} {row['qps']:8.1f} q/s  "
                              f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms", flush=True)
                finally:
                    process.terminate()
                    process.wait()
    return rows


def report(rows: list[dict], out: Path) -> None:
    qps = {(r["method"], r["server"], r["concurrency"]): r["qps"] for r in rows}
    print(f"\n{'method':<6} {'conc':>4} {'server':<9} {'q/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'x blocking':>11}")
    long_rows = []
    for r in rows:
        base = qps.get((r["method"], "blocking", r["concurrency"]))
        ratio = r["qps"] / base if base else float("nan")
        print(f"{r['method']:<6} {r['concurrency']:>4} {r['server']:<9} {r['qps']:>9.1f} {r['p50_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f} {ratio:>11.2f}")
        for metric in ("qps", "p50_ms", "p99_ms"):
            long_rows.append({**{k: r[k] for k in ("method", "server", "concurrency")}, "metric": metric,
                              "value": round(r[metric], 4)})
        long_rows.append({**{k: r[k] for k in ("method", "server", "concurrency")},
                          "metric": "throughput_vs_blocking", "value": round(ratio, 4)})
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "server", "concurrency", "metric", "value"])
        writer.writeheader()
        writer.writerows(long_rows)
    print(f"\nwrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small corpus and few requests (seconds)")
    parser.add_argument("--docs", type=int, default=20000, help="BM25 corpus size")
    parser.add_argument("--dense-docs", type=int, default=2000, help="dense corpus size (encoded on CPU)")
    parser.add_argument("--requests", type=int, default=512, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--methods", nargs="+", choices=["bm25", "dense"], default=["bm25", "dense"])
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--baseline-search", choices=["stock", "ours"], default="stock",
                        help="BM25 search in the baseline servers: bm25s's per-query retrieve (stock, what a "
                             "per-request server calls) or our batched sparse scorer (isolates the server design)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep corpora and indexes here and reuse them across runs (default: a temp dir)")
    parser.add_argument("--server-threads", type=int, default=1, help="OMP/torch threads of every server process")
    parser.add_argument("--serve-baseline", choices=["blocking", "threaded"], help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, args.index, args.baseline_search)
        return
    if args.quick:
        args.docs, args.dense_docs, args.requests = 2000, 200, 64
        if args.servers == list(SERVERS):
            args.servers = ["ours", "blocking"]  # each dense server start imports torch: skip the context one
    report(run(args), args.out)


if __name__ == "__main__":
    main()
