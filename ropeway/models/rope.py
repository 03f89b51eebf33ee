"""RoPE formulas: a RopePlan (plain data, chosen by the scheduler) to inv_freq and attention factor.

They reproduce transformers' `modeling_rope_utils` operation for operation (tests compare with
`ROPE_INIT_FUNCTIONS` for exact equality).
"""

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # plain data from the scheduler; models does not import it at run time
    from ropeway.scheduler import RopePlan, RopeScaling


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _yarn(base: float, dim: int, factor: float, original: int, s: "RopeScaling") -> tuple[torch.Tensor, float]:
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


def _llama3(base: float, dim: int, s: "RopeScaling", original: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(base, dim)
    low_wavelen = original / s.low_freq_factor
    high_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_parameters(plan: "RopePlan") -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp32, attention factor) of a plan, as transformers computes them."""
    base, dim, s = plan.base, plan.head_dim, plan.scaling
    if plan.rope_type == "default":
        return _default_inv_freq(base, dim), 1.0
    if plan.rope_type == "linear":
        return _default_inv_freq(base, dim) / s.factor, 1.0
    if plan.rope_type == "ntk":
        return _default_inv_freq(base * s.factor ** (dim / (dim - 2)), dim), 1.0
    if plan.rope_type == "dynamic":
        length = max(plan.planned_length, plan.trained_length)
        scaled = base * ((s.factor * length / plan.trained_length) - (s.factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(scaled, dim), 1.0
    original = s.original_max_position_embeddings or plan.trained_length
    if plan.rope_type == "yarn":
        factor = s.factor if s.factor is not None else plan.trained_length / original
        return _yarn(base, dim, factor, original, s)
    if plan.rope_type == "dynamic-yarn":
        return _yarn(base, dim, plan.planned_length / original, original, s)
    if plan.rope_type == "llama3":
        return _llama3(base, dim, s, original), 1.0
    raise ValueError(f"unknown rope type {plan.rope_type!r}")


def rope_inv_freq(plan: "RopePlan") -> torch.Tensor:
    return rope_parameters(plan)[0]


def effective_base(plan: "RopePlan") -> float:
    """The base a plain RoPE would need for this plan's lowest frequency (for metrics); inf when
    the lowest frequency underflows to 0."""
    lowest = float(rope_inv_freq(plan)[-1])
    return lowest ** (-plan.head_dim / (plan.head_dim - 2)) if lowest > 0 else float("inf")
