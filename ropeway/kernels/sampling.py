"""The last stage of sampling, torch reference: top-p cut search and the seeded draw.

For each row of scaled logits s [R, V] (temperature applied), with the cut the other filters
set (`cut`: the smallest s kept; -inf keeps all), top_p, the row maximum and two 32-bit
stream keys:
- where top_p < 1 and `search`: the cut rises to the largest value v whose kept mass at or
  above v reaches top_p of the kept mass (a token stays while the mass above it is below
  top_p; tokens tied at the cut stay). The reference bisects on the ordered 32-bit keys of
  the fp32 values; the Triton version narrows the same interval 16 ways per pass. Both pin
  the one answer.
- the draw, an exponential race (the Gumbel-max trick): every kept token t gets a uniform
  u_t from a counter-based hash of (stream keys, t), and the token with the largest
  s_t - ln(-ln u_t) wins (the first on a tie). That picks t with probability softmax(s) over
  the kept set, in one pass with no cumulative sum, so a row can be split over many
  programs. The keys are fp64, and u_t has 32 random bits: the race's extreme tail (a token
  needing -ln(-ln u) > 22.9 to win) is cut at ~1e-10 per token.
"""

import torch

# Halving the key interval (at most 2^32 keys) 32 times pins the cut to one value.
BISECTION_STEPS = 32

MASK32 = 0xFFFFFFFF
MIX_MULTIPLIER_1 = 0x7FEB352D
MIX_MULTIPLIER_2 = 0x846CA68B


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser with good avalanche (lowbias32), on int64 holding 32-bit values.
    The products exceed 2^63 and wrap; their low 32 bits, all that is kept, are exact."""
    x = x ^ (x >> 16)
    x = (x * MIX_MULTIPLIER_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MULTIPLIER_2) & MASK32
    return x ^ (x >> 16)


def token_bits(tokens: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """32 random bits (int64) per token of a stream with keys (first, second), broadcast."""
    return mix32(mix32(tokens ^ first) ^ second)


def race_keys(scaled: torch.Tensor, cut: torch.Tensor, stream_keys: torch.Tensor) -> torch.Tensor:
    """[R, V] fp64: s - ln(-ln u) where s >= cut, -inf elsewhere. stream_keys [R, 2] int64.
    Only kept tokens are hashed: filters usually keep a few dozen of a row's tokens."""
    rows, tokens = (scaled >= cut[:, None]).nonzero(as_tuple=True)
    bits = token_bits(tokens, stream_keys[rows, 0], stream_keys[rows, 1])
    uniform = (bits.to(torch.float64) + 0.5) / float(1 << 32)  # strictly inside (0, 1)
    keys = torch.full(scaled.shape, float("-inf"), dtype=torch.float64, device=scaled.device)
    keys[rows, tokens] = scaled[rows, tokens].to(torch.float64) - (-uniform.log()).log()
    return keys


def ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys that order like the fp32 values (-0.0 counted as +0.0)."""
    bits = (values + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def value_of_key(keys: torch.Tensor) -> torch.Tensor:
    bits = torch.where(keys >= 0, keys, keys ^ 0x7FFFFFFF)
    return bits.to(torch.int32).view(torch.float32)


def top_p_cut_reference(scaled, cut, top_p, row_max) -> torch.Tensor:
    """[R] the cut raised by top-p (rows with top_p >= 1 keep theirs)."""
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


def filtered_draw_reference(scaled, cut, top_p, row_max, stream_keys, search: bool) -> torch.Tensor:
    """[R] int64 tokens. scaled [R, V] fp32; cut, top_p and row_max [R] fp32; stream_keys
    [R, 2] int64; search: whether any row has a top_p to apply (else top_p is not read)."""
    if search:
        cut = top_p_cut_reference(scaled, cut, top_p, row_max)
    return race_keys(scaled, cut, stream_keys).argmax(dim=-1)


def mask_by_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [R, V] with -inf wherever the row's bit is 0. bitmask [R, ceil(V / 32)] int32: bit j
    of word w allows token 32 w + j (llguidance's and xgrammar's layout). Plain torch ops, on any
    device: a few elementwise passes over [R, V], small next to the sampler's own."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, :vocab].bool()
    return logits.masked_fill(~allowed, float("-inf"))
