"""The engine core's record of one request: its sequences, detokenizers and what was sent."""

from dataclasses import dataclass

from ropeway.outputs import RequestMetrics, TokenLogprob
from ropeway.sampling_params import SamplingParams
from ropeway.scheduler import Sequence

from .detokenizer import IncrementalDetokenizer
from .messages import ChoiceDelta, RequestDelta
from .sampler import RowSettings


@dataclass
class ChoiceState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    seed: int
    logprobs: list[TokenLogprob] | None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    sent_tokens: int = 0
    sent_logprobs: int = 0


@dataclass
class RequestState:
    request_id: str
    params: SamplingParams
    choices: list[ChoiceState]
    metrics: RequestMetrics
    sampling: RowSettings  # what params ask of the sampler, worked out once
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def make_delta(self) -> RequestDelta:
        """What each choice gained since the previous delta: O(new tokens)."""
        choices = []
        for index, choice in enumerate(self.choices):
            finished = choice.finish_reason is not None
            seq = choice.seq
            start = seq.num_prompt_tokens + choice.sent_tokens
            delta = ChoiceDelta(index=index, text=choice.detokenizer.release(finished),
                                token_ids=seq.token_ids[start : seq.num_tokens],
                                finish_reason=choice.finish_reason, stop_reason=choice.stop_reason)
            if choice.logprobs is not None:
                delta.logprobs = choice.logprobs[choice.sent_logprobs :]
                delta.cumulative_logprob = choice.cumulative_logprob
                choice.sent_logprobs = len(choice.logprobs)
            choice.sent_tokens = seq.num_tokens - seq.num_prompt_tokens
            choices.append(delta)
        first = self.choices[0].seq
        prompt_logprobs = prompt_top_logprobs = None
        prompt_done = first.num_computed_tokens >= first.num_prompt_tokens or self.finished
        if self.prompt_logprobs is not None and not self.prompt_logprobs_sent and prompt_done:
            prompt_logprobs, self.prompt_logprobs_sent = list(self.prompt_logprobs), True
            prompt_top_logprobs = self.prompt_top_logprobs
        return RequestDelta(request_id=self.request_id, choices=choices, finished=self.finished,
                            metrics=self.metrics.snapshot(), num_cached_tokens=first.num_cached_prompt_tokens,
                            num_evicted_tokens=first.num_evicted_tokens, prompt_logprobs=prompt_logprobs,
                            prompt_top_logprobs=prompt_top_logprobs)
