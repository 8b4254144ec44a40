"""SGLang on one GPU, the way the trainer drives it (part of benchmarks/gpu_check.sh; needs `sglang`, no internet).

    python benchmarks/gpu_check_sglang.py --out OUT_DIR

The tiny Qwen2-shaped model is saved with `save_pretrained` (with its offline-trained tokenizer) and served by an
in-process `sglang.Engine` started through `make_engine` (per-rank placement, ports, seed, memory saver). Checks,
each a CSV row in OUT_DIR/sglang.csv (check, ok, value, unit, detail):

- generate: a batch of prompts with log-probs and stop strings; tokens/s; every log-prob finite and <= 0.
- agreement: greedy SGLang continuations against the same model's greedy HF continuations (token agreement).
- update_weights: the tiny model's weights scaled and pushed in buckets (`update_weights_from_tensor`); greedy
  output must change, and pushing the original weights back must restore it.
- release / resume: GPU memory free before and after `release_memory_occupation`, and generation after resume.
- concurrent: after another release, 8 threads call `generate` at once (as the agent loop's row groups do: the
  first resumes the memory from its own thread, each call is an `async_generate` request on the engine's loop);
  every call returns, greedy tokens agree with one call over all the prompts, and the wall time of both.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stepsearch.config import ModelConfig, RolloutConfig  # noqa: E402
from stepsearch.models.tiny import build_tiny_model  # noqa: E402
from stepsearch.models.tokenizer import train_tokenizer  # noqa: E402
from stepsearch.rollout.engine import HFEngine, make_engine  # noqa: E402

TEXTS = [f"The river Alder{i} flows through Brennick {i}. <search>river {i}</search> <answer>Brennick</answer>"
         for i in range(200)]


def free_gib() -> float:
    free, _ = torch.cuda.mem_get_info()
    return free / 1024 ** 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base-port", type=int, default=31000)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def record(check: str, ok: bool, value: float | str = "", unit: str = "", detail: str = "") -> None:
        rows.append({"check": check, "ok": ok, "value": value, "unit": unit, "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {check}: {value} {unit} {detail}", flush=True)

    try:
        model_dir = args.out / "tiny_model"
        tokenizer = train_tokenizer(TEXTS, vocab_size=600, out_dir=model_dir)
        model = build_tiny_model(ModelConfig(), tokenizer, seed=0)
        model.save_pretrained(model_dir)
        cfg = RolloutConfig(engine="sglang", sglang_base_port=args.base_port, sglang_mem_fraction=0.3,
                            sglang_sync_bucket_mb=1)
        tick = time.perf_counter()
        engine = make_engine(cfg, None, tokenizer, torch.device("cuda", 0), model_path=str(model_dir), seed=0)
        record("start", True, round(time.perf_counter() - tick, 1), "s", "in-process sglang.Engine via make_engine")

        prompts = [tokenizer.encode(f"The river Alder{i} flows", add_special_tokens=False) for i in range(64)]
        tick = time.perf_counter()
        outs = engine.generate(prompts, max_new_tokens=64, stop_strings=["</search>"], temperature=1.0, top_p=1.0,
                               seed=1)
        seconds = time.perf_counter() - tick
        tokens = sum(len(o.token_ids) for o in outs)
        finite = all(math.isfinite(lp) and lp <= 1e-4 for o in outs for lp in o.logprobs)
        record("generate", finite and tokens > 0, round(tokens / seconds), "tokens/s",
               f"{len(prompts)} prompts, {tokens} tokens, log-probs finite and <= 0: {finite}")

        hf = HFEngine(model.to("cuda"), tokenizer, "cuda")
        greedy = dict(max_new_tokens=24, stop_strings=[], temperature=0.0, top_p=1.0)
        reference = [g.token_ids for g in hf.generate(prompts[:16], **greedy)]
        served = [g.token_ids for g in engine.generate(prompts[:16], **greedy)]
        agree = sum(a == b for r, s in zip(reference, served) for a, b in zip(r, s))
        total = sum(min(len(r), len(s)) for r, s in zip(reference, served))
        record("agreement", total > 0 and agree / total >= 0.9, round(agree / max(total, 1), 3), "fraction",
               "greedy tokens equal to HF's (bf16 vs fp32 may differ after a near tie)")

        original = {name: tensor.detach().clone() for name, tensor in model.named_parameters()}
        scaled = [(name, (tensor * 0.5).to(torch.bfloat16)) for name, tensor in original.items()]
        tick = time.perf_counter()
        engine.update_weights(scaled)
        changed = [g.token_ids for g in engine.generate(prompts[:16], **greedy)] != served
        engine.update_weights(list(original.items()))
        restored = [g.token_ids for g in engine.generate(prompts[:16], **greedy)] == served
        record("update_weights", changed and restored, round(time.perf_counter() - tick, 2), "s",
               f"output changed after scaling: {changed}; restored: {restored}")

        before = free_gib()
        engine.release_memory()
        torch.cuda.synchronize()
        after = free_gib()
        outs = engine.generate(prompts[:4], **greedy)
        record("release_resume", after > before and all(o.token_ids for o in outs), round(after - before, 2),
               "GiB freed", f"free {before:.2f} -> {after:.2f} GiB, generation after resume: {bool(outs[0].token_ids)}")

        engine.release_memory()
        tick = time.perf_counter()
        reference = [g.token_ids for g in engine.generate(prompts, **greedy)]
        one_call_s = time.perf_counter() - tick
        engine.release_memory()
        results: list = [None] * 8

        def row_group(index: int) -> None:
            results[index] = engine.generate(prompts[index::8], **greedy)

        threads = [threading.Thread(target=row_group, args=(index,)) for index in range(8)]
        tick = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent_s = time.perf_counter() - tick
        returned = all(result is not None for result in results)
        grouped = [None] * len(prompts)
        for index, result in enumerate(results if returned else []):
            grouped[index::8] = [g.token_ids for g in result]
        agree = sum(a == b for r, g in zip(reference, grouped) if g for a, b in zip(r, g))
        total = sum(min(len(r), len(g)) for r, g in zip(reference, grouped) if g)
        record("concurrent", returned and total > 0 and agree / total >= 0.9, round(concurrent_s, 3), "s",
               f"8 threads x 8 prompts; every call returned: {returned}; greedy agreement with one call "
               f"{agree / max(total, 1):.3f}; one call over all {len(prompts)} prompts (with its resume) "
               f"{one_call_s:.3f} s")
        engine._engine.shutdown()
    except Exception as exc:  # the summary reports the failure; the traceback goes to the log
        traceback.print_exc()
        record("error", False, detail=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        with open(args.out / "sglang.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["check", "ok", "value", "unit", "detail"])
            writer.writeheader()
            writer.writerows(rows)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
