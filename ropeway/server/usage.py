"""The usage object of a response, from the final outputs of its engine requests."""

from ropeway.outputs import RequestOutput

from .protocol import PromptTokensDetails, RopewayUsage, Usage


def response_usage(num_prompt_tokens: int, finals: list[RequestOutput | None], prompt_only: bool = False) -> Usage:
    """Sums over the response's requests (one per prompt); a request that never produced an
    output (a stream cut off before its first step) counts nothing but its prompt. prompt_only
    (max_tokens 0: scoring the prompt) completes nothing, whatever token the engine drew."""
    outputs = [final for final in finals if final is not None]
    completion_tokens = 0 if prompt_only else sum(len(c.token_ids) for final in outputs for c in final.outputs)
    return Usage(prompt_tokens=num_prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=num_prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(f.num_cached_tokens for f in outputs)),
                 ropeway=RopewayUsage(evicted_tokens=sum(f.num_evicted_tokens for f in outputs)))
