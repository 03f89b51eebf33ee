"""Triton top-p cut search and seeded draw (see sampling.py for what they compute).

One program per row walks the row in BLOCK-wide tiles: one pass for the maximum, one for
the kept mass, 32 bisection passes when the row has a top_p (a batch-64 row of 128k fp32
logits is 512 KiB: the passes read it from L2), and two passes for the draw, which scans
each tile's kept mass in fp64 and stops at the first token past u times the total. Both
draw passes add the same tile scans in the same order, so the running total ends exactly
at the total the target was taken from.
"""

import torch
import triton
import triton.language as tl

from .sampling import BISECTION_STEPS


@triton.jit
def _ordered_key(x):
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _filtered_draw_kernel(scaled_ptr, stride, cut_ptr, top_p_ptr, uniform_ptr, out_ptr, vocab,
                          BLOCK: tl.constexpr, STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = scaled_ptr + row * stride
    offsets = tl.arange(0, BLOCK)
    cut = tl.load(cut_ptr + row)
    top_p = tl.load(top_p_ptr + row)

    row_max = tl.full((), float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        x = tl.load(base + start + offsets, mask=start + offsets < vocab, other=float("-inf"))
        row_max = tl.maximum(row_max, tl.max(x, 0))

    if top_p < 1.0:
        total = tl.full((), 0.0, tl.float32)
        for start in range(0, vocab, BLOCK):
            x = tl.load(base + start + offsets, mask=start + offsets < vocab, other=float("-inf"))
            total += tl.sum(tl.where(x >= cut, tl.exp(x - row_max), 0.0), 0)
        needed = top_p * total
        low = _ordered_key(cut).to(tl.int64)
        high = _ordered_key(row_max).to(tl.int64) + 1
        for _ in range(STEPS):
            middle = (low + high) >> 1
            mass = tl.full((), 0.0, tl.float32)
            for start in range(0, vocab, BLOCK):
                x = tl.load(base + start + offsets, mask=start + offsets < vocab, other=float("-inf"))
                keep = (x >= cut) & (_ordered_key(x).to(tl.int64) >= middle)
                mass += tl.sum(tl.where(keep, tl.exp(x - row_max), 0.0), 0)
            reaches = mass >= needed
            low = tl.where(reaches, middle, low)
            high = tl.where(reaches, high, middle)
        bits = tl.where(low >= 0, low, low ^ 0x7FFFFFFF).to(tl.int32)
        cut = tl.maximum(cut, bits.to(tl.float32, bitcast=True))

    total = tl.full((), 0.0, tl.float64)
    for start in range(0, vocab, BLOCK):
        x = tl.load(base + start + offsets, mask=start + offsets < vocab, other=float("-inf"))
        mass = tl.where(x >= cut, tl.exp(x - row_max), 0.0).to(tl.float64)
        total += tl.max(tl.cumsum(mass, 0), 0)  # the scan's last entry: masses are >= 0
    target = tl.load(uniform_ptr + row) * total
    running = tl.full((), 0.0, tl.float64)
    token = vocab + 0  # past the end: nothing found yet
    for start in range(0, vocab, BLOCK):
        x = tl.load(base + start + offsets, mask=start + offsets < vocab, other=float("-inf"))
        scan = tl.cumsum(tl.where(x >= cut, tl.exp(x - row_max), 0.0).to(tl.float64), 0) + running
        token = tl.minimum(token, tl.min(tl.where(scan > target, start + offsets, vocab), 0))
        running = tl.max(scan, 0)
    tl.store(out_ptr + row, token.to(tl.int64))


def filtered_draw_triton(scaled, cut, top_p, uniform, search: bool, block: int = 2048) -> torch.Tensor:
    """As filtered_draw_reference; `search` is implied by top_p here (each row checks its own)."""
    rows, vocab = scaled.shape
    out = torch.empty(rows, dtype=torch.int64, device=scaled.device)
    if rows == 0:
        return out
    if not search:
        top_p = torch.ones_like(cut)
    block = min(block, triton.next_power_of_2(vocab))
    scaled = scaled.contiguous()
    _filtered_draw_kernel[(rows,)](scaled, scaled.stride(0), cut, top_p, uniform, out, vocab,
                                   BLOCK=block, STEPS=BISECTION_STEPS, num_warps=8)
    return out
