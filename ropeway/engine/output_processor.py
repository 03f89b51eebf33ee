"""Output processing in the engine core, outside the scheduler's step: each sampled token is
appended, formatted (logprobs with token text), detokenized and checked against the request's
stops; finished choices are reported back so the core can free their blocks."""

import math

from ropeway.models import RopewayTokenizer
from ropeway.outputs import TokenLogprob
from ropeway.scheduler import Sequence

from .request_state import ChoiceState, RequestState


class OutputProcessor:
    def __init__(self, tokenizer: RopewayTokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def choice(self, seq: Sequence) -> ChoiceState | None:
        """The sequence's choice, unless its request is gone or the choice has finished."""
        state = self.requests.get(seq.request_id)
        if state is None:
            return None
        choice = state.choices[seq.choice_index]
        # (A request id may be reused once its request is gone: the choice must be this seq's.)
        return choice if choice.seq is seq and choice.finish_reason is None else None

    def accept(self, state: RequestState, choice: ChoiceState, token: int, result, row: int) -> bool:
        """Append one sampled token; True if it finished the choice."""
        params, seq = state.params, choice.seq
        seq.token_ids.append(token)
        if choice.logprobs is not None:
            text, k, logprob = self.tokenizer.token_to_text, params.logprobs, result.logprobs[row]
            # (-inf: a token the request's grammar forbids, not among its top logprobs.)
            top = [(t, text(t), lp) for t, lp in zip(result.top_token_ids[row][:k], result.top_logprobs[row][:k])
                   if lp != -math.inf]
            choice.logprobs.append(TokenLogprob(token, text(token), logprob, top))
            choice.cumulative_logprob += logprob
        if not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            choice.finish_reason = "stop"
        elif token in params.stop_token_ids:
            choice.finish_reason, choice.stop_reason = "stop", token
        elif params.detokenize:
            choice.detokenizer.append(token)
            if choice.detokenizer.stop_reason is not None:
                choice.finish_reason, choice.stop_reason = "stop", choice.detokenizer.stop_reason
        if choice.finish_reason is None and seq.num_tokens >= seq.max_total_tokens:
            choice.finish_reason = "length"
        return choice.finish_reason is not None
