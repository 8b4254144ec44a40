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

    python benchmarks/bench_rollout.py --quick      # seconds on CPU
    python benchmarks/bench_rollout.py --engine sglang --model PATH   # GPU with SGLang installed

Writes long-format CSV to benchmarks/results/rollout.csv (device, engine, batch_size, metric, value).
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

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

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "rollout.csv"


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small CPU run, seconds")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated questions per rollout (default 8,32; quick 8)")
    parser.add_argument("--fit-steps", type=int, default=None, help="warm-start steps (default 80; quick 30)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rollouts per batch size (default 3; quick 2)")
    parser.add_argument("--engine", choices=["hf", "sglang"], default="hf")
    parser.add_argument("--model", default=None, help="checkpoint directory for --engine sglang")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--out", type=Path, default=RESULTS_PATH)
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
    for batch_size in batch_sizes:
        chunk = records[:batch_size]
        runs = []
        for repeat in range(repeats + 1):
            batch = run_agent_loop(engine, retriever, tokenizer, chunk, cfg, topk=3, seed=repeat)
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
            rows.append({"device": device_name, "engine": args.engine, "batch_size": batch_size, "metric": metric,
                         "value": f"{value:.6g}"})
        table.append((batch_size, metrics))

    print(f"\nrollout benchmark on {device_name}, engine={args.engine}, median of {repeats}")
    header = (f"{'B':>4} {'traj/s':>8} {'gen tok/s':>10} {'searches':>9} {'gen %':>6} {'retr %':>7} {'book %':>7} "
              f"{'peer/ours':>10}")
    print(header)
    for batch_size, m in table:
        print(f"{batch_size:>4} {m['trajectories_per_s']:>8.2f} {m['generated_tokens_per_s']:>10.1f} "
              f"{m['searches_per_trajectory']:>9.2f} {100 * m['generate_s'] / m['total_s']:>6.1f} "
              f"{100 * m['retrieve_s'] / m['total_s']:>7.1f} {100 * m['bookkeeping_fraction']:>7.2f} "
              f"{m['peer_bookkeeping_over_ours']:>9.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["device", "engine", "batch_size", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")
    worst = max(m["bookkeeping_fraction"] for _, m in table)
    print(f"bookkeeping {'<' if worst < 0.05 else '>='} 5% of the total (worst {100 * worst:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
