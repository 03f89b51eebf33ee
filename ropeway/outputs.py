"""What generation returns, shaped like vLLM's outputs (`out.outputs[j].text`, `.token_ids`)."""

from dataclasses import dataclass, field
from functools import cached_property


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float | None  # None only for a prompt's first token, which has nothing before it
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), best first


@dataclass
class CompletionOutput:
    """One choice of a request as it stood when the output was made.

    The cumulative fields (text, token_ids, logprobs) are cut, on first read, from the
    choice's records: the output keeps the records and their lengths at that moment. The
    records only grow (token, text and logprob lists are appended to), so the cut equals a
    copy taken then, while making an
    output each step costs O(1) instead of O(length so far)."""
    index: int
    cumulative_logprob: float | None = None
    finish_reason: str | None = None      # "stop", "length", "abort", or None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    # What is new since this request's previous output (for streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] = field(default_factory=list)
    # The records the cumulative fields are cut from.
    text_pieces: list[str] = field(default_factory=list, repr=False)
    num_text_pieces: int = 0
    all_token_ids: list[int] = field(default_factory=list, repr=False)  # prompt, then output tokens
    first_output_token: int = 0
    num_all_token_ids: int = 0
    all_logprobs: list[TokenLogprob] | None = field(default=None, repr=False)
    num_logprobs: int = 0

    @cached_property
    def text(self) -> str:
        return "".join(self.text_pieces[: self.num_text_pieces])

    @cached_property
    def token_ids(self) -> list[int]:
        return self.all_token_ids[self.first_output_token : self.num_all_token_ids]

    @cached_property
    def logprobs(self) -> list[TokenLogprob] | None:
        return None if self.all_logprobs is None else self.all_logprobs[: self.num_logprobs]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def snapshot(self) -> "RequestMetrics":
        return RequestMetrics(self.arrival_time, self.first_scheduled_time, self.first_token_time,
                              self.last_token_time, self.finished_time)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # Tokens dropped from a bounded cache (sink_window, landmark) so far, counting earlier chat
    # turns whose retained session this request continued; like num_cached_tokens, the first choice's.
    num_evicted_tokens: int = 0
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[float | None] | None = None  # [None, logprob of token 1 given token 0, ...]
    # With SamplingParams.prompt_top_logprobs = k: per prompt token, the k likeliest (id, logprob) there, best
    # first ([] for the first token, which has no context).
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None

    def merged_after(self, earlier: "RequestOutput") -> "RequestOutput":
        """This output with the deltas of an earlier output of the same request put in front:
        what a stream reader that fell a step behind sends as one frame. The cumulative
        fields are this (later) output's already."""
        before = {choice.index: choice for choice in earlier.outputs}
        for choice in self.outputs:
            previous = before.get(choice.index)
            if previous is not None:
                choice.delta_text = previous.delta_text + choice.delta_text
                choice.delta_token_ids = previous.delta_token_ids + choice.delta_token_ids
                choice.delta_logprobs = previous.delta_logprobs + choice.delta_logprobs
        return self
