"""The edge of the engine: a request's prompt, SamplingParams and ContextParams become one
checked, typed EngineRequest (token ids, never text, cross to the engine core)."""

import time

from ropeway.context_params import ContextParams
from ropeway.models import RopewayTokenizer
from ropeway.sampling_params import InvalidParameter, SamplingParams

from .grammar import GrammarTokenizer
from .limits import ContextLimits
from .messages import EngineRequest

NO_CONTEXT = ContextParams()


class InputProcessor:
    def __init__(self, tokenizer: RopewayTokenizer, limits: ContextLimits, vocab_size: int,
                 grammars: GrammarTokenizer | None = None):
        """grammars: the engine core's, when it runs in this process (one vocabulary build, not two)."""
        self.tokenizer = tokenizer
        self.limits = limits
        self.vocab_size = vocab_size
        self.grammars = grammars or GrammarTokenizer(tokenizer.tokenizer.to_str(), vocab_size,
                                                     tokenizer.eos_token_ids)

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        vocab = self.vocab_size
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise InvalidParameter(param, f"token ids must be integers in [0, {vocab})")

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                context: ContextParams | None = None, param: str = "prompt") -> EngineRequest:
        """Raises InvalidParameter naming the field for anything the engine could not serve."""
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
            self.check_token_ids(token_ids, param)
        self.check_token_ids(params.stop_token_ids, "stop_token_ids")
        self.grammars.check(params)  # a constraint that cannot compile gets its 400 here, before any stream
        context = context or NO_CONTEXT
        self.limits.check(len(token_ids), params.max_tokens, context, param)
        return EngineRequest(request_id=request_id, prompt_token_ids=token_ids, params=params, context=context,
                             arrival_time=time.monotonic(), prompt=text)
