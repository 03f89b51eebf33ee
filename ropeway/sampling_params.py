"""Per-request sampling settings, validated where they are made."""

from dataclasses import dataclass, field


class InvalidParameter(ValueError):
    """A request field with a bad value; `param` names the field (for OpenAI error objects)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit


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

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("n", self.n >= 1, "n must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "top_k must be -1 (off), 0 (off) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            ("prompt_logprobs", 0 <= self.prompt_top_logprobs <= MAX_TOP_LOGPROBS,
             f"prompt_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            ("stop", len(self.stop) <= 16, "at most 16 stop strings"),
            ("stop_token_ids", all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            ("stop", self.detokenize or not self.stop, "stop strings need detokenize=True"),
            ("seed", self.seed is None or -(2**63) <= self.seed < 2**64, "seed must fit in 64 bits"),
            ("min_tokens", isinstance(self.min_tokens, int) and self.min_tokens >= 0,
             "min_tokens must be a non-negative integer"),
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
