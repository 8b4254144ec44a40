"""Benchmark: time per stage of one full StePPO step (rollout, segment, score tokens, rewards, advantages, update).

Workloads:
- `tiny_cpu`: the embedded default preset (configs/tiny_cpu.yaml), one process, no warm start (a random policy
  writes long responses, which is the expensive case for every stage).
- `qwen0.5b_gpu` (only with a CUDA device): a randomly initialised model with Qwen2.5-0.5B's body (hidden 896,
  24 layers, 14 heads, 2 KV heads, MLP 4864), bf16, with the offline tokenizer's vocabulary (the table gives V).

Methods, each timed on the same workload after one warm-up step:
- `ours`: `stepsearch.ops` as configured (`auto`: Triton kernels on CUDA, the pure-torch twins on CPU): fused
  vocabulary-chunked log-prob/entropy, scan-based reward scatter + GAE.
- `torch_twins`: the pure-torch twins everywhere (`kernels.impl=torch`) — the reference. Same as `ours` on CPU.
- `peers`: the method of verl / OpenRLHF / TRL: full (N, V) logits then log_softmax for log-probs and entropy,
  and GAE as a Python loop over T.

Prints a table (seconds per stage, and each method's step time as a ratio to ours) and writes long-format CSV
(workload, method, stage, seconds, ratio_to_ours) to benchmarks/results/step.csv. `--quick` runs one timed step
of a smaller tiny_cpu workload (seconds); the default times `--steps` steps.

`--packing` measures padding-free packing (`model.packing`) instead, on one real rollout batch of the tiny preset
from a warm-started policy (the untrained one writes every response to the same budget, so its batches are
nearly pad-free): the padding fraction of the padded (B, P + T) layout, then the score-tokens stage (actor,
reference and critic forwards) and the advantage + update stages, each repetition from the same weights and
optimiser state, the methods alternating, median seconds. Methods: `padded`; `packed` (the trainer's choice on a
CPU: each sequence alone, `per_sequence`); `packed_rows` (the `rows` layout a GPU without FlashAttention-2 gets:
rows as long as the longest sequence under a block-diagonal mask). Writes benchmarks/results/step_packing.csv
(workload, device, metric, method, value).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import bench_common
import torch

from stepsearch import ops
from stepsearch.algo import gae as gae_ref
from stepsearch.algo import logprob as logprob_ref
from stepsearch.algo import scatter as scatter_ref
from stepsearch.config import load_config

RESULTS = Path(__file__).parent / "results" / "step.csv"
PACKING_RESULTS = Path(__file__).parent / "results" / "step_packing.csv"
PACKING_METHODS = ("padded", "packed", "packed_rows")
STAGES = ("rollout", "segment", "score_tokens", "rewards", "advantages", "update")
QWEN_05B_BODY = ["model.tiny_hidden_size=896", "model.tiny_num_layers=24", "model.tiny_num_heads=14",
                 "model.tiny_num_kv_heads=2", "model.tiny_intermediate_size=4864", "model.dtype=bfloat16",
                 "trainer.device=cuda", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=32",
                 "ppo.micro_batch_size=16", "rollout.samples_per_prompt=2"]


def peers_logprob_entropy(hidden, weight, targets, *, chunk_size=4096, temperature=1.0):
    """verl/OpenRLHF/TRL: materialise the logits, upcast, log_softmax, gather; entropy from the full softmax."""
    return logprob_ref.logprob_entropy_materialized(hidden, weight, targets, temperature=temperature)


def peers_scatter_rewards_and_gae(outcome, step_scores, step_ends, old_logp, ref_logp, values, loss_mask, kl_coef,
                                  gamma, lam, kl_estimator="k1", return_rewards=False):
    """Token rewards as usual, then GAE as a Python loop over T (verl's `compute_gae_advantage_return`)."""
    rewards = scatter_ref.scatter_rewards(outcome, step_scores, step_ends, old_logp, ref_logp, loss_mask, kl_coef,
                                          kl_estimator)
    advantages, returns = gae_ref.gae_python_loop(rewards, values.float(), loss_mask, gamma, lam)
    return gae_ref.RewardsAndGAE(advantages, returns, rewards if return_rewards else None)


@contextmanager
def method(name: str):
    """Swap the `stepsearch.ops` entry points the trainer calls for the method's implementations."""
    saved = (ops.logprob_entropy, ops.scatter_rewards_and_gae, ops.current_impl())
    try:
        if name == "torch_twins":
            ops.configure("torch")
        elif name == "peers":
            ops.logprob_entropy = peers_logprob_entropy
            ops.scatter_rewards_and_gae = peers_scatter_rewards_and_gae
        yield
    finally:
        ops.logprob_entropy, ops.scatter_rewards_and_gae = saved[:2]
        ops.configure(saved[2])


def build(overrides: list[str], out_dir: str):
    """The preset's run, built as training builds it (`build_run`), without warm start or evaluation."""
    from stepsearch.trainer.build import build_run

    cfg = load_config("configs/tiny_cpu.yaml", ["trainer.warm_start_steps=0", "trainer.eval_max_questions=0",
                                                 "trainer.tensorboard=false", "deepspeed.enabled='off'",
                                                 f"trainer.output_dir={out_dir}", *overrides])
    return build_run(cfg)


def snapshot(models) -> list:
    """Weights and optimiser states of actor and critic, to start every timed step from the same state."""
    return [(engine, copy.deepcopy(engine.module.state_dict()), copy.deepcopy(engine.optimizer.state_dict()))
            for engine in (models.actor, models.critic)]


def restore(saved: list) -> None:
    for engine, weights, optimizer in saved:
        engine.module.load_state_dict(weights)
        engine.optimizer.load_state_dict(optimizer)


def time_steps(run, saved: list, steps: int) -> dict[str, float]:
    """Median seconds per stage over `steps` steps; every step starts from the same weights, optimiser state and
    data position with the same sampling seed, so every method and repetition does exactly the same work."""
    from stepsearch.train import train_step
    from stepsearch.trainer.build import TrainState

    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for _ in range(steps):
        restore(saved)
        run.state = TrainState()
        if run.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        values, _ = train_step(run)
        for stage in STAGES:
            samples[stage].append(float(values[f"time/{stage}_s"]))
    medians = {stage: statistics.median(v) for stage, v in samples.items()}
    medians["step"] = sum(medians.values())
    return medians


def time_packing(run, saved: list, rollout, records, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds of score_tokens and advantages + update, padded and packed, on one rollout."""
    from stepsearch import train as trainer
    from stepsearch.trainer.metrics import StepMetrics

    ctx, models = run.ctx, run.models
    sequences = trainer.segment_stage(rollout, run.tokenizer)
    rewards = trainer.reward_stage(ctx, rollout, records, StepMetrics())
    chosen_layout = trainer.packing_layout
    samples = {method: {"score_tokens": [], "update": []} for method in PACKING_METHODS}
    for _ in range(repeats):
        for method in PACKING_METHODS:
            restore(saved)
            ctx.cfg.model.packing = method != "padded"
            trainer.packing_layout = (lambda model, partitioned: "rows") if method == "packed_rows" else chosen_layout
            start = time.perf_counter()
            scores = trainer.score_tokens_stage(ctx, models, sequences, rollout.loss_mask)
            scored = time.perf_counter()
            advantages = trainer.advantage_stage(ctx, rollout, scores, rewards)
            experience = trainer.experience_of(ctx, sequences, rollout.loss_mask, scores, advantages)
            trainer.update_stage(ctx, models, experience, 0, StepMetrics())
            samples[method]["score_tokens"].append(scored - start)
            samples[method]["update"].append(time.perf_counter() - scored)
    trainer.packing_layout = chosen_layout
    medians = {method: {stage: statistics.median(v) for stage, v in stages.items()}
               for method, stages in samples.items()}
    for stages in medians.values():
        stages["score_and_update"] = stages["score_tokens"] + stages["update"]
    return medians


def packing_main(args) -> int:
    from stepsearch.train import rollout_stage

    trajectories = 4 * args.questions
    overrides = ["trainer.device=cpu", f"trainer.warm_start_steps={args.warm_start_steps}",
                 f"ppo.rollout_batch_size={args.questions}", "rollout.samples_per_prompt=4",
                 f"ppo.mini_batch_size={min(32, trajectories)}", f"ppo.micro_batch_size={min(16, trajectories)}",
                 f"data.synth_num_train={max(args.questions, 100)}", "data.synth_num_test=10"]
    with tempfile.TemporaryDirectory() as out_dir:
        run = build(overrides, out_dir)
        records = run.cursor.take(0, run.ctx.cfg.ppo.rollout_batch_size)
        rollout = rollout_stage(run.ctx, run.models, run.retriever, run.tokenizer, run.tag_table, records, 0)
        saved = snapshot(run.models)
        time_packing(run, saved, rollout, records, 1)  # warm-up
        medians = time_packing(run, saved, rollout, records, args.steps)
    prompt_lengths = torch.tensor([len(ids) for ids in rollout.prompt_ids])
    response_lengths = rollout.response_mask.sum(dim=1)
    padded_tokens = len(rollout) * (int(prompt_lengths.max()) + rollout.response_mask.shape[1])
    padding = 1.0 - float(prompt_lengths.sum() + response_lengths.sum()) / padded_tokens
    device = bench_common.device_name(run.ctx.device)
    print(f"\ntiny_cpu packing ({device}; {len(rollout)} trajectories, response lengths "
          f"{int(response_lengths.min())}-{int(response_lengths.max())}, prompts {int(prompt_lengths.min())}-"
          f"{int(prompt_lengths.max())} tokens; padding {padding:.1%} of the padded layout; median of {args.steps})")
    print(f"{'stage':<18}" + "".join(f"{method:>13}" for method in PACKING_METHODS)
          + "".join(f"{'padded/' + method:>20}" for method in PACKING_METHODS[1:]))
    rows = [{"workload": "tiny_cpu", "device": device, "metric": "padding_fraction", "method": "padded",
             "value": f"{padding:.4f}"}]
    for stage in ("score_tokens", "update", "score_and_update"):
        seconds = [medians[method][stage] for method in PACKING_METHODS]
        print(f"{stage:<18}" + "".join(f"{value:>13.3f}" for value in seconds)
              + "".join(f"{seconds[0] / value:>19.2f}x" for value in seconds[1:]))
        rows += [{"workload": "tiny_cpu", "device": device, "metric": f"{stage}_s", "method": method,
                  "value": f"{medians[method][stage]:.6f}"} for method in PACKING_METHODS]
    bench_common.write_csv(args.csv if args.csv != RESULTS else PACKING_RESULTS, rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed step of a smaller CPU workload")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (median reported)")
    parser.add_argument("--csv", type=Path, default=RESULTS)
    parser.add_argument("--packing", action="store_true", help="padded vs packed scoring + update (module docstring)")
    parser.add_argument("--questions", type=int, default=16, help="--packing: questions per rollout (x4 samples)")
    parser.add_argument("--warm-start-steps", type=int, default=150, help="--packing: supervised warm-start steps")
    args = parser.parse_args(argv)
    if args.packing:
        return packing_main(args)

    workloads = {"tiny_cpu": ["trainer.device=cpu"] + (
        ["ppo.rollout_batch_size=4", "rollout.samples_per_prompt=2", "ppo.mini_batch_size=8",
         "ppo.micro_batch_size=8", "data.synth_num_train=60", "data.synth_num_test=10"] if args.quick else [])}
    if torch.cuda.is_available() and not args.quick:
        workloads["qwen0.5b_gpu"] = QWEN_05B_BODY
    steps = 1 if args.quick else args.steps
    rows = []
    for workload, overrides in workloads.items():
        with tempfile.TemporaryDirectory() as out_dir:
            run = build(overrides, out_dir)
            vocab = len(run.tokenizer)
            saved = snapshot(run.models)
            time_steps(run, saved, 1)  # warm-up: allocator, kernels' autotuning, tokenizer caches
            results = {}
            for name in ("ours", "torch_twins", "peers"):
                with method(name):
                    results[name] = time_steps(run, saved, steps)
        print(f"\n{workload} (V={vocab}, {steps} timed step(s), median seconds)")
        print(f"{'stage':<14}" + "".join(f"{name:>14}" for name in results))
        for stage in (*STAGES, "step"):
            print(f"{stage:<14}" + "".join(f"{results[name][stage]:>14.3f}" for name in results))
        print(f"{'step vs ours':<14}" + "".join(f"{results[name]['step'] / results['ours']['step']:>13.2f}x"
                                                for name in results))
        for name, stages in results.items():
            for stage, seconds in stages.items():
                rows.append({"workload": workload, "vocab": vocab, "method": name, "stage": stage,
                             "seconds": f"{seconds:.6f}",
                             "ratio_to_ours": f"{seconds / max(results['ours'][stage], 1e-12):.4f}"})
    bench_common.write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
