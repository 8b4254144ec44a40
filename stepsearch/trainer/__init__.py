"""Trainer infrastructure: metric logging (`metrics`), atomic checkpoints (`checkpoint`), the run report (`report`).

Submodules are imported directly (`from stepsearch.trainer.checkpoint import save_checkpoint`) so that importing one
does not pull in the others' optional dependencies (tensorboard, matplotlib, deepspeed).
"""
