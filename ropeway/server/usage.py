"""The usage object of a response, from the final outputs of its engine requests."""

from ropeway.outputs import RequestOutput

from .protocol import PromptTokensDetails, RopewayUsage, Usage


def response_usage(num_prompt_tokens: int, finals: list[RequestOutput | None]) -> Usage:
    """Sums over the response's requests (one per prompt); a request that never produced an
    output (a stream cut off before its first step) counts nothing but its prompt."""
    outputs = [final for final in finals if final is not None]
    completion_tokens = sum(len(choice.token_ids) for final in outputs for choice in final.outputs)
    return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=num_prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(f.num_cached_tokens for f in outputs)),
                 ropeway=RopewayUsage(evicted_tokens=sum(f.num_evicted_tokens for f in outputs)))
