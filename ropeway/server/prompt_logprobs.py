"""The prompt's logprobs in the two shapes clients read: OpenAI's echoed completion logprobs
(tokens, token_logprobs, top_logprobs) and vLLM's prompt_logprobs field."""

from collections.abc import Callable
from dataclasses import replace

from ropeway.outputs import RequestOutput, TokenLogprob
from ropeway.sampling_params import SamplingParams

from .protocol import PromptLogprobs, PromptTokenLogprob

# A token's name in logprobs: its text, or vLLM's "token_id:<id>" (return_tokens_as_token_ids).
TokenName = Callable[[int, str], str]


def token_name(as_token_ids: bool) -> TokenName:
    if as_token_ids:
        return lambda token_id, _text: f"token_id:{token_id}"
    return lambda _token_id, text: text


def with_prompt_logprobs(params: SamplingParams, k: int) -> SamplingParams:
    """params that also record the prompt's logprobs with the k likeliest tokens (at least)."""
    return replace(params, prompt_logprobs=True, prompt_top_logprobs=max(params.prompt_top_logprobs, k))


def prompt_entries(output: RequestOutput, token_text: Callable[[int], str], k: int) -> list[TokenLogprob]:
    """One entry per prompt token, each with the k likeliest tokens at its position; the
    first token has no context, so no logprob (None)."""
    ids, tops = output.prompt_token_ids, output.prompt_top_logprobs
    entries = [TokenLogprob(ids[0], token_text(ids[0]), None, [])]
    for index in range(1, len(ids)):
        top = [(t, token_text(t), lp) for t, lp in tops[index][:k]] if k else []
        entries.append(TokenLogprob(ids[index], token_text(ids[index]), output.prompt_logprobs[index], top))
    return entries


def vllm_prompt_logprobs(entries: list[TokenLogprob], name: TokenName) -> PromptLogprobs:
    result: PromptLogprobs = []
    for entry in entries:
        if entry.logprob is None:
            result.append(None)
            continue
        found = {str(t): PromptTokenLogprob(logprob=lp, rank=rank, decoded_token=name(t, text))
                 for rank, (t, text, lp) in enumerate(entry.top, start=1)}
        found.setdefault(str(entry.token_id), PromptTokenLogprob(logprob=entry.logprob, rank=None,
                                                                 decoded_token=name(entry.token_id, entry.token)))
        result.append(found)
    return result
