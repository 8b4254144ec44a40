"""Where a decode step of the tiny preset model goes on a GPU (part of benchmarks/gpu_check.sh; no internet).

    python benchmarks/gpu_check_decode.py [--device cuda|cpu]

The first GPU check's StePPO run spent 24 s on eight greedy evaluation answers, which take 0.6 s on 2 CPU cores
(there each stops at the 64-token turn limit): a decode step seemed to cost tens of times more on the GPU. Timed
here, each as milliseconds per decode step (64 prompts, 128 new tokens, sampled, median of 3 after a warm-up), on
the preset's model shape in bf16:

- engine:       `HFEngine.generate`, the trainer's rollout path (stop strings, per-token log-probs)
- generate:     plain transformers `generate`, no logits processor, no stopping criteria
- generate/<b>: the same with SDPA pinned to one backend (flash, efficient, math, cudnn) where it runs
- forward:      one cached forward of one token per row, no sampling (the floor)

then prints torch.profiler's top operators by CPU time for 32 engine steps. Prints a table; no files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bench_common
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stepsearch.config import ModelConfig, load_config  # noqa: E402
from stepsearch.models.tiny import build_tiny_model  # noqa: E402
from stepsearch.models.tokenizer import train_tokenizer  # noqa: E402
from stepsearch.rollout.engine import HFEngine  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.yaml"
TEXTS = [
    f"<think> Who founded Alder{i} Company? </think> <search> founder of Alder{i} Company </search> "
    f"<answer> Brennick {i} </answer>"
    for i in range(200)
]
BATCH, NEW_TOKENS, REPEATS = 64, 128, 3


def timed_ms_per_step(run, device: torch.device) -> float:
    """Median over REPEATS of run()'s milliseconds per decode step; the first call is untimed and counts the steps
    (every call decodes the same tokens: the sampling seed is fixed)."""
    steps = run()
    return 1000 * bench_common.median_seconds(run, device, REPEATS, warmup=0) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_cfg: ModelConfig = load_config(PRESET).model
    tokenizer = train_tokenizer(TEXTS, vocab_size=model_cfg.tiny_vocab_size)
    model = build_tiny_model(model_cfg, tokenizer).to(device, dtype).eval()
    engine = HFEngine(model, tokenizer, device)
    prompts = [tokenizer(text)["input_ids"][:24] for text in TEXTS[:BATCH]]
    rows = []

    def engine_run() -> int:
        generations = engine.generate(
            prompts,
            max_new_tokens=NEW_TOKENS,
            stop_strings=["</search>", "</answer>"],
            temperature=1.0,
            top_p=1.0,
            seed=0,
        )
        return max(len(g.token_ids) for g in generations)

    rows.append(("engine", timed_ms_per_step(engine_run, device)))
    input_ids = torch.tensor([p[:16] for p in prompts], device=device)  # (B, 16), no padding

    def generate_run() -> int:
        model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=True,
            top_k=0,
            pad_token_id=tokenizer.pad_token_id,
        )
        return NEW_TOKENS

    rows.append(("generate", timed_ms_per_step(generate_run, device)))
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    rows.append((f"generate/{name.lower()}", timed_ms_per_step(generate_run, device)))
            except RuntimeError as error:  # a backend that cannot run these shapes is reported, not fatal
                print(f"generate/{name.lower()}: {str(error).splitlines()[0]}")

    with torch.no_grad():
        cache = model(input_ids=input_ids, use_cache=True).past_key_values
        next_token = input_ids[:, -1:]

        def forward_run() -> int:
            model(input_ids=next_token, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the token just added: every call is the same step
            return 1

        rows.append(("forward", timed_ms_per_step(forward_run, device)))

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"\ndecode step of the tiny preset model ({model_cfg.tiny_num_layers} layers, width "
        f"{model_cfg.tiny_hidden_size}, {dtype}) on {name}: {BATCH} rows, {NEW_TOKENS} new tokens"
    )
    print(f"{'method':<28} {'ms/step':>8}")
    for method, ms in rows:
        print(f"{method:<28} {ms:>8.2f}")
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        engine.generate(prompts, max_new_tokens=32, stop_strings=["</search>"], temperature=1.0, top_p=1.0, seed=0)
    print(profiler.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=50))
    return 0


if __name__ == "__main__":
    sys.exit(main())
