"""The engine core's grammar matchers: one per constrained sequence, and each step's token bitmasks.

A matcher follows its sequence's output tokens: before a mask is filled it consumes the tokens
it has not seen, so a sequence preempted and recomputed (its tokens kept) finds its grammar
state where it left it, and nothing has to advance matchers elsewhere. The masks of a step's
constrained rows are filled together on llguidance's threads (the GIL released) into a host
bitmask, which goes to the device for the sampler (`sampler.GrammarMask`). A step with no
constrained row does none of this.
"""

from collections.abc import Callable

import llguidance
import llguidance.torch
import torch

from ropeway.request_bounds import InvalidParameter
from ropeway.sampling_params import SamplingParams
from ropeway.scheduler import Sequence

from .grammar import GrammarTokenizer
from .sampler import GrammarMask


class GrammarMatcher:
    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher
        self.consumed = 0  # output tokens fed to the matcher so far

    def follow(self, output_token_ids: list[int]) -> None:
        """Consume the output tokens the matcher has not seen yet."""
        new = output_token_ids[self.consumed:]
        if new and not self.matcher.consume_tokens(new):
            raise RuntimeError(f"the grammar refused a sampled token: {self.matcher.get_error()}")
        self.consumed = len(output_token_ids)


class GrammarMasks:
    def __init__(self, grammar_tokenizer: GrammarTokenizer):
        self.grammar_tokenizer = grammar_tokenizer
        self.matchers: dict[int, GrammarMatcher] = {}  # by seq_id
        self._executor: llguidance.LLExecutor | None = None

    @property
    def executor(self) -> llguidance.LLExecutor:
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        return self._executor

    def release(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)

    def _matcher(self, seq: Sequence, params: SamplingParams) -> GrammarMatcher:
        matcher = self.matchers.get(seq.seq_id)
        if matcher is None:
            matcher = self.matchers[seq.seq_id] = GrammarMatcher(
                self.grammar_tokenizer.matcher(params.structured_outputs))
        matcher.follow(seq.output_token_ids)
        return matcher

    def mask(self, seqs: list[Sequence], params: list[SamplingParams], is_live: Callable[[Sequence], bool],
             device: torch.device) -> GrammarMask | None:
        """The bitmask of the rows whose request has structured outputs (None: no such row). A row
        whose choice has already finished (its token will be dropped) is left unconstrained."""
        constrained = [row for row, p in enumerate(params) if p.structured_outputs is not None]
        if not constrained:
            return None
        vocab = self.grammar_tokenizer.vocab_size
        bitmask = llguidance.torch.allocate_token_bitmask(len(constrained), vocab)
        if device.type == "cuda":
            bitmask = bitmask.pin_memory()
        bitmask.fill_(-1)
        targets, stop_ids = [], []
        for index, row in enumerate(constrained):
            if not is_live(seqs[row]):
                continue
            matcher = self._matcher(seqs[row], params[row])
            targets.append((matcher.matcher, index))
            if params[row].stop_token_ids and matcher.matcher.is_accepting():
                stop_ids += [(index, token) for token in params[row].stop_token_ids if token < vocab]
        llguidance.torch.fill_next_token_bitmask_par(self.executor, targets, bitmask)
        for matcher, index in targets:
            if matcher.is_error():  # e.g. out of its step's fuel: the request fails, the batch goes on
                raise InvalidParameter(params[constrained[index]].structured_outputs.param,
                                       f"the grammar failed: {matcher.get_error()}")
        for index, token in stop_ids:  # a complete output may also end on the request's stop ids
            bitmask[index, token // 32] |= _bit(token % 32)
        rows = torch.tensor(constrained, dtype=torch.int64)
        if device.type == "cuda":
            rows = rows.pin_memory()  # (a copy from pageable memory would wait for the queued step)
        return GrammarMask(rows.to(device, non_blocking=True), bitmask.to(device, non_blocking=True))


def _bit(position: int) -> int:
    """Bit `position` of an int32 word, as the signed value torch stores."""
    return (1 << position) - (1 << 32 if position == 31 else 0)
