"""Admission limits: how long a request may get, decided by one function for the HTTP 400 and
the engine core alike."""

from dataclasses import dataclass

from ropeway.context_params import ContextParams
from ropeway.sampling_params import InvalidParameter
from ropeway.scheduler import ContextPolicy, RopeScaling


@dataclass(frozen=True)
class ContextLimits:
    max_model_len: int            # the server's limit for requests under its own RoPE scaling
    max_model_len_is_explicit: bool  # --max-model-len was given: nothing passes it
    trained_context: int          # the model's max_position_embeddings
    pool_tokens: int              # one sequence can never hold more than the KV pool
    block_size: int
    default_policy: ContextPolicy
    default_scaling: RopeScaling
    tensor_parallel_size: int = 1

    def policy(self, context: ContextParams | None) -> ContextPolicy:
        if context is None or context.context_policy is None:
            return self.default_policy
        return context.context_policy

    def context_limit(self, scaling: RopeScaling | None) -> int:
        """The longest sequence a request may reach. Under the server's scaling, max_model_len.
        A request's own scaling sets its own limit (factor x trained context), up to what the KV
        pool holds, unless --max-model-len was set explicitly, which caps every request."""
        if scaling is None:
            return self.max_model_len
        own = min(scaling.context_limit(self.trained_context), self.pool_tokens)
        return min(own, self.max_model_len) if self.max_model_len_is_explicit else own

    def check(self, num_prompt_tokens: int, max_tokens: int | None, context: ContextParams | None,
              param: str = "prompt") -> None:
        """Refuse what cannot fit, with the message OpenAI clients expect and the ways to get more."""
        if num_prompt_tokens == 0:
            raise InvalidParameter(param, "the prompt is empty")
        policy = self.policy(context)
        if policy.type == "landmark" and self.tensor_parallel_size > 1:
            raise InvalidParameter("context_policy.type", "the landmark policy is not supported under tensor "
                                   "parallelism (--tensor-parallel-size > 1); use sink_window")
        if policy.bounded:
            cache = policy.max_cache_tokens(self.block_size)
            if cache > self.max_model_len:
                raise InvalidParameter("context_policy.window", f"sinks + window ({policy.sinks} + {policy.window}) "
                                       f"need {cache} cache tokens, more than the server's context of "
                                       f"{self.max_model_len} tokens")
            return  # a bounded cache streams through any length in constant memory
        scaling = context.rope_scaling if context is not None else None
        limit = self.context_limit(scaling)
        requested = num_prompt_tokens + (max_tokens or 1)
        if requested > limit:
            detail = f" ({num_prompt_tokens} in the prompt, {max_tokens} in the completion)" if max_tokens else ""
            raise InvalidParameter(param, f"This model's maximum context length is {limit} tokens; your request has "
                                          f"{requested}{detail}. Shorten the prompt or max_tokens; or give the "
                                          "request a longer context: a `rope_scaling` of its own (e.g. "
                                          '{"rope_type": "dynamic", "factor": 4}) or a bounded `context_policy` '
                                          '(e.g. {"type": "sink_window", "window": 4096}); or start the server '
                                          "with a larger --max-model-len and --rope-scaling.")

    def sequence_lengths(self, num_prompt_tokens: int, max_tokens: int | None,
                         context: ContextParams | None) -> tuple[int, int]:
        """(the most tokens the sequence may reach, the length its RoPE plan is planned for)."""
        policy = self.policy(context)
        scaling = context.rope_scaling if context is not None else None
        limit = self.context_limit(scaling)
        if policy.bounded:
            # Unbounded stream, bounded cache: the plan is sized for the cache, not the stream.
            max_total = num_prompt_tokens + (max_tokens or limit)
            planned = min(num_prompt_tokens + (max_tokens or 0), policy.max_cache_tokens(self.block_size))
        else:
            max_total = min(num_prompt_tokens + (max_tokens or limit), limit)
            planned = min(num_prompt_tokens + (max_tokens or 0), limit)
        return max_total, planned
