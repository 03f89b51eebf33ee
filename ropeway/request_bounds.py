"""The bounds of every numeric request field, in one table.

The HTTP schema (pydantic, and through it /openapi.json) and the engine's own checks
(SamplingParams, ContextPolicy, RopeScaling) read the same bounds, so the server and the offline
engine refuse the same values with the same message. Every integer fits in int64 (the sampler's
and the scheduler's tensors), and lengths stay within int32: no context is longer.
"""

import math
from dataclasses import dataclass


class InvalidParameter(ValueError):
    """A request field with a bad value; `param` names the field (for OpenAI error objects)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Bound:
    low: float
    high: float
    low_open: bool = False   # the low end itself is outside
    integer: bool = False

    def contains(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        above_low = value > self.low if self.low_open else value >= self.low
        return above_low and value <= self.high

    def describe(self) -> str:
        if self.integer:
            return f"an integer at least {int(self.low)} and at most {int(self.high)}"
        return f"a number {'above' if self.low_open else 'at least'} {self.low:g} and at most {self.high:g}"

    def json_schema(self) -> dict:
        """The bound in JSON Schema's words (what /openapi.json shows and schemathesis checks)."""
        low = {"exclusiveMinimum": self.low} if self.low_open else {"minimum": self.low}
        return {**low, "maximum": self.high}


def _int(low: int, high: int) -> Bound:
    return Bound(low, high, integer=True)


# A request body larger than this is refused with a 413 (--max-request-bytes).
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
MAX_TOP_LOGPROBS = 20
MAX_N = 128
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit

# Fields of a completion or chat request, and SamplingParams' of the same name.
SAMPLING_BOUNDS: dict[str, Bound] = {
    "n": _int(1, MAX_N),
    "best_of": _int(1, MAX_N),
    "temperature": Bound(0.0, 100.0),
    "top_p": Bound(0.0, 1.0, low_open=True),
    "top_k": _int(-1, INT32_MAX),   # -1 and 0: off
    "min_p": Bound(0.0, 1.0),
    "presence_penalty": Bound(-2.0, 2.0),
    "frequency_penalty": Bound(-2.0, 2.0),
    "repetition_penalty": Bound(0.0, 10.0, low_open=True),
    "max_tokens": _int(1, INT32_MAX),
    "max_completion_tokens": _int(1, INT32_MAX),
    "logprobs": _int(0, MAX_TOP_LOGPROBS),
    "top_logprobs": _int(0, MAX_TOP_LOGPROBS),
    "seed": _int(-(2**63), 2**64 - 1),
}

# HTTP request fields with no SamplingParams attribute of the same type, or (min_tokens) whose
# range also depends on another field (SamplingParams checks it against max_tokens).
REQUEST_ONLY_BOUNDS: dict[str, Bound] = {
    "min_tokens": _int(0, INT32_MAX),
    "truncate_prompt_tokens": _int(-1, INT32_MAX),  # -1: the context limit; 0 is refused by the route
    "prompt_logprobs": _int(0, MAX_TOP_LOGPROBS),  # SamplingParams.prompt_top_logprobs
}

# Completions' max_tokens may be 0: the prompt is scored (echo, prompt_logprobs), nothing generated.
COMPLETION_MAX_TOKENS_BOUND = _int(0, INT32_MAX)

# A request's (or the server's) context_policy.
CONTEXT_POLICY_BOUNDS: dict[str, Bound] = {
    "sinks": _int(0, 2**20),
    "window": _int(16, INT32_MAX),
    "landmarks": _int(0, 2**20),  # 0 only with retrieve (ContextPolicy checks)
    "retrieve": _int(0, INT32_MAX),
}

# The largest RoPE scaling factor (or other scaling number): up to it every formula's parameters
# stay finite and non-zero in fp32, for any head size and base a Llama-family model uses
# (tests/test_request_bounds.py checks each type at this value).
MAX_ROPE_SCALING_VALUE = 1024.0

# A request's (or the server's, or a model config's) rope_scaling; the factor is at least 1.
ROPE_SCALING_BOUNDS: dict[str, Bound] = {
    "factor": Bound(1.0, MAX_ROPE_SCALING_VALUE),
    "original_max_position_embeddings": _int(1, INT32_MAX),
    **{name: Bound(0.0, MAX_ROPE_SCALING_VALUE, low_open=True)
       for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "low_freq_factor",
                    "high_freq_factor")},
}
