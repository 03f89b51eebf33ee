"""Per-request sampling settings, validated where they are made."""

from dataclasses import dataclass, field

from ropeway.request_bounds import (
    INT32_MAX,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TOP_LOGPROBS,
    SAMPLING_BOUNDS,
    InvalidParameter,
)
from ropeway.structured_outputs import StructuredOutputs

__all__ = ["InvalidParameter", "SamplingParams"]


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = 16  # None: until a stop, EOS or the context limit
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k: the sampled token's logprob and the top k
    prompt_top_logprobs: int = 0  # with prompt_logprobs: also the k likeliest tokens at each prompt position
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False: token ids only (no text, so no stop strings)
    prompt_logprobs: bool = False  # the logprob of every prompt token given the ones before it
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the output before this many tokens
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit (OpenAI: -100..100)
    # What the output must match (ropeway/structured_outputs.py); None: free text.
    structured_outputs: StructuredOutputs | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        for name, bound in SAMPLING_BOUNDS.items():
            value = getattr(self, name, None)
            if value is not None and not bound.contains(value):
                raise InvalidParameter(name, f"{name} must be {bound.describe()}")
        checks = [
            ("stop", len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
            ("stop", all(isinstance(s, str) and len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
             f"stop strings must be strings of at most {MAX_STOP_STRING_CHARS} characters"),
            ("stop_token_ids", len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
             f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids"),
            ("stop_token_ids", all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                   for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            ("stop", self.detokenize or not self.stop, "stop strings need detokenize=True"),
            ("prompt_logprobs", isinstance(self.prompt_top_logprobs, int)
             and not isinstance(self.prompt_top_logprobs, bool) and 0 <= self.prompt_top_logprobs <= MAX_TOP_LOGPROBS,
             f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            ("min_tokens", isinstance(self.min_tokens, int) and not isinstance(self.min_tokens, bool)
             and self.min_tokens >= 0, "min_tokens must be a non-negative integer"),
            ("min_tokens", not isinstance(self.min_tokens, int) or self.min_tokens <= INT32_MAX,
             f"min_tokens must be at most {INT32_MAX}"),
            ("min_tokens", not isinstance(self.min_tokens, int) or self.max_tokens is None
             or self.min_tokens <= self.max_tokens,
             "min_tokens must not exceed max_tokens"),
            ("logit_bias", self._logit_bias_is_valid(),
             f"logit_bias maps at most {MAX_LOGIT_BIAS_ENTRIES} non-negative integer token ids "
             "to finite biases in [-100, 100]"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidParameter(param, message)

    def _logit_bias_is_valid(self) -> bool:
        if self.logit_bias is None:
            return True
        return len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES and all(
            isinstance(token, int) and token >= 0 and isinstance(bias, (int, float)) and -100.0 <= bias <= 100.0
            for token, bias in self.logit_bias.items())

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
