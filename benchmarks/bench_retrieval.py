"""Benchmark: our retrieval server against Search-R1's server shape, side by side on the same index and encoder.

Servers (each in its own process, on the same index files; the query cache is off in ours so every request costs
real index work):
- ours: `stepsearch retriever serve` (aiohttp; round-robin batches over one index worker per core).
- searchr1: Search-R1's retrieval server shape, written here from its documented behaviour: a FastAPI app whose
  synchronous `/retrieve` handler runs on Starlette's thread pool, uvicorn, one process. Per request, dense: one
  encoder call for the request's queries and one FAISS search; BM25: one search per query in a loop (Search-R1 calls
  Pyserini per query). BM25 per query uses our sparse scorer by default, which like Lucene touches only the query
  terms' postings (`--baseline-bm25 stock` uses bm25s's own per-query `retrieve`, a dense pass over the corpus).
  torch/FAISS threads are left at their defaults, as Search-R1 leaves them; uvicorn parses HTTP with httptools when
  installed and runs the standard asyncio loop, as ours does. Needs `pip install stepsearch[bench]`.

Workloads, from `c` concurrent keep-alive clients for c in `--concurrency`, `topk` 3 with scores:
- throughput: `--requests` requests of `q` distinct queries each, for q in `--queries-per-request` (1 and 8),
  `--repeats` times per server with the servers alternating; reports the median queries/s, p50/p99 request latency
  over all runs, our throughput over searchr1's, and queries per CPU-second of the server process (on a shared
  machine the kernel shares CPU per thread, which favours a server with many runnable threads; CPU-seconds do not
  depend on that share).
- mixed (`--mixed`): `--heavy-clients` clients send maximum-size requests (`--heavy-queries` queries) back to back
  while `--light-clients` clients send one-query requests; reports the light requests' p50/p99 latency.
- BM25 parameters (`--bm25-grid`, no servers): recall@1/@3 and MRR@10 of BM25 over a (k1, b) grid on real English
  text available offline: every docstring of the Python standard library and of numpy/scipy/torch with a summary
  line and a body of 30+ words; the query is the summary line, the passage the body (first 150 words) titled with
  the object's name. Numbers depend on the installed library versions. Also prints how many tokens (padding included)
  a dense build pushes through the encoder for these passages in corpus order and sorted by length.

Corpora for the server workloads are generated: `--docs` (BM25) / `--dense-docs` (dense, encoded on CPU) passages of
60-100 English words (Zipf over MiniLM's whole-word vocabulary); queries of 4-8 words with a serial number, so no two
are equal. The load generator is a minimal asyncio HTTP client, so it costs far less CPU than the servers it
measures; it shares the machine with them. Prints tables and writes long-format CSV (method, server, workload,
queries_per_request, concurrency, metric, value, machine) to benchmarks/results/retrieval.csv (`--out`).
`--quick` (small corpora, few requests) takes about two minutes on a 2-core CPU, most of it starting servers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common
import numpy as np

RESULTS = Path(__file__).parent / "results" / "retrieval.csv"
SERVERS = ("ours", "searchr1")
CSV_FIELDS = ["method", "server", "workload", "queries_per_request", "concurrency", "metric", "value", "machine"]


def machine() -> str:
    """The machine every CSV row names: CPU model and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


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


# -- Search-R1's server shape, run as `bench_retrieval.py --serve-searchr1 --index DIR` -------------------------------

def serve_searchr1(index_dir: str, bm25_search: str) -> None:
    """A FastAPI app with a synchronous handler (Starlette runs it on its thread pool), served by uvicorn."""
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    from stepsearch.retrieval.index import import_bm25s, load_index

    index = load_index(index_dir)
    default_topk = 3

    class QueryRequest(BaseModel):
        queries: list[str]
        topk: int | None = None
        return_scores: bool = False

    def search_one_bm25(query: str, topk: int) -> tuple[list[int], list[float]]:
        if bm25_search == "stock":
            tokens = import_bm25s().tokenize([query], stopwords="en", return_ids=False, show_progress=False)
            positions, scores = index.model.retrieve(tokens, k=min(topk, len(index.docs)), show_progress=False,
                                                     n_threads=1)
            keep = scores[0] > 0
            return positions[0][keep].tolist(), scores[0][keep].tolist()
        positions, scores = index.search_positions([query], topk)
        return positions[0], scores[0]

    app = FastAPI()

    def retrieve(request: QueryRequest) -> dict:  # `def`, not `async def`: one thread-pool thread per request
        topk = request.topk or default_topk
        if index.method == "dense":
            embeddings = index.encoder.encode_queries(request.queries)  # one encoder call per request
            scores, positions = index.faiss_index.search(embeddings, topk)  # one FAISS search per request
            hits = list(zip(positions.tolist(), scores.tolist()))
        else:
            hits = [search_one_bm25(query, topk) for query in request.queries]
        result = []
        for positions, scores in hits:
            docs = [{"id": index.docs[p].id, "contents": index.docs[p].contents} for p in positions]
            result.append([{"document": d, "score": s} for d, s in zip(docs, scores)] if request.return_scores
                          else docs)
        return {"result": result}

    retrieve.__annotations__ = {"request": QueryRequest, "return": dict}  # resolved here, not from module globals
    app.post("/retrieve")(retrieve)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # uvicorn.run(host=, port=) gets TCP_NODELAY from asyncio; a socket handed over with `sockets=` does not, and
    # Nagle's algorithm with delayed ACKs would then stall every keep-alive response by ~40 ms.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(2048)  # clients may connect before uvicorn has started: they wait in the backlog
    print(f"searchr1-shaped server on http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, backlog=2048, loop="asyncio")
    uvicorn.Server(config).run(sockets=[listener])


def start(kind: str, index_dir: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    if kind == "ours":
        cmd = [sys.executable, "-m", "stepsearch.cli", "retriever", "serve", "--index", str(index_dir),
               "--port", "0", "--cache-size", "0", *args.ours_args]
    else:
        cmd = [sys.executable, __file__, "--serve-searchr1", "--index", str(index_dir),
               "--baseline-bm25", args.baseline_bm25]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        match = re.search(r"on (http://[\w.:]+)", line)
        if match:
            return process, match.group(1) + "/retrieve"
    process.kill()
    raise RuntimeError(f"{kind} server did not start: {' '.join(cmd)}")


class RawHTTPClient:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams (cheap, so the servers get the CPU)."""

    def __init__(self, url: str) -> None:
        match = re.fullmatch(r"http://([^:/]+):(\d+)(/.*)", url)
        assert match, url
        self.host, self.port, self.path = match.group(1), int(match.group(2)), match.group(3)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        reused = self.writer is not None
        try:
            return await self._post_once(body)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            if not reused:
                raise
            await self.close()  # the server closed an idle keep-alive connection: reconnect once
            return await self._post_once(body)

    async def _post_once(self, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 24)
        assert self.reader is not None
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        header_block = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        status_line, *header_lines = header_block.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        if "content-length" in headers:
            payload = await self.reader.readexactly(int(headers["content-length"]))
        else:  # chunked (uvicorn streams large bodies this way)
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunks.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            payload = b"".join(c[:-2] for c in chunks)
        if status_line.startswith("HTTP/1.0") or headers.get("connection", "").lower() == "close":
            await self.close()
        return int(status_line.split()[1]), payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def _body(queries: list[str]) -> bytes:
    return json.dumps({"queries": queries, "topk": 3, "return_scores": True}).encode()


async def throughput(url: str, requests: list[list[str]], concurrency: int, pid: int
                     ) -> tuple[float, float, np.ndarray]:
    """Send every request from `concurrency` clients; (wall seconds, server CPU seconds, latencies in ms)."""
    latencies: list[float] = []
    cursor = iter(range(len(requests)))
    clients = [RawHTTPClient(url) for _ in range(concurrency)]

    async def run_client(client: RawHTTPClient) -> None:
        for i in cursor:
            sent = time.perf_counter()
            status, answer = await client.post(_body(requests[i]))
            latencies.append((time.perf_counter() - sent) * 1000)
            assert status == 200 and len(json.loads(answer)["result"]) == len(requests[i]), answer[:200]

    for client in clients:  # connect and pay first-request costs (lazy imports) outside the clock
        await client.post(_body(["warm up"]))
    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(run_client(client) for client in clients))
    wall, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu_before
    for client in clients:
        await client.close()
    return wall, cpu, np.asarray(latencies)


async def mixed(url: str, heavy: list[str], light: list[str], heavy_clients: int, light_clients: int
                ) -> tuple[np.ndarray, int]:
    """Light one-query requests while heavy clients send `heavy` back to back; (light latencies ms, heavy done)."""
    stop = asyncio.Event()
    heavy_done = 0
    latencies: list[float] = []
    cursor = iter(light)

    async def heavy_client() -> None:
        nonlocal heavy_done
        client = RawHTTPClient(url)
        while not stop.is_set():
            status, _ = await client.post(_body(heavy))
            assert status == 200
            heavy_done += 1
        await client.close()

    async def light_client() -> None:
        client = RawHTTPClient(url)
        await client.post(_body(["warm up"]))
        for query in cursor:
            sent = time.perf_counter()
            status, _ = await client.post(_body([query]))
            latencies.append((time.perf_counter() - sent) * 1000)
            assert status == 200
        await client.close()

    heavies = [asyncio.create_task(heavy_client()) for _ in range(heavy_clients)]
    await asyncio.sleep(1.0)  # the heavy requests are queued before the light ones start
    await asyncio.gather(*(light_client() for _ in range(light_clients)))
    stop.set()
    await asyncio.gather(*heavies)
    return np.asarray(latencies), heavy_done


def run_servers(args: argparse.Namespace) -> list[dict]:
    from stepsearch.retrieval.index import build_index

    vocabulary = english_vocabulary()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_retrieval_") as tmp:
        root = Path(args.work_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for method in args.methods:
            num_docs = args.dense_docs if method == "dense" else args.docs
            index_dir = root / f"{method}-{num_docs}-index"
            if not (index_dir / "meta.json").is_file():
                write_corpus(root / f"{method}-{num_docs}.jsonl", vocabulary, num_docs, seed=0)
                print(f"building {method} index of {num_docs} passages ...", flush=True)
                started = time.perf_counter()
                build_index(root / f"{method}-{num_docs}.jsonl", index_dir, method=method)
                print(f"  built in {time.perf_counter() - started:.1f} s", flush=True)
            servers = {server: start(server, index_dir, args) for server in args.servers}
            try:  # both servers are up (the idle one costs nothing); each point is measured on both back to back
                rows += _measure(method, {server: url for server, (_, url) in servers.items()},
                                 {server: process.pid for server, (process, _) in servers.items()}, vocabulary, args)
            finally:
                for process, _ in servers.values():
                    process.terminate()
                    process.wait()
    return rows


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _measure(method: str, urls: dict[str, str], pids: dict[str, int], vocabulary: list[str],
             args: argparse.Namespace) -> list[dict]:
    rows = []
    for per_request in args.queries_per_request:
        for concurrency in args.concurrency:
            count = args.requests if concurrency > 1 else max(16, args.requests // 4)
            if method == "dense":
                count = max(16, count // per_request)  # the dense encoder on CPU: keep each point under a minute
            queries = make_queries(vocabulary, count * per_request, seed=1000 * per_request + concurrency)
            requests = [queries[i : i + per_request] for i in range(0, len(queries), per_request)]
            qps: dict[str, list[float]] = {server: [] for server in urls}
            cpu: dict[str, float] = {server: 0.0 for server in urls}
            latencies: dict[str, list[np.ndarray]] = {server: [] for server in urls}
            for repeat in range(args.repeats):  # alternate the order: a machine's load drifts over time
                for server in (list(urls) if repeat % 2 == 0 else list(urls)[::-1]):
                    wall, cpu_used, measured = asyncio.run(throughput(urls[server], requests, concurrency,
                                                                       pids[server]))
                    cpu[server] += cpu_used
                    qps[server].append(len(queries) / wall)
                    latencies[server].append(measured)
            for server in urls:
                pooled = np.concatenate(latencies[server])
                row = {"method": method, "server": server, "workload": "throughput",
                       "queries_per_request": per_request, "concurrency": concurrency,
                       "qps": float(np.median(qps[server])), "p50_ms": float(np.percentile(pooled, 50)),
                       "p99_ms": float(np.percentile(pooled, 99)),
                       "queries_per_cpu_s": len(queries) * args.repeats / max(cpu[server], 1e-9)}
                rows.append(row)
                print(f"  {method:<5} {server:<8} q/req={per_request:<2} c={concurrency:<3} {row['qps']:8.1f} q/s  "
                      f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  "
                      f"{row['queries_per_cpu_s']:8.1f} q/CPU-s  (q/s of each run: "
                      f"{', '.join(f'{v:.0f}' for v in qps[server])})", flush=True)
    if args.mixed:
        heavy = make_queries(vocabulary, args.heavy_queries, seed=7)
        light = make_queries(vocabulary, args.light_requests, seed=8)
        for server, url in urls.items():
            latencies, heavy_done = asyncio.run(mixed(url, heavy, light, args.heavy_clients, args.light_clients))
            row = {"method": method, "server": server,
                   "workload": f"mixed_{args.heavy_clients}x{args.heavy_queries}", "queries_per_request": 1,
                   "concurrency": args.light_clients, "qps": float("nan"),
                   "p50_ms": float(np.percentile(latencies, 50)), "p99_ms": float(np.percentile(latencies, 99)),
                   "heavy_requests_done": heavy_done}
            rows.append(row)
            print(f"  {method:<5} {server:<8} mixed: light p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms "
                  f"({heavy_done} heavy requests answered meanwhile)", flush=True)
    return rows


def report(rows: list[dict], out: Path) -> None:
    host = machine()
    key = lambda r, server: (r["method"], server, r["workload"], r["queries_per_request"], r["concurrency"])  # noqa: E731
    by_key = {key(r, r["server"]): r for r in rows}
    print(f"\nmachine: {host}")
    print(f"{'method':<6} {'workload':<14} {'q/req':>5} {'conc':>4} {'server':<9} {'q/s':>9} {'p50 ms':>9} "
          f"{'p99 ms':>9} {'q/CPU-s':>9} {'x searchr1':>10}")
    long_rows = []
    for r in rows:
        base = by_key.get(key(r, "searchr1"))
        ratio = r["qps"] / base["qps"] if base and r["workload"] == "throughput" else float("nan")
        print(f"{r['method']:<6} {r['workload']:<14} {r['queries_per_request']:>5} {r['concurrency']:>4} "
              f"{r['server']:<9} {r['qps']:>9.1f} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} "
              f"{r.get('queries_per_cpu_s', float('nan')):>9.1f} {ratio:>10.2f}")
        metrics = {"qps": r["qps"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "throughput_vs_searchr1": ratio,
                   "queries_per_cpu_s": r.get("queries_per_cpu_s", float("nan"))}
        if "heavy_requests_done" in r:
            metrics["heavy_requests_done"] = r["heavy_requests_done"]
        for metric, value in metrics.items():
            if value == value:  # NaN: not measured for this workload
                long_rows.append({**{k: r[k] for k in CSV_FIELDS[:5]}, "metric": metric, "value": round(value, 4),
                                  "machine": host})
    bench_common.write_csv(out, long_rows, CSV_FIELDS)


# -- BM25 parameters on real text ---------------------------------------------------------------------------------

def docstring_pairs() -> list[tuple[str, str, str]]:
    """(object name, summary line, body) for documented objects of the standard library, numpy, scipy and torch."""
    import importlib
    import inspect
    import warnings

    warnings.filterwarnings("ignore")
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in skip)
    names += ["numpy", "scipy.sparse", "scipy.stats", "scipy.linalg", "scipy.optimize", "scipy.signal", "torch",
              "torch.nn", "torch.nn.functional"]
    seen: set[int] = set()
    pairs = []

    def add(name: str, obj: object) -> None:
        doc = inspect.getdoc(obj)
        if not doc or id(obj) in seen:
            return
        seen.add(id(obj))
        summary, _, body = doc.strip().partition("\n\n")
        summary, body = " ".join(summary.split()), " ".join(body.split())
        if len(summary.split()) >= 4 and len(body.split()) >= 30:
            pairs.append((name, summary, " ".join(body.split()[:150])))

    for module_name in names:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # a module this platform lacks (or that fails to import) just adds nothing
            continue
        for name, obj in vars(module).items():
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            add(name, obj)
            if inspect.isclass(obj):
                for method_name, method in vars(obj).items():
                    if not method_name.startswith("_") and inspect.isfunction(method):
                        add(method_name, method)
    return pairs


def encoder_tokens(texts: list[str], batch_size: int = 128) -> tuple[int, int, int]:
    """Tokens a dense build pushes through the encoder, padding included: (in input order, as `TextEncoder` batches
    them, real)."""
    from stepsearch.retrieval.encoder import TextEncoder

    encoder = TextEncoder(max_length=256)
    lengths = [len(ids) for ids in encoder.tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    in_order = sum(len(lengths[s : s + batch_size]) * max(lengths[s : s + batch_size])
                   for s in range(0, len(lengths), batch_size))
    sorted_batches = sum(len(rows) * max(len(ids) for ids in encoded["input_ids"])
                         for rows, encoded in encoder._length_sorted_batches(texts, batch_size))
    return in_order, sorted_batches, sum(lengths)


def bm25_grid(args: argparse.Namespace) -> None:
    from stepsearch.retrieval.index import build_index

    pairs = docstring_pairs()
    print(f"{len(pairs)} docstring (summary, body) pairs", flush=True)
    unsorted, sorted_, real = encoder_tokens([f'"{name}"\n{body}' for name, _, body in pairs])
    print(f"dense build, batches of 128: {unsorted / real:.2f}x the real tokens through the encoder in corpus order, "
          f"{sorted_ / real:.2f}x sorted by length", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_bm25_") as tmp:
        corpus = Path(tmp) / "docstrings.jsonl"
        with corpus.open("w", encoding="utf-8") as handle:
            for i, (name, _, body) in enumerate(pairs):
                handle.write(json.dumps({"id": str(i), "contents": f'"{name}"\n{body}'}) + "\n")
        queries = [summary for _, summary, _ in pairs]
        for k1 in (0.5, 0.9, 1.2, 1.5, 2.0):
            for b in (0.3, 0.4, 0.6, 0.75, 0.9):
                index = build_index(corpus, Path(tmp) / f"index-{k1}-{b}", method="bm25", k1=k1, b=b)
                positions, _ = index.search_positions(queries, 10)
                ranks = [hits.index(i) + 1 if i in hits else None for i, hits in enumerate(positions)]
                row = {"k1": k1, "b": b, "recall@1": np.mean([r == 1 for r in ranks]),
                       "recall@3": np.mean([r is not None and r <= 3 for r in ranks]),
                       "mrr@10": np.mean([1 / r if r else 0.0 for r in ranks])}
                rows.append(row)
                print(f"k1={k1:<4} b={b:<5} R@1 {row['recall@1']:.4f}  R@3 {row['recall@3']:.4f}  "
                      f"MRR@10 {row['mrr@10']:.4f}", flush=True)
    out = args.out.with_name("bm25_params.csv") if args.out == RESULTS else args.out
    long_rows = [{"k1": row["k1"], "b": row["b"], "metric": metric, "value": round(row[metric], 4),
                  "queries": len(pairs)} for row in rows for metric in ("recall@1", "recall@3", "mrr@10")]
    bench_common.write_csv(out, long_rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small corpora and few requests (about two minutes)")
    parser.add_argument("--docs", type=int, default=20000, help="BM25 corpus size")
    parser.add_argument("--dense-docs", type=int, default=2000, help="dense corpus size (encoded on CPU)")
    parser.add_argument("--requests", type=int, default=512, help="requests per point (dense: divided by q/req)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per point and server, alternating the servers (median q/s, pooled latencies)")
    parser.add_argument("--queries-per-request", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--methods", nargs="+", choices=["bm25", "dense"], default=["bm25", "dense"])
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the heavy+light mix (small-query latency under maximum-size requests)")
    parser.add_argument("--heavy-clients", type=int, default=8)
    parser.add_argument("--heavy-queries", type=int, default=512, help="queries per heavy request (ours' maximum)")
    parser.add_argument("--light-clients", type=int, default=4)
    parser.add_argument("--light-requests", type=int, default=200)
    parser.add_argument("--ours-args", nargs=argparse.REMAINDER, default=[],
                        help="extra `stepsearch retriever serve` arguments (last on the line)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--baseline-bm25", choices=["ours", "stock"], default="ours",
                        help="BM25 per query in the searchr1 server: our postings-only scorer (like Lucene), or "
                             "bm25s's own `retrieve` (a dense pass over the corpus per query)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep corpora and indexes here and reuse them across runs (default: a temp dir)")
    parser.add_argument("--bm25-grid", action="store_true", help="only measure BM25 k1/b on docstrings (no servers)")
    parser.add_argument("--serve-searchr1", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_searchr1:
        serve_searchr1(args.index, args.baseline_bm25)
        return
    if args.bm25_grid:
        bm25_grid(args)
        return
    if args.quick:
        args.docs, args.dense_docs, args.requests, args.repeats = 2000, 300, 128, 1
        args.heavy_queries, args.light_requests = 128, 40
    report(run_servers(args), args.out)


if __name__ == "__main__":
    main()
