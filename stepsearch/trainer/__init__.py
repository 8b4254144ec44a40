"""Everything around the StePPO algorithm (`stepsearch.train`): how a run is built and kept.

    preflight    checks of every path, server and the resume choice before any set-up
    build        `build_run(cfg)`: process group, data, retriever, tokenizer, models, resume — the one constructor
    engines      actor / critic optimisers: AdamW in one process, DeepSpeed ZeRO-3 under a launcher
    ranks        rank, world size, barrier, sum over ranks (no process group = one process)
    checkpoint   atomic checkpoints and the atomic HF export
    run_dir      the run directory's paths and the one reader of each file in it
    metrics      one JSONL row per step, TensorBoard, wandb
    report       the run report (plots and an HTML page of trajectories)
    warm_start   supervised warm start of the tiny model on gold trajectories

Submodules are imported directly (`from stepsearch.trainer.checkpoint import save_checkpoint`) so that importing one
does not pull in the others' optional dependencies (tensorboard, matplotlib, deepspeed).
"""
