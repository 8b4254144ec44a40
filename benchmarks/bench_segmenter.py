"""Benchmark: the step segmenter, C++ (`impl="cpp"`) versus the Python reference versus the peers' method.

Workload: `--sequences` agent trajectories of exactly `--tokens` token ids each: rounds of
"<think>…</think>\\n<search>…</search>" + "\\n<information>Doc 1(Title: …) …</information>\\n" tokenized
piece by piece (as the agent loop does: sampled text and inserted blocks are never re-tokenized together; half of the
generated rounds are tokenized in chunks cut at random characters, standing for sampled ids that are not the
tokenizer's canonical split), cut to length, ending in an `<answer>` block. Two byte-level BPE tokenizers trained
offline (vocab 2048): `tag_tokens` (ours: each tag is one added token) and `plain` (no tag tokens, as Qwen2.5's:
tags are split across tokens and fused with text).

Methods (one core; the C++ path is single-threaded). Ours run the span rule the trainer uses: the agent loop passes
the token spans it inserted (`inserted=`), so the loss mask is 0 exactly on them, newlines included.
- cpp: `segment_batch((flat int32 ids, int64 offsets), table, inserted=spans)` -> BatchSegmentation.
- cpp_objects: the same plus materialising one `Segmentation` object per sequence (what the agent loop does).
- python: the Python reference `impl="python"` (same results, checked).
- peers: decode the sequence, find tags with a regex, re-tokenize the text prefix before every `</search>` and
  information boundary to find token indices (Search-R1 / verl-style bookkeeping); run on `--peer-sequences`
  sequences. The fraction of sequences where its step_ends / loss_mask equal ours is reported: on canonical ids
  it agrees with ours, but re-tokenizing a prefix of sampled non-canonical ids gives other ids than the ones
  sampled, and every token index after that point is off.

Share of a training step: the agent loop segments every finished batch once (and every turn's new ids, a fraction
of that). `step_share` rows time `cpp_objects` on the tiny_cpu preset's batch (64 trajectories x 900 tokens) and
divide by the tiny_cpu step time that `bench_step.py` measured (benchmarks/results/step.csv); a paper-sized batch
(256 x 4096 tokens, the 3B preset) is timed too, its GPU step time is not yet measured.

Prints a table and writes long-format CSV to benchmarks/results/segmenter.csv. `--quick` runs in seconds.
"""
from __future__ import annotations

import argparse
import csv
import gc
import re
import statistics
import time
from pathlib import Path

import bench_common
import numpy as np
from tqdm import tqdm

from stepsearch.rollout.render import INFORMATION_PREFIX, INFORMATION_SUFFIX
from stepsearch.rollout.segmenter import TagTable, segment_batch

RESULTS = Path(__file__).parent / "results" / "segmenter.csv"
STEP_RESULTS = Path(__file__).parent / "results" / "step.csv"
_STEP = re.compile(r"(</search>)\s*<information>")
_INFORMATION = re.compile(r"\n?<information>.*?(?:</information>\n?|\Z)", re.DOTALL)  # the inserted text
_QUERY = re.compile(r"<search>(.*?)</search>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _words(rng: np.random.Generator, count: int) -> str:
    vocabulary = ["river", "town", "founded", "surveyor", "born", "lake", "deepest", "valley", "port", "city",
                  "northern", "coast", "Brennick", "Alder", "Mara", "Vell", "Tolland", "Osk", "1802", "café", "the",
                  "of", "in", "was", "is", "a", "which", "who", "where", "when", "München", "東京"]
    return " ".join(vocabulary[i] for i in rng.integers(0, len(vocabulary), count))


def _round_texts(rng: np.random.Generator) -> tuple[str, str]:
    generated = f"<think>{_words(rng, int(rng.integers(8, 40)))}</think>\n<search>{_words(rng, 5)}</search>"
    docs = "\n".join(f"Doc {k + 1}(Title: {_words(rng, 2)}) {_words(rng, int(rng.integers(40, 90)))}."
                     for k in range(3))
    return generated, f"{INFORMATION_PREFIX}{docs}{INFORMATION_SUFFIX}"


def _train_tokenizers(rng: np.random.Generator) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from stepsearch.models.tokenizer import train_tokenizer
    texts = ["".join(_round_texts(rng)) + f"<answer>{_words(rng, 2)}</answer>" for _ in range(300)]
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = decoders.ByteLevel()
    plain.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return {"tag_tokens": train_tokenizer(texts, vocab_size=2048),
            "plain": PreTrainedTokenizerFast(tokenizer_object=plain, clean_up_tokenization_spaces=False)}


def _sampled_ids(tokenizer, text: str, rng: np.random.Generator) -> list[int]:
    """Ids of generated text as a policy samples them: usually canonical, but a sampled sequence need not be the
    tokenizer's own split, so half of the rounds are tokenized in chunks cut at two random characters."""
    if rng.random() < 0.5:
        return tokenizer.encode(text, add_special_tokens=False)
    cuts = sorted(int(c) for c in rng.integers(1, len(text), 2))
    return [token for start, end in zip([0] + cuts, cuts + [len(text)]) if end > start
            for token in tokenizer.encode(text[start:end], add_special_tokens=False)]


def make_workload(tokenizer, num_sequences: int, num_tokens: int, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, list[list[tuple[int, int]]]]:
    """(flat int32 ids, int64 offsets, inserted spans) of `num_sequences` trajectories of exactly `num_tokens` ids."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(128):
        generated, information = _round_texts(rng)
        pool.append([_sampled_ids(tokenizer, generated, rng), tokenizer.encode(information, add_special_tokens=False)])
    answers = [tokenizer.encode(f"<think>{_words(rng, 6)}</think>\n<answer>{_words(rng, 2)}</answer>",
                                add_special_tokens=False) for _ in range(32)]
    flat = np.empty(num_sequences * num_tokens, dtype=np.int32)
    inserted: list[list[tuple[int, int]]] = []
    for b in range(num_sequences):
        answer = answers[int(rng.integers(len(answers)))]
        body: list[int] = []
        spans: list[tuple[int, int]] = []
        while len(body) + len(answer) < num_tokens:
            generated, information = pool[int(rng.integers(len(pool)))]
            body += generated
            spans.append((len(body), len(body) + len(information)))
            body += information
        keep = num_tokens - len(answer)
        # A block cut by the answer's room is dropped whole: the agent loop never inserts part of one.
        while spans and spans[-1][1] > keep:
            keep = min(keep, spans.pop()[0])
        body = body[:keep]
        body += [token for _ in range(num_tokens) for token in answer][: num_tokens - len(body)]
        flat[b * num_tokens: (b + 1) * num_tokens] = body
        inserted.append(spans)
    return flat, np.arange(0, flat.size + 1, num_tokens, dtype=np.int64), inserted


def peers_segment(ids: list[int], tokenizer) -> tuple[list[int], np.ndarray, list[str], str | None, bool]:
    """Decode, regex, re-tokenize prefixes: step ends, loss mask, queries, answer, format of one sequence."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def tokens_before(char_index: int) -> int:
        return len(tokenizer.encode(text[:char_index], add_special_tokens=False))

    step_ends = [tokens_before(match.end(1)) - 1 for match in _STEP.finditer(text)]
    loss_mask = np.ones(len(ids), dtype=np.uint8)
    for match in _INFORMATION.finditer(text):
        loss_mask[tokens_before(match.start()): tokens_before(match.end())] = 0
    queries = [query.strip() for query in _QUERY.findall(text)]
    answers = _ANSWER.findall(text)
    answer = answers[-1].strip() if answers else None
    return step_ends, loss_mask, queries, answer, bool(answers) and text.rstrip().endswith("</answer>")


def _timed(function, repeats: int = 1) -> tuple[float, object]:
    """Median seconds of `function()` over `repeats` runs, with the cyclic GC collected before and paused during
    each run, so no method pays for garbage the others (or the workload) left behind."""
    times, result = [], None
    for _ in range(repeats):
        result = None
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            result = function()
            times.append(time.perf_counter() - start)
        finally:
            gc.enable()
    return statistics.median(times), result


def run(name: str, tokenizer, num_sequences: int, num_tokens: int, repeats: int, reference_sequences: int,
        peer_sequences: int) -> list[dict]:
    flat, offsets, inserted = make_workload(tokenizer, num_sequences, num_tokens)
    table = TagTable.from_tokenizer(tokenizer)
    table.native()  # built once per tokenizer, not part of the per-batch cost
    cpp_seconds, batch = _timed(lambda: segment_batch((flat, offsets), table, impl="cpp", inserted=inserted),
                                repeats)
    objects_seconds, objects = _timed(lambda: segment_batch((flat, offsets), table, impl="cpp",
                                                            inserted=inserted).to_list(), repeats)

    reference_count = min(reference_sequences, num_sequences)
    reference_flat, reference_offsets = flat[: reference_count * num_tokens], offsets[: reference_count + 1]
    python_seconds, reference = _timed(lambda: segment_batch((reference_flat, reference_offsets), table,
                                                             impl="python", inserted=inserted[:reference_count]))
    assert list(reference) == objects[:reference_count], "C++ and the Python reference disagree"

    peer_count = min(peer_sequences, num_sequences)
    peer_seconds, peer_results = _timed(lambda: [
        peers_segment(flat[offsets[b]: offsets[b + 1]].tolist(), tokenizer)
        for b in tqdm(range(peer_count), desc=f"peers ({name})", leave=False)])
    steps_agree = sum(step_ends == objects[b].step_ends for b, (step_ends, *_) in enumerate(peer_results))
    masks_agree = sum(np.array_equal(loss_mask, objects[b].loss_mask)
                      for b, (_, loss_mask, *_) in enumerate(peer_results))

    tokens_per_s = {"cpp": num_sequences * num_tokens / cpp_seconds,
                    "cpp_objects": num_sequences * num_tokens / objects_seconds,
                    "python": reference_count * num_tokens / python_seconds,
                    "peers": peer_count * num_tokens / peer_seconds}
    sequences = {"cpp": num_sequences, "cpp_objects": num_sequences, "python": reference_count, "peers": peer_count}
    seconds = {"cpp": cpp_seconds, "cpp_objects": objects_seconds, "python": python_seconds, "peers": peer_seconds}
    step_agreement = {"cpp": 1.0, "cpp_objects": 1.0, "python": 1.0, "peers": steps_agree / max(peer_count, 1)}
    mask_agreement = {"cpp": 1.0, "cpp_objects": 1.0, "python": 1.0, "peers": masks_agree / max(peer_count, 1)}
    rows = []
    for method in tokens_per_s:
        metrics = {"sequences_timed": sequences[method], "seconds": seconds[method],
                   "tokens_per_s": tokens_per_s[method],
                   "cpp_speedup": tokens_per_s["cpp"] / tokens_per_s[method],
                   "step_ends_agreement": step_agreement[method], "loss_mask_agreement": mask_agreement[method]}
        rows += [{"benchmark": "segmenter", "tokenizer": name, "sequences": num_sequences, "tokens": num_tokens,
                  "method": method, "metric": metric, "value": value} for metric, value in metrics.items()]
    rows.append({"benchmark": "segmenter", "tokenizer": name, "sequences": num_sequences, "tokens": num_tokens,
                 "method": "cpp", "metric": "steps_per_sequence",
                 "value": len(batch.step_ends) / num_sequences})
    return rows


def _tiny_cpu_step_seconds() -> float | None:
    """The tiny_cpu preset's step time measured by bench_step.py ("ours"), if its results are present."""
    if not STEP_RESULTS.is_file():
        return None
    with STEP_RESULTS.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if (row["workload"], row["method"], row["stage"]) == ("tiny_cpu", "ours", "step"):
                return float(row["seconds"])
    return None


def step_share(tokenizer, repeats: int) -> list[dict]:
    """Seconds to segment a tiny_cpu batch and a paper-sized batch (span rule, objects materialised), and the share
    of the measured tiny_cpu step the first one is."""
    table = TagTable.from_tokenizer(tokenizer)
    table.native()
    rows = []
    step_seconds = _tiny_cpu_step_seconds()
    for workload, num_sequences, num_tokens in (("tiny_cpu", 64, 900), ("paper_3b", 256, 4096)):
        flat, offsets, inserted = make_workload(tokenizer, num_sequences, num_tokens, seed=1)
        seconds, _ = _timed(lambda: segment_batch((flat, offsets), table, inserted=inserted).to_list(), repeats)
        metrics = {"seconds": seconds}
        if workload == "tiny_cpu" and step_seconds is not None:
            metrics.update(step_seconds=step_seconds, share_of_step=seconds / step_seconds)
        rows += [{"benchmark": "segmenter_step_share", "tokenizer": "tag_tokens", "sequences": num_sequences,
                  "tokens": num_tokens, "method": workload, "metric": metric, "value": value}
                 for metric, value in metrics.items()]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-sequences", type=int, default=None,
                        help="sequences the Python reference runs on (default: all)")
    parser.add_argument("--peer-sequences", type=int, default=64, help="sequences the peers' method runs on")
    parser.add_argument("--quick", action="store_true", help="256 sequences x 512 tokens, 16 for the peers")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.sequences, args.tokens, args.peer_sequences, args.repeats = 256, 512, 16, 3
    reference_sequences = args.reference_sequences or args.sequences

    tokenizers = _train_tokenizers(np.random.default_rng(0))
    rows = []
    for name, tokenizer in tokenizers.items():
        rows += run(name, tokenizer, args.sequences, args.tokens, args.repeats, reference_sequences,
                    args.peer_sequences)

    print(f"segmenter: {args.sequences} sequences x {args.tokens} tokens, one core")
    print(f"{'tokenizer':<11} {'method':<12} {'seqs':>6} {'seconds':>9} {'M tok/s':>9} {'cpp speedup':>12} "
          f"{'same steps':>11} {'same mask':>10}")
    by_key = {(row["tokenizer"], row["method"], row["metric"]): row["value"] for row in rows}
    for name in tokenizers:
        for method in ("cpp", "cpp_objects", "python", "peers"):
            value = lambda metric: by_key[(name, method, metric)]  # noqa: E731
            print(f"{name:<11} {method:<12} {value('sequences_timed'):>6} {value('seconds'):>9.3f} "
                  f"{value('tokens_per_s') / 1e6:>9.2f} {value('cpp_speedup'):>11.1f}x "
                  f"{value('step_ends_agreement'):>11.2f} {value('loss_mask_agreement'):>10.2f}")
    shares = step_share(tokenizers["tag_tokens"], args.repeats)
    rows += shares
    for row in shares:
        print(f"step share: {row['method']:<9} {row['sequences']} x {row['tokens']} tokens: {row['metric']} = "
              f"{row['value']:.6g}")
    bench_common.write_csv(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
