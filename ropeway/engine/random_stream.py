"""Counter-based random numbers: uniform(seed, step, token) from an integer hash.

Every sequence draws from its own stream, addressed by (seed, index of the token being
sampled), with no generator state. So a seeded request samples the same tokens whatever
else is in the batch, after a preemption, and on CPU or GPU alike; and the whole batch
is drawn by one set of tensor operations.
"""

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    # (x * constant) mod 2^32 without overflowing int64: multiply by 16-bit halves.
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser with good avalanche (lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, V] fp32 uniforms in (0, 1) for rows with int64 seeds [R] and steps [R]."""
    device = seeds.device
    token = torch.arange(vocab_size, device=device, dtype=torch.int64)[None, :]
    seed_low = (seeds & _MASK32)[:, None]
    seed_high = ((seeds >> 32) & _MASK32)[:, None]
    step = (steps & _MASK32)[:, None]
    h = _mix32(token ^ 0x9E3779B9)
    h = _mix32(h ^ step)
    h = _mix32(h ^ seed_low)
    h = _mix32(h ^ seed_high)
    # 24 random bits, centred in their interval so 0 and 1 never occur.
    return ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)
