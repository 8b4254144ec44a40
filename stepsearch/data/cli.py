"""`stepsearch data ...`: write the synthetic world, convert a dataset to StepSearch format, run the data pipeline.

    stepsearch data synth --out DIR [--seed S] [--num-train N] [--num-test M] [--hops 2,3,4]
    stepsearch data convert --input FILE [--format F] --out FILE.jsonl [--skip-bad-rows]
    stepsearch data pipeline --input FILE [--format musique] --out FILE.jsonl --retriever URL|INDEX_DIR
                             [--llm-url URL --llm-model NAME] [--n-queries N] [--topk K] [--workers W]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from stepsearch.data.loaders import FORMATS, DataFormatError, load_records


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepsearch data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write the synthetic multi-hop world (corpus, train, test)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--num-train", type=int, default=2000)
    synth.add_argument("--num-test", type=int, default=200)
    synth.add_argument("--hops", default="2,3,4", help="comma-separated hop counts to keep, a subset of 2,3,4")

    convert = sub.add_parser("convert", help="any supported format -> StepSearch jsonl")
    convert.add_argument("--input", required=True)
    convert.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    convert.add_argument("--out", required=True)
    convert.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows")

    pipe = sub.add_parser("pipeline", help="validated sub-question search keys (StepSearch data pipeline)")
    pipe.add_argument("--input", required=True, help="questions with decompositions (raw MuSiQue jsonl)")
    pipe.add_argument("--format", default="musique", choices=("auto",) + FORMATS)
    pipe.add_argument("--out", required=True, help="StepSearch-format jsonl, appended to (resumable)")
    pipe.add_argument("--retriever", required=True, help="retriever server URL, or a local index directory")
    pipe.add_argument("--llm-url", help="OpenAI-compatible endpoint; rule-based queries when omitted")
    pipe.add_argument("--llm-model", help="model name sent to the endpoint (required with --llm-url)")
    pipe.add_argument("--prompt", help="query-writing prompt (default: stepsearch/data/prompts/search_queries.txt)")
    pipe.add_argument("--temperature", type=float, default=0.7)
    pipe.add_argument("--n-queries", type=int, default=3, help="queries proposed per sub-question")
    pipe.add_argument("--topk", type=int, default=3, help="a query is valid if its support doc is in this top-k")
    pipe.add_argument("--workers", type=int, default=4, help="records processed concurrently")
    pipe.add_argument("--limit", type=int, help="only the first N records of the input")
    pipe.add_argument("--skip-bad-rows", action="store_true")
    return parser


def _open_retriever(spec: str):
    """An HTTP client for a URL, else the index stored in the directory `spec` (via the retrieval factory)."""
    from stepsearch.config import RetrieverConfig
    from stepsearch.retrieval.factory import make_retriever

    is_url = spec.startswith(("http://", "https://"))
    return make_retriever(RetrieverConfig(url=spec if is_url else None, index_dir=None if is_url else spec))


def _synth(args: argparse.Namespace) -> int:
    from stepsearch.data.synth import write_world

    start = time.perf_counter()
    if not re.fullmatch(r"\d+(,\d+)*", args.hops):
        raise ValueError(f"--hops must be comma-separated hop counts such as 2,3; got {args.hops!r}")
    files = write_world(args.out, args.seed, args.num_train, args.num_test, hops=[int(h) for h in args.hops.split(",")])
    meta = json.loads(files.meta.read_text(encoding="utf-8"))
    print(f"wrote {files.root}: {meta['num_docs']} passages, {args.num_train} train / {args.num_test} test "
          f"questions (hops {meta['hops']}, types {meta['types']}) in {time.perf_counter() - start:.1f}s")
    return 0


def _load(args: argparse.Namespace):
    """The input's records; skipped rows are summarised by kind on stderr, and an input without one good row fails."""
    result = load_records(args.input, args.format, args.skip_bad_rows)
    if result.skipped:
        print(f"skipped {result.skipped} bad rows of {args.input}:", file=sys.stderr)
        for line in result.skip_summary():
            print(f"  {line}", file=sys.stderr)
    if not result.records:
        reason = f"all {result.skipped} rows are bad" if result.skipped else "it holds no rows"
        raise DataFormatError(f"{args.input}: no records to write ({reason})")
    return result


def _convert(args: argparse.Namespace) -> int:
    from stepsearch.data.loaders import to_stepsearch_row

    result = _load(args)
    out = Path(args.out)
    # Written beside the output and renamed over it: a failure leaves no partial file (nor a truncated old one).
    temp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            for record in result.records:
                handle.write(json.dumps(to_stepsearch_row(record), ensure_ascii=False) + "\n")
        os.replace(temp, out)
    finally:
        if temp.exists():
            temp.unlink()
    print(f"wrote {len(result.records)} records to {args.out}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from stepsearch.data.pipeline import PROMPT_PATH, LLMQueryWriter, RuleQueryWriter, run_pipeline

    if args.llm_url and not args.llm_model:
        print("stepsearch data pipeline: --llm-model is required with --llm-url", file=sys.stderr)
        return 2
    result = _load(args)
    records = result.records[: args.limit] if args.limit is not None else result.records
    writer = (LLMQueryWriter(args.llm_url, args.llm_model, args.prompt or PROMPT_PATH, temperature=args.temperature)
              if args.llm_url else RuleQueryWriter())
    stats = run_pipeline(records, args.out, _open_retriever(args.retriever), writer, n_queries=args.n_queries,
                         topk=args.topk, workers=args.workers)
    print(stats.summary())
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    handler = {"synth": _synth, "convert": _convert, "pipeline": _pipeline}[args.command]
    from stepsearch.data.pipeline import LLMError
    from stepsearch.retrieval.base import RetrieverError

    try:
        return handler(args)
    except (DataFormatError, LLMError, RetrieverError, ValueError, OSError) as err:
        # User-caused problems (bad file, endpoint or retriever down) end in one clear line, not a traceback.
        print(f"stepsearch data {args.command}: {err}", file=sys.stderr)
        return 1
