"""RoPE scaling settings: what a model config, a server flag or a request asks for, validated.

Field names follow Hugging Face's `rope_scaling` / `rope_parameters`, so a model's own
config.json section can be passed through unchanged.
"""

from dataclasses import dataclass, fields

from ropeway.request_bounds import ROPE_SCALING_BOUNDS
from ropeway.sampling_params import InvalidParameter

ROPE_TYPES = ("none", "linear", "ntk", "dynamic", "yarn", "dynamic-yarn", "llama3")
# Types whose parameters depend on the request's planned length.
LENGTH_DEPENDENT_TYPES = ("dynamic", "dynamic-yarn")
_ALIASES = {"default": "none", "dynamic_yarn": "dynamic-yarn", "ntk-aware": "ntk"}


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "none"
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    # YaRN
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None

    @property
    def is_none(self) -> bool:
        return self.rope_type == "none"

    @property
    def length_dependent(self) -> bool:
        return self.rope_type in LENGTH_DEPENDENT_TYPES

    def context_limit(self, max_position_embeddings: int) -> int:
        """The longest context this scaling is meant for: the trained length times the factor
        (a model config that already states the extended length keeps it)."""
        if self.is_none or not self.factor:
            return max_position_embeddings
        trained = self.original_max_position_embeddings or max_position_embeddings
        return max(max_position_embeddings, int(trained * self.factor))

    @classmethod
    def from_dict(cls, raw: dict | None, param: str = "rope_scaling") -> "RopeScaling":
        """Validate a user- or config-supplied dict; errors name the field."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise InvalidParameter(param, f"{param} must be an object such as "
                                          '{"rope_type": "dynamic", "factor": 4}')
        values = dict(raw)
        kind = values.pop("rope_type", None) or values.pop("type", None) or "none"
        values.pop("type", None)
        values.pop("rope_theta", None)  # the model's base, not a scaling setting
        if values.get("partial_rotary_factor", 1.0) != 1.0:
            raise InvalidParameter(f"{param}.partial_rotary_factor", "partial rotary embeddings are not supported")
        values.pop("partial_rotary_factor", None)
        if not isinstance(kind, str):
            raise InvalidParameter(f"{param}.rope_type", f"rope_type must be a string, one of {', '.join(ROPE_TYPES)}")
        kind = _ALIASES.get(kind, kind)
        if kind not in ROPE_TYPES:
            raise InvalidParameter(f"{param}.rope_type",
                                   f"unknown rope_type {kind!r}; choose one of {', '.join(ROPE_TYPES)}")
        known = {f.name for f in fields(cls)} - {"rope_type"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidParameter(f"{param}.{unknown[0]}", f"unknown {param} field {unknown[0]!r}")
        for name, value in values.items():
            if value is None:
                continue
            if name == "truncate":
                if not isinstance(value, bool):
                    raise InvalidParameter(f"{param}.truncate", "truncate must be true or false")
                continue
            bound = ROPE_SCALING_BOUNDS[name]
            if not bound.contains(value):
                raise InvalidParameter(f"{param}.{name}", f"{name} must be {bound.describe()}")
            if not bound.integer:
                values[name] = float(value)  # 2 and 2.0 are one setting (and one plan key)
        scaling = cls(rope_type=kind, **values)
        scaling._check_required(param)
        return scaling

    def _check_required(self, param: str) -> None:
        needs_factor = self.rope_type in ("linear", "ntk", "dynamic", "yarn", "llama3")
        if needs_factor and self.factor is None:
            raise InvalidParameter(f"{param}.factor", f"rope_type {self.rope_type!r} needs a factor")
        if self.rope_type == "llama3":
            if self.low_freq_factor is None or self.high_freq_factor is None:
                raise InvalidParameter(param, "rope_type 'llama3' needs low_freq_factor and high_freq_factor")
            if self.high_freq_factor <= self.low_freq_factor:
                raise InvalidParameter(f"{param}.high_freq_factor", "high_freq_factor must exceed low_freq_factor")
