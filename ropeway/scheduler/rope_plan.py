"""RoPE parameters of one request (its RopePlan), and the planner that picks them.

A plan is fixed for the request's life, so its cached keys never go stale, and its
`cache_key` is part of every prefix-cache block hash. Length-dependent types (dynamic NTK,
dynamic YaRN) are computed from the request's planned length rounded up to a bucket
(eighths of a power of two), so requests of similar length share a plan and their
cached prefixes. A plan within the trained context is the model's own plan, bit for bit.
A plan is plain data: the formulas (ropeway/models/rope.py) turn it into inv_freq and an
attention factor, reproducing transformers' `modeling_rope_utils` operation for operation.
"""

from dataclasses import dataclass

from .rope_scaling import RopeScaling
from ropeway.arith import round_up

BUCKETS_PER_OCTAVE = 8


def bucket_length(length: int) -> int:
    """Round up to the next multiple of an eighth of the enclosing power of two."""
    if length <= BUCKETS_PER_OCTAVE:
        return max(length, 1)
    step = (1 << (length.bit_length() - 1)) // BUCKETS_PER_OCTAVE
    return round_up(length, step)


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
