"""Seed derivation: one hashed rule for every random stream of a run (`stepsearch.seeds`)."""

from __future__ import annotations

import hashlib

import pytest

from stepsearch.seeds import STREAMS, derive_seed


def test_a_seed_is_the_32_bit_blake2b_of_stream_base_and_position():
    expected = int.from_bytes(hashlib.blake2b(b"rollout:3:7:1", digest_size=4).digest(), "little")
    assert derive_seed(3, "rollout", 7, 1) == expected
    assert 0 <= expected < 2**32


def test_streams_and_positions_that_sums_would_confuse_get_different_seeds():
    # (seed 1, step 0) and (seed 0, step 1) collide under `seed + step`; (step 1, rank 0) and (step 0, rank 1)
    # collide under `step * world + rank` with world 1.
    assert derive_seed(1, "rollout", 0, 0) != derive_seed(0, "rollout", 1, 0)
    assert derive_seed(0, "rollout", 1, 0) != derive_seed(0, "rollout", 0, 1)
    seeds = {derive_seed(0, stream, 0) for stream in STREAMS}
    assert len(seeds) == len(STREAMS)


def test_an_unknown_stream_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'shuffle'"):
        derive_seed(0, "shuffle", 1)
