"""The engine's record of one request: its sequences, detokenizers and what was sent."""

import time
from dataclasses import dataclass, field

from ropeway.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from ropeway.sampling_params import SamplingParams
from ropeway.scheduler import Sequence

from .detokenizer import IncrementalDetokenizer


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
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: list[ChoiceState]
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.monotonic()))
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def make_output(self) -> RequestOutput:
        """A snapshot with cumulative fields, plus deltas since the previous snapshot; O(new
        tokens), as the cumulative fields are cut from the records only when read."""
        outputs = []
        for index, choice in enumerate(self.choices):
            finished = choice.finish_reason is not None
            delta_text = choice.detokenizer.release(finished)
            seq = choice.seq
            token_ids, num_prompt_tokens, num_tokens = seq.token_ids, seq.num_prompt_tokens, seq.num_tokens
            delta_logprobs = []
            if choice.logprobs is not None:
                delta_logprobs = choice.logprobs[choice.sent_logprobs :]
                choice.sent_logprobs = len(choice.logprobs)
            outputs.append(CompletionOutput(
                index=index,
                cumulative_logprob=choice.cumulative_logprob if choice.logprobs is not None else None,
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
                delta_text=delta_text,
                delta_token_ids=token_ids[num_prompt_tokens + choice.sent_tokens : num_tokens],
                delta_logprobs=delta_logprobs,
                all_text=choice.detokenizer.text,
                num_text_chars=choice.detokenizer.released,
                all_token_ids=token_ids,
                first_output_token=num_prompt_tokens,
                num_all_token_ids=num_tokens,
                all_logprobs=choice.logprobs,
                num_logprobs=choice.sent_logprobs,
            ))
            choice.sent_tokens = num_tokens - num_prompt_tokens
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=self.choices[0].seq.num_cached_prompt_tokens,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            prompt_top_logprobs=list(self.prompt_top_logprobs) if self.prompt_top_logprobs is not None else None,
            metrics=self.metrics.snapshot(),  # the live record keeps changing
        )
