"""Batched sampling on the device: no full-vocabulary sort, no host synchronization.

For logits [R, V] (fp32, one row per sequence that samples this step):
0. Structured outputs: the grammar's disallowed tokens of constrained rows go to -inf
   (`GrammarMask`, filled on the host by `grammar_masks.py`), before anything else.
1. Processing: logit_bias, min_tokens (EOS and stop ids to -inf), then presence, frequency and
   repetition penalties from the device-side counts of `PenaltyState`.
2. Greedy rows take the argmax of the processed logits.
3. Sampled rows divide by their temperature; every filter then keeps the tokens whose scaled
   logit s is at or above a per-row threshold (vLLM's definitions; tokens tied at a cut stay):
   - min-p: p >= min_p * p_max, that is s >= s_max + ln(min_p);
   - top-k: s >= the k-th largest s (`torch.topk`);
   - top-p, over what min-p and top-k kept, renormalized: a token stays while the mass of the
     tokens above it is below top_p. The cut is the largest value v whose mass at or above v
     reaches top_p: read off the top-k candidates when the row has top-k, else searched by
     `kernels.filtered_draw` (an exact search on the fp32 values' ordered bit patterns).
4. The draw (`kernels.filtered_draw`: Triton on CUDA, each row split over many programs;
   torch on CPU) is an exponential race among the kept tokens, each token's uniform hashed
   from the row's counter-based stream keys, so a seeded row draws the same token whatever
   the batch. Temperature alone (no filter) is that one pass.
5. Logprobs, when asked, are the model's distribution before any of this (as vLLM reports them),
   except the grammar's mask: a constrained row reports the model's distribution over the
   tokens its grammar allows (renormalized), the distribution it actually samples from before
   temperature and filters; tokens the grammar forbids never appear among its top logprobs.

`sample()` returns device tensors (on CUDA their copy to pinned host memory is queued right
behind the sampling kernels); `SampledTokens.read()` waits for that copy and gives lists.
"""

from dataclasses import dataclass

import torch

from ropeway.kernels import filtered_draw, mask_by_bitmask
from ropeway.sampling_params import SamplingParams

from .random_stream import stream_keys
from .sampling_state import PenaltyState

@dataclass
class SamplingRow:
    params: SamplingParams
    seed: int                # the row's random stream (the request's seed mixed with the choice)
    step: int                # output tokens so far: the stream's counter, and what min_tokens counts
    penalty_row: int = -1    # the sequence's row in PenaltyState, when it asks for a penalty


@dataclass
class GrammarMask:
    """The allowed tokens of a step's constrained rows, on the device."""
    rows: torch.Tensor     # [C] int64: the constrained rows of the batch
    bitmask: torch.Tensor  # [C, ceil(V / 32)] int32 (kernels.mask_by_bitmask's layout)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows.shape[0] == logits.shape[0]:
            return mask_by_bitmask(logits, self.bitmask)
        return logits.index_copy(0, self.rows, mask_by_bitmask(logits.index_select(0, self.rows), self.bitmask))


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None            # the sampled tokens' logprobs
    top_token_ids: list[list[int]] | None   # per row, the top-k tokens (k = max asked in the batch)
    top_logprobs: list[list[float]] | None


@dataclass
class SampledTokens:
    """A step's draws, still on the device."""
    token_ids: torch.Tensor                  # [R] int64
    logprobs: torch.Tensor | None = None     # [R] fp32
    top_token_ids: torch.Tensor | None = None  # [R, k] int64
    top_logprobs: torch.Tensor | None = None   # [R, k] fp32
    _host: list[torch.Tensor | None] | None = None
    _copied: torch.cuda.Event | None = None

    def _tensors(self) -> list[torch.Tensor | None]:
        return [self.token_ids, self.logprobs, self.top_token_ids, self.top_logprobs]

    def queue_host_copy(self) -> None:
        """On CUDA, queue the copy to pinned host memory now, right behind the kernels that made
        the tensors: a later read then waits for them only, not for work queued after them."""
        if not self.token_ids.is_cuda:
            return
        self._host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(
            t, non_blocking=True) for t in self._tensors()]
        self._copied = torch.cuda.Event()
        self._copied.record()

    def read(self) -> SamplerOutput:
        if self._copied is not None:
            self._copied.synchronize()
        tensors = self._host or self._tensors()
        return SamplerOutput(*[None if t is None else t.tolist() for t in tensors])


def has_penalty(params: SamplingParams) -> bool:
    return params.presence_penalty != 0 or params.frequency_penalty != 0 or params.repetition_penalty != 1.0


def is_plain_argmax(params: SamplingParams) -> bool:
    """Greedy with nothing else to compute: the token is the logits' argmax, on the device."""
    return (params.greedy and params.logprobs is None and not has_penalty(params)
            and not params.logit_bias and params.min_tokens == 0)


def sample(logits: torch.Tensor, rows: list[SamplingRow], penalties: PenaltyState | None = None,
           eos_token_ids: tuple[int, ...] = (), grammar: GrammarMask | None = None) -> SampledTokens:
    """logits [R, V] fp32. Rows with a penalty need `penalties` (their `penalty_row` set); rows with
    structured outputs, `grammar`."""
    if grammar is not None:
        logits = grammar.apply(logits)
    if all(is_plain_argmax(r.params) for r in rows):
        result = SampledTokens(logits.argmax(dim=-1))
        result.queue_host_copy()
        return result
    want = [r.params.logprobs for r in rows if r.params.logprobs is not None]
    raw_logprobs = logits.log_softmax(dim=-1) if want else None
    logits = process_logits(logits, rows, penalties, eos_token_ids)
    drawn_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if len(drawn_rows) == len(rows):
        chosen = draw(logits, rows)
    else:
        chosen = logits.argmax(dim=-1)
        if drawn_rows:
            # (Indexing with a Python list would copy it to the device synchronously.)
            index = _column(drawn_rows, torch.int64, logits.device)
            chosen = chosen.index_copy(0, index, draw(logits.index_select(0, index), [rows[i] for i in drawn_rows]))
    result = SampledTokens(chosen)
    if want:
        result.logprobs = raw_logprobs.gather(1, chosen[:, None])[:, 0]
        result.top_logprobs, result.top_token_ids = raw_logprobs.topk(max(want), dim=-1)
    result.queue_host_copy()
    return result


def process_logits(logits: torch.Tensor, rows: list[SamplingRow], penalties: PenaltyState | None,
                   eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """logit_bias, then min_tokens, then penalties, each only when some row asks for it."""
    device, vocab = logits.device, logits.shape[1]
    biased = [(i, token, bias) for i, r in enumerate(rows) for token, bias in (r.params.logit_bias or {}).items()]
    suppressed = [(i, token) for i, r in enumerate(rows) if r.step < r.params.min_tokens
                  for token in _stop_ids(r.params, eos_token_ids) if token < vocab]
    if biased or suppressed:
        logits = logits.clone()
    if biased:
        index, tokens, bias = zip(*biased)
        logits.index_put_((_column(index, torch.int64, device), _column(tokens, torch.int64, device)),
                          _column(bias, torch.float32, device), accumulate=True)
    if suppressed:
        index, tokens = zip(*suppressed)
        logits[_column(index, torch.int64, device), _column(tokens, torch.int64, device)] = float("-inf")
    if any(has_penalty(r.params) for r in rows):
        logits = apply_penalties(logits, rows, penalties)
    return logits


def _stop_ids(params: SamplingParams, eos_token_ids: tuple[int, ...]) -> list[int]:
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow], penalties: PenaltyState) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on the output counts; the repetition penalty
    (CTRL, as vLLM and transformers apply it) on every token seen in the prompt or the output.
    Rows without a penalty read row 0 and are left unchanged by their neutral parameters."""
    device = logits.device
    state_rows = _column([max(r.penalty_row, 0) for r in rows], torch.int64, device)
    counts, prompt_seen = penalties.gather(state_rows)
    presence = _column([r.params.presence_penalty for r in rows], torch.float32, device)[:, None]
    frequency = _column([r.params.frequency_penalty for r in rows], torch.float32, device)[:, None]
    repetition = _column([r.params.repetition_penalty for r in rows], torch.float32, device)[:, None]
    if any(r.params.repetition_penalty != 1.0 for r in rows):
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(prompt_seen | (counts > 0), penalised, logits)
    return logits - frequency * counts - presence * (counts > 0)


def draw(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """[R] tokens drawn from the filtered, temperature-scaled distributions of processed logits."""
    device = logits.device
    temperature = _column([r.params.temperature for r in rows], torch.float32, device)
    scaled = logits / temperature[:, None]
    row_max = scaled.amax(dim=-1)
    cut, top_p, search = cuts_before_top_p_search(scaled, row_max, rows)
    keys = _column(stream_keys([r.seed for r in rows], [r.step for r in rows]), torch.int64, device)
    return filtered_draw(scaled, cut, top_p, row_max, keys, search)


def cuts_before_top_p_search(scaled: torch.Tensor, row_max: torch.Tensor, rows: list[SamplingRow]
                             ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per row, the smallest scaled logit that min-p and top-k keep (-inf: all), with top-p
    already applied where the row has top-k; the top_p (1: none) of the rows whose top-p cut
    `filtered_draw` still searches; and whether any row needs that search."""
    device, vocab = scaled.device, scaled.shape[1]
    cut = torch.full_like(row_max, float("-inf"))
    if any(r.params.min_p > 0 for r in rows):
        min_p = _column([r.params.min_p for r in rows], torch.float32, device)
        cut = torch.maximum(cut, row_max + min_p.log())  # log(0) = -inf: no cut
    has_top_k = [0 < r.params.top_k < vocab for r in rows]
    searched = [r.params.top_p < 1.0 and not k for r, k in zip(rows, has_top_k)]
    search_top_p = _column([r.params.top_p if s else 1.0 for r, s in zip(rows, searched)], torch.float32, device)
    if not any(has_top_k):
        return cut, search_top_p, any(searched)
    top_k = _column([r.params.top_k if k else vocab for r, k in zip(rows, has_top_k)], torch.int64, device)
    candidates = scaled.topk(max(r.params.top_k for r, k in zip(rows, has_top_k) if k), dim=-1).values
    kth = candidates.gather(1, (top_k.clamp(max=candidates.shape[1]) - 1)[:, None])[:, 0]
    cut = torch.where(top_k < vocab, torch.maximum(cut, kth), cut)
    if any(r.params.top_p < 1.0 and k for r, k in zip(rows, has_top_k)):
        top_p = _column([r.params.top_p if k else 1.0 for r, k in zip(rows, has_top_k)], torch.float32, device)
        kept = torch.where(scaled >= cut[:, None], (scaled - row_max[:, None]).exp(), 0.0)
        needed = top_p * kept.sum(dim=-1)  # the mass the kept set must reach
        cut = torch.where(top_p < 1.0, _top_p_cut_from_candidates(candidates, cut, row_max, needed), cut)
    return cut, search_top_p, any(searched)


def _top_p_cut_from_candidates(candidates, cut, row_max, needed) -> torch.Tensor:
    """The top-p cut of rows whose kept set lies within their top-k candidates (sorted, largest
    first): the first candidate at which the running mass reaches what is needed."""
    mass = torch.where(candidates >= cut[:, None], (candidates - row_max[:, None]).exp(), 0.0).cumsum(dim=-1)
    reached = mass >= needed[:, None]
    first = reached.to(torch.int8).argmax(dim=-1)
    # Not reached within the candidates (rounding, or ties past them): everything kept stays.
    return torch.where(reached.any(dim=-1), candidates.gather(1, first[:, None])[:, 0], cut)


def _column(values, dtype, device) -> torch.Tensor:
    """A per-row parameter as a device tensor, copied without waiting for the GPU's queue (a
    copy from pageable memory would block the host until the queued step has finished)."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor
