"""Measurement: can the tiny model learn to copy made-up names, from random weights and from the copy circuit?

The task isolates what a search policy must do with a name it has never seen: eight made-up names, then the same
eight again, the loss taken on the repeat only. Every list gets fresh names (`synth.FreshNames`: the world's name
shapes, spelled from its syllables, but no name of the world and no name of another list), so the loss can fall
below the entropy of a syllable only by copying, not by remembering names. Each variant trains the preset's tiny
model (`configs/tiny_cpu.yaml`'s `model` section) with the warm start's optimiser and schedule
(`supervised_warm_start`: AdamW, warm-up, cosine decay) on the same batches, and reports the mean loss over
windows of 25 steps.

    python benchmarks/bench_copy.py                 # 300 steps, lr 5e-3: about 2 minutes on 2 CPU cores
    python benchmarks/bench_copy.py --steps 100     # quicker

Variants: `random` (`model.tiny_copy_circuit=false`) and `copy_circuit` (the default). Results: a printed table
and long-format CSV at benchmarks/results/copy.csv (variant, step window, loss).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import bench_common
import torch
from tqdm import tqdm

from stepsearch.config import load_config
from stepsearch.data.synth import NAME_PIECE_PATTERN, FreshNames, build_world, made_up_words
from stepsearch.models.tiny import build_tiny_model
from stepsearch.models.tokenizer import train_tokenizer
from stepsearch.trainer.warm_start import supervised_warm_start

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PRESET = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
NAMES_PER_LIST = 8
WINDOW = 25


def repeated_name_lists(tokenizer, names: list[str], count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) pairs: a list of fresh names shaped like `names`, then the same list again; loss only on the
    repeat."""
    rng = random.Random(seed)
    world_words = frozenset(set().union(*(made_up_words(name) for name in names)))
    examples = []
    for _ in range(count):
        text = FreshNames(rng, world_words)(", ".join(rng.sample(names, NAMES_PER_LIST)) + ".")
        first = tokenizer.encode(text, add_special_tokens=False)
        repeat = tokenizer.encode(" " + text, add_special_tokens=False)
        examples.append((first + repeat, [0] * len(first) + [1] * len(repeat)))
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=16, help="x4 per step, as the warm start's first turns")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "copy.csv")
    args = parser.parse_args()

    cfg = load_config(PRESET)
    world, _, _ = build_world(cfg.data.synth_seed, num_train=200, num_test=20)
    corpus = [row["contents"] for row in world.corpus_rows()]
    tokenizer = train_tokenizer(corpus, cfg.model.tiny_vocab_size, word_piece_pattern=NAME_PIECE_PATTERN)
    names = sorted(entity.name for entity in world.entities)
    examples = repeated_name_lists(tokenizer, names, count=20000, seed=1)

    rows = []
    for variant, circuit in tqdm([("random", False), ("copy_circuit", True)], desc="variants"):
        model = build_tiny_model(replace(cfg.model, tiny_copy_circuit=circuit), tokenizer, seed=0)
        losses = supervised_warm_start(
            model,
            examples,
            tokenizer.pad_token_id,
            steps=args.steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=1,
            first_turn_steps=args.steps,
            first_turns=examples,
            progress=False,
        )
        for start in range(0, len(losses), WINDOW):
            window = losses[start : start + WINDOW]
            rows.append(
                {
                    "device": bench_common.device_name(torch.device("cpu")),
                    "variant": variant,
                    "steps": f"{start}-{start + len(window) - 1}",
                    "loss": round(sum(window) / len(window), 4),
                }
            )

    windows = [row["steps"] for row in rows if row["variant"] == "random"]
    print("| variant | " + " | ".join(f"steps {w}" for w in windows) + " |")
    print("|---|" + "---|" * len(windows))
    for variant in ("random", "copy_circuit"):
        print(f"| {variant} | " + " | ".join(f"{row['loss']:.2f}" for row in rows if row["variant"] == variant) + " |")
    bench_common.write_csv(args.out, rows)


if __name__ == "__main__":
    main()
