"""RoPE parameters of one request (its RopePlan), and the planner that picks them.

A plan is fixed for the request's life, so its cached keys never go stale, and its
`cache_key` is part of every prefix-cache block hash. Length-dependent types (dynamic NTK,
dynamic YaRN) are computed from the request's planned length rounded up to a bucket
(eighths of a power of two), so requests of similar length share a plan and their
cached prefixes. A plan within the trained context is the model's own plan, bit for bit.
The formulas reproduce transformers' `modeling_rope_utils` operation for operation.
"""

import math
from dataclasses import dataclass

import torch

from .rope_scaling import RopeScaling
from ropeway.arith import round_up

BUCKETS_PER_OCTAVE = 8


def bucket_length(length: int) -> int:
    """Round up to the next multiple of an eighth of the enclosing power of two."""
    if length <= BUCKETS_PER_OCTAVE:
        return max(length, 1)
    step = (1 << (length.bit_length() - 1)) // BUCKETS_PER_OCTAVE
    return round_up(length, step)


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _yarn(base: float, dim: int, factor: float, original: int, s: RopeScaling) -> tuple[torch.Tensor, float]:
    def mscale_of(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = float(mscale_of(factor, s.mscale) / mscale_of(factor, s.mscale_all_dim))
        else:
            attention_factor = mscale_of(factor)
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp.to(dtype=torch.float)
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def _llama3(base: float, dim: int, s: RopeScaling, original: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(base, dim)
    low_wavelen = original / s.low_freq_factor
    high_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


@dataclass(frozen=True)
class RopePlan:
    """One row of RoPE parameters. `planned_length` is set only for length-dependent types."""

    rope_type: str           # "default" (the model's own), or a scaling type
    base: float
    head_dim: int
    trained_length: int      # the model's max_position_embeddings
    scaling: RopeScaling | None = None
    planned_length: int | None = None

    @property
    def cache_key(self) -> bytes:
        return repr((self.rope_type, self.base, self.head_dim, self.trained_length, self.scaling,
                     self.planned_length)).encode()

    @property
    def is_default(self) -> bool:
        return self.rope_type == "default"

    def parameters(self) -> tuple[torch.Tensor, float]:
        """(inv_freq [head_dim/2] fp32, attention factor), as transformers computes them."""
        base, dim, s = self.base, self.head_dim, self.scaling
        if self.rope_type == "default":
            return _default_inv_freq(base, dim), 1.0
        if self.rope_type == "linear":
            return _default_inv_freq(base, dim) / s.factor, 1.0
        if self.rope_type == "ntk":
            return _default_inv_freq(base * s.factor ** (dim / (dim - 2)), dim), 1.0
        if self.rope_type == "dynamic":
            length = max(self.planned_length, self.trained_length)
            scaled = base * ((s.factor * length / self.trained_length) - (s.factor - 1)) ** (dim / (dim - 2))
            return _default_inv_freq(scaled, dim), 1.0
        original = s.original_max_position_embeddings or self.trained_length
        if self.rope_type == "yarn":
            factor = s.factor if s.factor is not None else self.trained_length / original
            return _yarn(base, dim, factor, original, s)
        if self.rope_type == "dynamic-yarn":
            return _yarn(base, dim, self.planned_length / original, original, s)
        if self.rope_type == "llama3":
            return _llama3(base, dim, s, original), 1.0
        raise ValueError(f"unknown rope type {self.rope_type!r}")

    def inv_freq(self) -> torch.Tensor:
        return self.parameters()[0]

    @property
    def attention_factor(self) -> float:
        return self.parameters()[1]

    @property
    def scaling_factor(self) -> float:
        """How far this plan stretches the trained context (1 for the model's own RoPE)."""
        if self.planned_length is not None:
            original = (self.scaling.original_max_position_embeddings or self.trained_length
                        if self.rope_type == "dynamic-yarn" else self.trained_length)
            return self.planned_length / original
        if self.scaling is not None and self.scaling.factor:
            return self.scaling.factor
        return 1.0

    @property
    def effective_base(self) -> float:
        """The base a plain RoPE would need for this plan's lowest frequency (for metrics)."""
        lowest = float(self.inv_freq()[-1])
        return lowest ** (-self.head_dim / (self.head_dim - 2))


class RopePlanner:
    """Picks plans: request scaling over the server's over the model's own."""

    def __init__(self, base: float, head_dim: int, trained_length: int, default_scaling: RopeScaling):
        self.base = base
        self.head_dim = head_dim
        self.trained_length = trained_length
        self.default_scaling = default_scaling
        self.model_plan = RopePlan("default", base, head_dim, trained_length)

    def plan(self, planned_length: int, scaling: RopeScaling | None = None) -> RopePlan:
        scaling = scaling or self.default_scaling
        if scaling.is_none:
            return self.model_plan
        if not scaling.length_dependent:
            return RopePlan(scaling.rope_type, self.base, self.head_dim, self.trained_length, scaling)
        trained = (scaling.original_max_position_embeddings or self.trained_length
                   if scaling.rope_type == "dynamic-yarn" else self.trained_length)
        if planned_length <= trained:
            return self.model_plan  # within the trained context: exactly the model's own RoPE
        return RopePlan(scaling.rope_type, self.base, self.head_dim, self.trained_length, scaling,
                        bucket_length(planned_length))

    def grow(self, plan: RopePlan, needed_length: int, scaling: RopeScaling | None, limit: int) -> RopePlan | None:
        """A larger plan for a sequence that outgrew `plan`, or None if it need not change.
        Growth at least doubles the planned length, so a sequence grows O(log n) times."""
        scaling = scaling or self.default_scaling
        if not scaling.length_dependent:
            return None
        current = plan.planned_length or self.trained_length
        if needed_length <= current:
            return None
        new = self.plan(min(max(needed_length, 2 * current), max(limit, needed_length)), scaling)
        return None if new == plan else new
