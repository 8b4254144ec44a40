"""Benchmark: multi-turn search rollouts — trajectories/s, tokens/s and the time split generate/retrieve/bookkeeping.

The policy is the tiny Qwen2 model, warm-started for a few supervised steps on gold search trajectories of a
synthetic world so that it actually emits `<search>…</search>` and `<answer>…</answer>` (a random model never
closes a tag and would measure one turn only). Retrieval is BM25 in-process. For each batch size the rollout runs
`--repeats` times (first run discarded as warm-up) and the median is reported.

Bookkeeping is everything in `run_agent_loop` that is neither `engine.generate` nor `retriever.search` (query
extraction, information-block tokenization, masks, collation); the target is < 5% of the total. The reference
is the peers' bookkeeping (Search-R1, verl's agent loop before token-level tracking), which does the same work plus
decoding the whole context to text and re-tokenizing it after every turn; the extra cost is measured on the same
trajectories and reported as the ratio (ours + re-tokenization) / ours.

Row groups (`--row-groups`, `run_agent_loop(row_groups=...)`): 1 is the turn-synchronous loop; more groups let
trajectories advance independently and overlap one group's retrieval with the others' generation. `--simulated`
replaces the model by an engine that answers with the gold turns after a latency that varies per row like a real
multi-turn batch (a decode time per token times the slowest row of the call, lognormal lengths), and retrieval by
BM25 plus a fixed round-trip, so the scheduling gain is measured without a GPU and without loading the CPU; it runs
the engine both serialised (one call at a time, like HF) and concurrent (like SGLang's server batching requests).

    python benchmarks/bench_rollout.py --quick      # seconds on CPU
    python benchmarks/bench_rollout.py --simulated  # scheduling only: sleeps, no model
    python benchmarks/bench_rollout.py --engine sglang --model PATH   # GPU with SGLang installed

Writes long-format CSV to benchmarks/results/rollout.csv (device, engine, batch_size, row_groups, metric, value).
"""
from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_common
import torch

from stepsearch.config import ModelConfig, RolloutConfig
from stepsearch.data.loaders import load_records
from stepsearch.data.synth import gold_trajectory, write_world
from stepsearch.models.tiny import build_tiny_model, fit_tiny_model
from stepsearch.models.tokenizer import train_tokenizer
from stepsearch.retrieval.corpus import load_corpus
from stepsearch.retrieval.index import build_index
from stepsearch.retrieval.local import LocalRetriever
from stepsearch.rollout.agent_loop import run_agent_loop
from stepsearch.rollout.engine import HFEngine, SGLangEngine
from stepsearch.rollout.prompts import render_instruction
from stepsearch.rollout.render import INFORMATION_PREFIX, INFORMATION_SUFFIX, format_documents
from stepsearch.rollout.types import Generation

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "rollout.csv"
SIMULATED_RESULTS_PATH = RESULTS_PATH.with_name("rollout_simulated.csv")


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU run, seconds")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated questions per rollout (default 8,32; quick 8)")
    parser.add_argument("--fit-steps", type=int, default=None, help="warm-start steps (default 80; quick 30)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rollouts per batch size (default 3; quick 2)")
    parser.add_argument("--engine", choices=["hf", "sglang"], default="hf")
    parser.add_argument("--row-groups", default="1,4", help="comma-separated row-group counts to compare")
    parser.add_argument("--simulated", action="store_true", help="latency-model engine and retriever (sleeps)")
    parser.add_argument("--sim-token-ms", type=float, default=1.0, help="simulated decode time per token (ms)")
    parser.add_argument("--sim-retrieve-ms", type=float, default=40.0, help="simulated retrieval round-trip (ms)")
    parser.add_argument("--model", default=None, help="checkpoint directory for --engine sglang")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV path (default results/rollout.csv, results/rollout_simulated.csv with --simulated)")
    return parser.parse_args(argv)


def _gold_text(record, retriever) -> str:
    text = render_instruction(record.question, "paper")
    for step in gold_trajectory(record).steps:
        docs = retriever.search([step.query], 3)[0]
        text += (f"<think>{step.sub_question}</think>\n<search>{step.query}</search>"
                 f"{INFORMATION_PREFIX}{format_documents(docs)}{INFORMATION_SUFFIX}")
    return text + f"<think>done</think>\n<answer>{gold_trajectory(record).final_answer}</answer>"


def _retokenize_seconds(batch, tokenizer) -> float:
    """Peers' bookkeeping on the same trajectories: decode the context and re-tokenize it after every turn."""
    start = time.perf_counter()
    for row in range(len(batch)):
        length = int(batch.response_mask[row].sum())
        ids = batch.prompt_ids[row] + batch.response_ids[row, :length].tolist()
        prompt_length = len(batch.prompt_ids[row])
        turn_ends = [int(e) + prompt_length for e in batch.step_ends[row].tolist() if e >= 0] + [len(ids) - 1]
        for end in turn_ends:
            tokenizer.encode(tokenizer.decode(ids[: end + 1]), add_special_tokens=False)
    return time.perf_counter() - start


class _SimulatedEngine:
    """Answers each prompt with its record's next gold turn after `overhead + token_s x slowest row` of sleep.

    A row's simulated decode length is lognormal (median 80 tokens, sigma 0.8: a few rows think much longer), fixed
    per (question, turn) so every scheduling sees the same work. `concurrent_calls` models an engine that batches
    concurrent requests (SGLang, in-process or over HTTP) rather than one that runs one call at a time (HF)."""

    def __init__(self, tokenizer, turns_by_question, token_s, concurrent_calls):
        self.tokenizer, self.turns_by_question, self.token_s = tokenizer, turns_by_question, token_s
        self.concurrent_calls = concurrent_calls

    def _decode_length(self, question, turn):
        generator = random.Random(f"{question}:{turn}")
        return min(int(generator.lognormvariate(math.log(80), 0.8)), 1024)

    def generate(self, prompts, *, max_new_tokens, stop_strings, temperature, top_p, seed=None):
        out, slowest = [], 0
        for prompt in prompts:
            text = self.tokenizer.decode(prompt)
            question = text.split("Question: ")[-1].split("\n")[0].strip()
            turn = text.split("Question: ")[-1].count("<information>")
            turns = self.turns_by_question[question]
            ids = self.tokenizer.encode(turns[min(turn, len(turns) - 1)], add_special_tokens=False)[:max_new_tokens]
            out.append(Generation(ids, [-0.5] * len(ids), "stop"))
            slowest = max(slowest, self._decode_length(question, turn))
        time.sleep(0.005 + self.token_s * slowest)
        return out


class _DelayedRetriever:
    """The real retriever plus a fixed round-trip per call (a remote retrieval server)."""

    def __init__(self, inner, seconds):
        self.inner, self.seconds = inner, seconds

    def search(self, queries, topk):
        time.sleep(self.seconds)
        return self.inner.search(queries, topk)


def _gold_turns(record, retriever) -> list[str]:
    gold = gold_trajectory(record)
    turns = [f"<think>{step.sub_question}</think>\n<search>{step.query}</search>" for step in gold.steps]
    return turns + [f"<think>done</think>\n<answer>{gold.final_answer}</answer>"]


def _simulated(args, records, retriever, tokenizer, cfg, batch_sizes, group_counts, repeats) -> list[dict]:
    turns_by_question = {record.question.strip(): _gold_turns(record, retriever) for record in records}
    delayed = _DelayedRetriever(retriever, args.sim_retrieve_ms / 1000)
    rows = []
    print(f"\nsimulated engine: {args.sim_token_ms} ms/token x slowest row per call, retrieval +"
          f"{args.sim_retrieve_ms} ms per call; median of {repeats}")
    print(f"{'engine':>10} {'B':>4} {'groups':>6} {'total s':>8} {'traj/s':>7} {'speed-up':>8}")
    for concurrent in (False, True):
        engine = _SimulatedEngine(tokenizer, turns_by_question, args.sim_token_ms / 1000, concurrent)
        name = "sim-concurrent" if concurrent else "sim-serial"
        for batch_size in batch_sizes:
            baseline = None
            for groups in group_counts:
                totals = []
                for repeat in range(repeats):
                    batch = run_agent_loop(engine, delayed, tokenizer, records[:batch_size], cfg, topk=3, seed=repeat,
                                           row_groups=groups)
                    totals.append(batch.timings["total_s"])
                total = statistics.median(totals)
                baseline = total if baseline is None else baseline
                print(f"{name:>10} {batch_size:>4} {groups:>6} {total:>8.3f} {batch_size / total:>7.2f} "
                      f"{baseline / total:>7.2f}x")
                for metric, value in (("total_s", total), ("trajectories_per_s", batch_size / total),
                                      ("speedup_over_first_row_groups", baseline / total)):
                    rows.append({"device": "simulated", "engine": name, "batch_size": batch_size,
                                 "row_groups": groups, "metric": metric, "value": f"{value:.6g}"})
    return rows


def main(argv=None) -> int:
    args = _parse_args(argv)
    quick = args.quick
    batch_sizes = [int(b) for b in (args.batch_sizes or ("8" if quick else "8,32")).split(",")]
    fit_steps = args.fit_steps if args.fit_steps is not None else (30 if quick else 80)
    repeats = args.repeats if args.repeats is not None else (2 if quick else 3)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    files = write_world(work / "world", seed=0, num_train=max(batch_sizes) + 16, num_test=8)
    records = load_records(files.train).records
    retriever = LocalRetriever(build_index(files.corpus, work / "index", "bm25"))
    gold_texts = [_gold_text(r, retriever) for r in records[:16]]
    tokenizer = train_tokenizer(gold_texts + [d.text for d in load_corpus(files.corpus)], vocab_size=2048)
    cfg = RolloutConfig(max_turns=4, max_new_tokens_per_turn=64, max_information_tokens=256, max_response_tokens=1024,
                        temperature=1.0)
    group_counts = [int(g) for g in args.row_groups.split(",")]
    if args.simulated:
        rows = _simulated(args, records, retriever, tokenizer, cfg, batch_sizes, group_counts, repeats)
        bench_common.write_csv(args.out or SIMULATED_RESULTS_PATH, rows)
        return 0
    if args.engine == "sglang":
        if args.model is None:
            print("bench_rollout: --engine sglang needs --model PATH", file=sys.stderr)
            return 2
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        engine = SGLangEngine(tokenizer, model_path=args.model)
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda"
    else:
        model = build_tiny_model(ModelConfig(), tokenizer)
        tick = time.perf_counter()
        losses = fit_tiny_model(model, tokenizer, gold_texts[:8], steps=fit_steps, lr=5e-3)
        print(f"warm start: {fit_steps} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f} "
              f"({time.perf_counter() - tick:.1f}s, not timed)")
        model.to(device)
        engine = HFEngine(model, tokenizer, device)
        device_name = (torch.cuda.get_device_name() if device == "cuda"
                       else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")

    rows, table = [], []
    for batch_size, groups in [(b, g) for b in batch_sizes for g in group_counts]:
        chunk = records[:batch_size]
        runs = []
        for repeat in range(repeats + 1):
            batch = run_agent_loop(engine, retriever, tokenizer, chunk, cfg, topk=3, seed=repeat, row_groups=groups)
            if repeat:
                runs.append((batch.timings, int(batch.loss_mask.sum()), int(batch.response_mask.sum()),
                             sum(batch.num_searches), _retokenize_seconds(batch, tokenizer)))
        total = statistics.median(t["total_s"] for t, *_ in runs)
        generate = statistics.median(t["generate_s"] for t, *_ in runs)
        retrieve = statistics.median(t["retrieve_s"] for t, *_ in runs)
        bookkeeping = statistics.median(t["bookkeeping_s"] for t, *_ in runs)
        generated = statistics.median(r[1] for r in runs)
        tokens = statistics.median(r[2] for r in runs)
        searches = statistics.median(r[3] for r in runs)
        retokenize = statistics.median(r[4] for r in runs)
        metrics = {
            "trajectories_per_s": batch_size / total, "generated_tokens_per_s": generated / total,
            "response_tokens_per_s": tokens / total, "searches_per_trajectory": searches / batch_size,
            "total_s": total, "generate_s": generate, "retrieve_s": retrieve, "bookkeeping_s": bookkeeping,
            "bookkeeping_fraction": bookkeeping / total, "retokenize_extra_s": retokenize,
            "peer_bookkeeping_over_ours": (bookkeeping + retokenize) / max(bookkeeping, 1e-9),
        }
        for metric, value in metrics.items():
            rows.append({"device": device_name, "engine": args.engine, "batch_size": batch_size,
                         "row_groups": groups, "metric": metric, "value": f"{value:.6g}"})
        table.append(((batch_size, groups), metrics))

    print(f"\nrollout benchmark on {device_name}, engine={args.engine}, median of {repeats}")
    header = (f"{'B':>4} {'groups':>6} {'traj/s':>8} {'gen tok/s':>10} {'searches':>9} {'gen %':>6} {'retr %':>7} "
              f"{'book %':>7} {'peer/ours':>10}")
    print(header)
    for (batch_size, groups), m in table:
        print(f"{batch_size:>4} {groups:>6} {m['trajectories_per_s']:>8.2f} {m['generated_tokens_per_s']:>10.1f} "
              f"{m['searches_per_trajectory']:>9.2f} {100 * m['generate_s'] / m['total_s']:>6.1f} "
              f"{100 * m['retrieve_s'] / m['total_s']:>7.1f} {100 * m['bookkeeping_fraction']:>7.2f} "
              f"{m['peer_bookkeeping_over_ours']:>9.1f}x")
    bench_common.write_csv(args.out or RESULTS_PATH, rows)
    worst = max(m["bookkeeping_fraction"] for _, m in table)
    print(f"bookkeeping {'<' if worst < 0.05 else '>='} 5% of the total (worst {100 * worst:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
