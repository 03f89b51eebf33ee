"""The last stage of sampling, torch reference: top-p cut search and the seeded draw.

For each row of scaled logits s [R, V] (temperature applied), with the cut the other filters
set (`cut`: the smallest s kept; -inf keeps all), top_p and a uniform u in (0, 1):
- where top_p < 1 and `search`: the cut rises to the largest value v whose kept mass at or
  above v reaches top_p of the kept mass (a token stays while the mass above it is below
  top_p; tokens tied at the cut stay). Found by bisection on the ordered 32-bit keys of the
  fp32 values: each of the 32 steps is one masked sum over the row, and the result is exact.
- the draw: the first token (vocabulary order) whose cumulative kept mass, in fp64, passes
  u times the total. A token of mass 0 is never drawn.
"""

import torch

# Halving the key interval (at most 2^32 keys) 32 times pins the cut to one value.
BISECTION_STEPS = 32


def ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys that order like the fp32 values (-0.0 counted as +0.0)."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def value_of_key(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys >= 0, keys, keys ^ 0x7FFFFFFF)
    return bits.to(torch.int32).view(torch.float32)


def top_p_cut_reference(scaled, cut, top_p) -> torch.Tensor:
    """[R] the cut raised by top-p (rows with top_p >= 1 keep theirs)."""
    row_max = scaled.amax(dim=-1)
    kept = torch.where(scaled >= cut[:, None], (scaled - row_max[:, None]).exp(), 0.0)
    needed = top_p * kept.sum(dim=-1)
    keys = ordered_keys(scaled)
    low = ordered_keys(cut)            # the whole kept set reaches it: mass(low) >= needed
    high = ordered_keys(row_max) + 1   # nothing lies above the maximum: mass(high) < needed
    for _ in range(BISECTION_STEPS):
        middle = (low + high) >> 1
        reaches = torch.where(keys >= middle[:, None], kept, 0.0).sum(dim=-1) >= needed
        low = torch.where(reaches, middle, low)
        high = torch.where(reaches, high, middle)
    return torch.where(top_p < 1.0, torch.maximum(cut, value_of_key(low)), cut)


def filtered_draw_reference(scaled, cut, top_p, uniform, search: bool) -> torch.Tensor:
    """[R] int64 tokens. scaled [R, V] fp32, cut and top_p [R] fp32, uniform [R] fp64; search:
    whether any row has a top_p to apply (else top_p is not read)."""
    if search:
        cut = top_p_cut_reference(scaled, cut, top_p)
    row_max = scaled.amax(dim=-1, keepdim=True)
    cumulative = torch.where(scaled >= cut[:, None], (scaled - row_max).exp(), 0.0).to(torch.float64).cumsum(-1)
    target = uniform[:, None] * cumulative[:, -1:]
    return torch.searchsorted(cumulative, target, right=True)[:, 0]


def mask_by_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [R, V] with -inf wherever the row's bit is 0. bitmask [R, ceil(V / 32)] int32: bit j
    of word w allows token 32 w + j (llguidance's and xgrammar's layout). Plain torch ops, on any
    device: a few elementwise passes over [R, V], small next to the sampler's own."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()
    return logits.masked_fill(~allowed, float("-inf"))
