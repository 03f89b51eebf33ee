"""RoPE parameters of one request, fixed for its life.

This module holds the plan's shape and the model's own (unscaled) parameters; the
context-extension work fills in the scaled types. The plan's `cache_key` is part of every
prefix-cache block hash, so blocks computed under one plan are never reused under another.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RopePlan:
    rope_type: str
    base: float
    head_dim: int
    attention_factor: float = 1.0

    @property
    def cache_key(self) -> bytes:
        return f"{self.rope_type}:{self.base!r}:{self.head_dim}:{self.attention_factor!r}".encode()

    def inv_freq(self) -> torch.Tensor:
        """[head_dim/2] fp32, computed exactly as transformers' default RoPE init does."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(torch.float32) / self.head_dim
        return 1.0 / (self.base ** exponents)


def model_rope_plan(base: float, head_dim: int) -> RopePlan:
    return RopePlan(rope_type="default", base=base, head_dim=head_dim)
