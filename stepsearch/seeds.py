"""One rule for every seed a run derives from its configured seed.

`derive_seed(base, stream, *indices)` hashes the configured seed, the name of the random stream and its position
(step, epoch, rank, call) into a 32-bit seed (the widest that `numpy.random.seed` accepts). Streams with different
names or positions get unrelated seeds, so no two streams can collide the way sums and products of small numbers
can (seed 1 at step 0 vs seed 0 at step 1). The streams of a training run:

    process       (rank,)                    Python / NumPy / torch global generators of one process
    data_order    (epoch,)                   the order of the training questions in an epoch
    rollout       (step, rank)               sampling of one rank's rollout at a step
    generate      (call,)                    one engine call inside a rollout (from the rollout's seed)
    ppo_shuffle   (step, epoch, rank)        the order of the trajectories in one PPO epoch
    rollout_engine (rank,)                   an in-process SGLang engine's own seed
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

STREAMS = ("process", "data_order", "rollout", "generate", "ppo_shuffle", "rollout_engine")


def derive_seed(base: int, stream: str, *indices: int) -> int:
    """A seed in [0, 2**32) for position `indices` of the random stream `stream` of the run seeded with `base`."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r} (known: {', '.join(STREAMS)})")
    key = ":".join([stream, str(int(base)), *(str(int(i)) for i in indices)]).encode("ascii")
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
