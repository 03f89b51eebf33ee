"""The receiving end of the engine core's deltas: each request's cumulative RequestOutput.

Text, token ids and logprobs are kept in append-only records; an output holds the records and
their lengths, and cuts its cumulative fields on first read, so making one per step costs
O(new tokens), not O(length so far), for a long completion.
"""

from ropeway.outputs import CompletionOutput, RequestOutput, TokenLogprob

from .messages import RequestDelta


class ChoiceRecord:
    def __init__(self, prompt_token_ids: list[int]):
        self.token_ids = list(prompt_token_ids)  # prompt, then output tokens
        self.num_prompt_tokens = len(prompt_token_ids)
        self.text_pieces: list[str] = []
        self.num_chars = 0
        self.logprobs: list[TokenLogprob] | None = None
        self.cumulative_logprob: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None


class RequestAssembly:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], n: int):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.choices = [ChoiceRecord(prompt_token_ids) for _ in range(n)]
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[list[tuple[int, float]]] | None = None

    def apply(self, delta: RequestDelta) -> RequestOutput:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
            self.prompt_top_logprobs = delta.prompt_top_logprobs
        outputs = []
        for change in delta.choices:
            record = self.choices[change.index]
            record.token_ids.extend(change.token_ids)
            if change.text:
                record.text_pieces.append(change.text)
                record.num_chars += len(change.text)
            if change.cumulative_logprob is not None:
                if record.logprobs is None:
                    record.logprobs = []
                record.logprobs.extend(change.logprobs)
                record.cumulative_logprob = change.cumulative_logprob
            record.finish_reason, record.stop_reason = change.finish_reason, change.stop_reason
            outputs.append(CompletionOutput(
                index=change.index, cumulative_logprob=record.cumulative_logprob,
                finish_reason=change.finish_reason, stop_reason=change.stop_reason,
                delta_text=change.text, delta_token_ids=change.token_ids, delta_logprobs=change.logprobs,
                text_pieces=record.text_pieces, num_text_pieces=len(record.text_pieces),
                all_token_ids=record.token_ids, first_output_token=record.num_prompt_tokens,
                num_all_token_ids=len(record.token_ids), all_logprobs=record.logprobs,
                num_logprobs=len(record.logprobs) if record.logprobs is not None else 0))
        return RequestOutput(request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
                             outputs=outputs, finished=delta.finished, num_cached_tokens=delta.num_cached_tokens,
                             num_evicted_tokens=delta.num_evicted_tokens,
                             metrics=delta.metrics, prompt_logprobs=self.prompt_logprobs,
                             prompt_top_logprobs=self.prompt_top_logprobs)
