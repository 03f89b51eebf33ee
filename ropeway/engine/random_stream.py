"""Counter-based random numbers: uniform(seed, step) from an integer hash.

Every sequence draws from its own stream, addressed by (seed, index of the token being
sampled), with no generator state. So a seeded request samples the same tokens whatever
else is in the batch, after a preemption, and on CPU or GPU alike; and the whole batch
is drawn by one set of tensor operations.

A row draws one uniform per step (the sampler inverts the kept tokens' cumulative
distribution at it), so the stream costs a few integer operations per row, not per token.
"""

import torch

MASK32 = 0xFFFFFFFF
MIX_MULTIPLIER_1 = 0x7FEB352D
MIX_MULTIPLIER_2 = 0x846CA68B
STEP_SALT = 0x9E3779B9


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser with good avalanche (lowbias32), on int64 holding 32-bit values.
    The products exceed 2^63 and wrap; their low 32 bits, all that is kept, are exact."""
    x = x ^ (x >> 16)
    x = (x * MIX_MULTIPLIER_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MULTIPLIER_2) & MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row (int64 [R] each) from int64 seeds and steps."""
    seed_low, seed_high, step = seeds & MASK32, (seeds >> 32) & MASK32, steps & MASK32
    first = mix32(mix32(step ^ STEP_SALT) ^ seed_low)
    second = mix32(first ^ seed_high)
    return first, second


def uniform_per_row(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[R] fp64 uniforms from 48 random bits, strictly inside (0, 1) and at least 2^-49 from
    either end, so that u * total < total holds in fp64 for any total."""
    first, second = row_keys(seeds, steps)
    bits = (first >> 8) * (1 << 24) + (second >> 8)
    return (bits.to(torch.float64) + 0.5) / float(1 << 48)
