"""Counter-based random streams: two 32-bit keys per (seed, step), no generator state.

Every sequence draws from its own stream, addressed by (seed, index of the token being
sampled). The sampler's race hashes each vocabulary token with the step's keys
(`kernels/sampling.py`), so a seeded request samples the same tokens whatever else is in
the batch, after a preemption, and on CPU or GPU alike. The keys are made on the host (the
seeds and steps are host integers) and reach the device in the sampler's parameter copy.
"""

import numpy as np

MASK32 = 0xFFFFFFFF
MIX_MULTIPLIER_1 = 0x7FEB352D
MIX_MULTIPLIER_2 = 0x846CA68B
STEP_SALT = 0x9E3779B9
# Keeps the second key from being mix32(first) (for seeds below 2^32), which would make the
# race's hash of token 0, mix32(mix32(0 ^ first) ^ second), zero in every stream.
SECOND_SALT = 0x85EBCA6B


def mix32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer finaliser with good avalanche (lowbias32), on uint64 holding 32-bit values
    (the products wrap modulo 2^64; their low 32 bits, all that is kept, are exact)."""
    x = x ^ (x >> 16)
    x = (x * MIX_MULTIPLIER_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MULTIPLIER_2) & MASK32
    return x ^ (x >> 16)


def stream_keys(seeds: list[int], steps: list[int]) -> np.ndarray:
    """[R, 2] int64: the two 32-bit keys of each row's stream at its step."""
    seeds = np.asarray(seeds, dtype=np.uint64)  # the engine's seeds are in [0, 2^63)
    steps = np.asarray(steps, dtype=np.uint64) & MASK32
    first = mix32(mix32(steps ^ STEP_SALT) ^ (seeds & MASK32))
    second = mix32(first ^ (seeds >> 32) ^ SECOND_SALT)
    return np.stack([first, second], axis=1).astype(np.int64)
