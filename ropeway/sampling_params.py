"""Per-request sampling settings, validated where they are made."""

from dataclasses import dataclass, field

from ropeway.request_bounds import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SAMPLING_BOUNDS


class InvalidParameter(ValueError):
    """A request field with a bad value; `param` names the field (for OpenAI error objects)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param



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
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False: token ids only (no text, so no stop strings)
    prompt_logprobs: bool = False  # the logprob of every prompt token given the ones before it

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
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidParameter(param, message)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5
