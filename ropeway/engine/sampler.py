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

The host's share must not grow with the batch faster than greedy's (issue 16): a request's
`RowSettings` are worked out once, a step reads its rows into numpy arrays (`SamplingBatch`),
and the per-row parameters reach the device in one pinned buffer and one copy (`upload`).
"""

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from ropeway.kernels import filtered_draw, mask_by_bitmask
from ropeway.sampling_params import SamplingParams

from .random_stream import stream_keys
from .sampling_state import PenaltyState

# RowSettings.flags: what a row asks of the sampler.
GREEDY = 1
PLAIN_ARGMAX = 2     # greedy with nothing else to compute: the logits' argmax
PENALTY = 4          # presence, frequency or repetition
REPETITION = 8
LOGIT_BIAS = 16
MIN_TOKENS = 32
MIN_P = 64
LOGPROBS = 128

# RowSettings.floats, in this order: the columns of SamplingBatch.floats.
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
TEMPERATURE, TOP_P_COLUMN, MIN_P_COLUMN, PRESENCE, FREQUENCY, REPETITION_COLUMN = range(len(FLOAT_FIELDS))


class RowSettings:
    """What one request's SamplingParams ask of the sampler, worked out once per request: a
    step then reads a few numbers per row instead of re-deriving them from the params."""

    __slots__ = ("params", "flags", "floats", "top_k", "logprobs")

    def __init__(self, params: SamplingParams):
        self.params = params
        self.floats = tuple(float(getattr(params, name)) for name in FLOAT_FIELDS)
        self.top_k = params.top_k
        self.logprobs = -1 if params.logprobs is None else params.logprobs
        flags = ((GREEDY if params.greedy else 0) | (PENALTY if has_penalty(params) else 0)
                 | (REPETITION if params.repetition_penalty != 1.0 else 0)
                 | (LOGIT_BIAS if params.logit_bias else 0) | (MIN_TOKENS if params.min_tokens else 0)
                 | (MIN_P if params.min_p > 0 else 0) | (LOGPROBS if params.logprobs is not None else 0))
        if flags & (GREEDY | PENALTY | LOGIT_BIAS | MIN_TOKENS | LOGPROBS) == GREEDY:
            flags |= PLAIN_ARGMAX
        self.flags = flags


@dataclass
class SamplingRow:
    params: SamplingParams
    seed: int                # the row's random stream (the request's seed mixed with the choice)
    step: int                # output tokens so far: the stream's counter, and what min_tokens counts
    penalty_row: int = -1    # the sequence's row in PenaltyState, when it asks for a penalty
    # The request's settings (the engine keeps one per request); made from params when not given.
    settings: RowSettings | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.settings is None:
            self.settings = RowSettings(self.params)


class SamplingBatch:
    """A step's rows as host arrays, each built in one pass over the rows; what the sampler's
    device work needs of them goes up in one pinned buffer and one asynchronous copy."""

    def __init__(self, rows: list[SamplingRow]):
        self.rows = rows
        settings = [row.settings for row in rows]
        self.settings = settings
        self.flags = np.fromiter((s.flags for s in settings), np.int64, len(rows))
        self.any_flags = int(np.bitwise_or.reduce(self.flags)) if rows else 0
        self.all_flags = int(np.bitwise_and.reduce(self.flags)) if rows else 0

    @functools.cached_property
    def floats(self) -> np.ndarray:
        """[R, len(FLOAT_FIELDS)] fp32 (a plain-argmax batch never asks)."""
        return np.array([s.floats for s in self.settings], dtype=np.float32).reshape(len(self), len(FLOAT_FIELDS))

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, index: list[int]) -> "SamplingBatch":
        return SamplingBatch([self.rows[i] for i in index])

    def draw_columns(self, vocab: int, device: torch.device) -> "DrawColumns":
        """The draw's per-row parameters on the device (top-k as large as the vocabulary is none)."""
        rows, floats = self.rows, self.floats
        top_k = np.fromiter((s.top_k for s in self.settings), np.int64, len(rows))
        has_top_k = (top_k > 0) & (top_k < vocab)
        top_p = floats[:, TOP_P_COLUMN]
        searched = (top_p < 1.0) & ~has_top_k
        keys = stream_keys(np.fromiter((r.seed for r in rows), np.uint64, len(rows)),
                           np.fromiter((r.step for r in rows), np.uint64, len(rows)))
        # The cut starts at -inf (keep all) for every row: uploaded with the rest instead of filled on the device.
        arrays = [keys, floats[:, TEMPERATURE, None], np.where(searched, top_p, np.float32(1.0)),
                  np.full(len(rows), -np.inf, np.float32)]
        any_min_p = bool(self.any_flags & MIN_P)
        any_top_k = bool(has_top_k.any())
        if any_min_p:
            arrays.append(floats[:, MIN_P_COLUMN])
        if any_top_k:
            max_top_k = int(top_k[has_top_k].max())
            # Where each row's k-th value sits among the batch's max_top_k candidates (rows without a top-k read 0).
            kth_index = np.where(has_top_k, top_k - 1, 0)[:, None]
            arrays += [has_top_k, kth_index, np.where(has_top_k, top_p, np.float32(1.0))]
        uploaded = upload(arrays, device)
        columns = DrawColumns(stream_keys=uploaded[0], temperature=uploaded[1], search_top_p=uploaded[2],
                              no_cut=uploaded[3], any_search=bool(searched.any()))
        if any_min_p:
            columns.min_p = uploaded[4]
        if any_top_k:
            columns.has_top_k, columns.kth_index, columns.top_k_top_p = uploaded[-3:]
            columns.max_top_k = max_top_k
            columns.any_top_k_top_p = bool((has_top_k & (top_p < 1.0)).any())
        return columns


@dataclass
class DrawColumns:
    """The draw's per-row parameters on the device, and what the host knows about them."""
    stream_keys: torch.Tensor         # [R, 2] int64
    temperature: torch.Tensor         # [R, 1] fp32
    search_top_p: torch.Tensor        # [R] fp32: the top_p the cut search applies (1: none)
    no_cut: torch.Tensor              # [R] fp32, all -inf: the cut before any filter
    any_search: bool
    min_p: torch.Tensor | None = None         # [R] fp32, when a row has one
    has_top_k: torch.Tensor | None = None     # [R] bool, when a row has a top-k below the vocabulary
    kth_index: torch.Tensor | None = None     # [R, 1] int64: top_k - 1 (0: none)
    top_k_top_p: torch.Tensor | None = None   # [R] fp32: top_p of rows with a top-k (1: none)
    max_top_k: int = 0
    any_top_k_top_p: bool = False


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


def sample(logits: torch.Tensor, rows: list[SamplingRow], penalties: PenaltyState | None = None,
           eos_token_ids: tuple[int, ...] = (), grammar: GrammarMask | None = None) -> SampledTokens:
    """logits [R, V] fp32. Rows with a penalty need `penalties` (their `penalty_row` set); rows with
    structured outputs, `grammar`."""
    if grammar is not None:
        logits = grammar.apply(logits)
    batch = SamplingBatch(rows)
    if batch.all_flags & PLAIN_ARGMAX:
        result = SampledTokens(logits.argmax(dim=-1))
        result.queue_host_copy()
        return result
    want = max(s.logprobs for s in batch.settings) if batch.any_flags & LOGPROBS else -1
    raw_logprobs = logits.log_softmax(dim=-1) if want >= 0 else None
    logits = process_logits(logits, batch, penalties, eos_token_ids)
    if not batch.any_flags & GREEDY:
        chosen = draw(logits, batch)
    else:
        chosen = logits.argmax(dim=-1)
        drawn_rows = np.flatnonzero((batch.flags & GREEDY) == 0)
        if drawn_rows.size:
            index = upload([drawn_rows], logits.device)[0]
            drawn = draw(logits.index_select(0, index), batch.subset(drawn_rows.tolist()))
            chosen = chosen.index_copy(0, index, drawn)
    result = SampledTokens(chosen)
    if want >= 0:
        result.logprobs = raw_logprobs.gather(1, chosen[:, None])[:, 0]
        result.top_logprobs, result.top_token_ids = raw_logprobs.topk(want, dim=-1)
    result.queue_host_copy()
    return result


def process_logits(logits: torch.Tensor, batch: SamplingBatch, penalties: PenaltyState | None,
                   eos_token_ids: tuple[int, ...]) -> torch.Tensor:
    """logit_bias, then min_tokens, then penalties, each only when some row asks for it."""
    device, vocab = logits.device, logits.shape[1]
    biased = suppressed = ()
    if batch.any_flags & LOGIT_BIAS:
        biased = [(i, token, bias) for i, r in enumerate(batch.rows)
                  for token, bias in (r.params.logit_bias or {}).items()]
    if batch.any_flags & MIN_TOKENS:
        suppressed = [(i, token) for i, r in enumerate(batch.rows) if r.step < r.params.min_tokens
                      for token in _stop_ids(r.params, eos_token_ids) if token < vocab]
    if biased or suppressed:
        logits = logits.clone()
    if biased:
        index, tokens, bias = zip(*biased)
        index, tokens, bias = upload([np.array(index), np.array(tokens), np.array(bias, np.float32)], device)
        logits.index_put_((index, tokens), bias, accumulate=True)
    if suppressed:
        index, tokens = upload(list(np.array(suppressed).T), device)
        logits[index, tokens] = float("-inf")
    if batch.any_flags & PENALTY:
        logits = apply_penalties(logits, batch, penalties)
    return logits


def _stop_ids(params: SamplingParams, eos_token_ids: tuple[int, ...]) -> list[int]:
    return list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_token_ids))


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch, penalties: PenaltyState) -> torch.Tensor:
    """OpenAI's presence and frequency penalties on the output counts; the repetition penalty
    (CTRL, as vLLM and transformers apply it) on every token seen in the prompt or the output.
    Rows without a penalty read row 0 and are left unchanged by their neutral parameters."""
    state_rows = np.fromiter((max(r.penalty_row, 0) for r in batch.rows), np.int64, len(batch))
    state_rows, floats = upload([state_rows, np.ascontiguousarray(batch.floats[:, PRESENCE:].T)], logits.device)
    presence, frequency, repetition = (column[:, None] for column in floats)
    counts, prompt_seen = penalties.gather(state_rows)
    if batch.any_flags & REPETITION:
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(prompt_seen | (counts > 0), penalised, logits)
    return logits - frequency * counts - presence * (counts > 0)


def draw(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[R] tokens drawn from the filtered, temperature-scaled distributions of processed logits."""
    columns = batch.draw_columns(logits.shape[1], logits.device)
    scaled = logits / columns.temperature
    row_max = scaled.amax(dim=-1)
    cut, top_p, search = cuts_before_top_p_search(scaled, row_max, columns)
    return filtered_draw(scaled, cut, top_p, row_max, columns.stream_keys, search)


def cuts_before_top_p_search(scaled: torch.Tensor, row_max: torch.Tensor, columns: DrawColumns
                             ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Per row, the smallest scaled logit that min-p and top-k keep (-inf: all), with top-p
    already applied where the row has top-k; the top_p (1: none) of the rows whose top-p cut
    `filtered_draw` still searches; and whether any row needs that search."""
    cut = columns.no_cut
    if columns.min_p is not None:
        cut = torch.maximum(cut, row_max + columns.min_p.log())  # log(0) = -inf: no cut
    if columns.has_top_k is None:
        return cut, columns.search_top_p, columns.any_search
    candidates = scaled.topk(columns.max_top_k, dim=-1).values
    kth = candidates.gather(1, columns.kth_index)[:, 0]
    cut = torch.where(columns.has_top_k, torch.maximum(cut, kth), cut)
    if columns.any_top_k_top_p:
        top_p = columns.top_k_top_p
        kept = torch.where(scaled >= cut[:, None], (scaled - row_max[:, None]).exp(), 0.0)
        needed = top_p * kept.sum(dim=-1)  # the mass the kept set must reach
        cut = torch.where(top_p < 1.0, _top_p_cut_from_candidates(candidates, cut, row_max, needed), cut)
    return cut, columns.search_top_p, columns.any_search


def _top_p_cut_from_candidates(candidates, cut, row_max, needed) -> torch.Tensor:
    """The top-p cut of rows whose kept set lies within their top-k candidates (sorted, largest
    first): the first candidate at which the running mass reaches what is needed."""
    mass = torch.where(candidates >= cut[:, None], (candidates - row_max[:, None]).exp(), 0.0).cumsum(dim=-1)
    reached = mass >= needed[:, None]
    first = reached.to(torch.int8).argmax(dim=-1)
    # Not reached within the candidates (rounding, or ties past them): everything kept stays.
    return torch.where(reached.any(dim=-1), candidates.gather(1, first[:, None])[:, 0], cut)


_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool}
_ALIGNMENT = 16  # bytes: Triton specializes kernels on pointer alignment


def upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host arrays (int64, float32 or bool) as device tensors of the same shapes. On CUDA they share
    one pinned buffer and one asynchronous copy: the host neither waits for the GPU's queue (as a
    copy from pageable memory would) nor pays a copy per array. On CPU they are used as they are."""
    arrays = [np.ascontiguousarray(a, dtype=np.float32 if a.dtype.kind == "f" else bool if a.dtype.kind == "b"
                                   else np.int64) for a in arrays]
    if device.type != "cuda":
        return [torch.from_numpy(a) for a in arrays]
    sizes = [-(-a.nbytes // _ALIGNMENT) * _ALIGNMENT for a in arrays]
    host = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=True)
    host_bytes = host.numpy()
    start = 0
    for a, size in zip(arrays, sizes):
        host_bytes[start : start + a.nbytes] = a.reshape(-1).view(np.uint8)
        start += size
    on_device = host.to(device, non_blocking=True)
    # One view of the buffer per dtype, then a slice per array: every view is a dispatch on the host.
    typed = {dtype: on_device.view(dtype) for dtype in {_TORCH_DTYPES[a.dtype] for a in arrays}}
    tensors, start = [], 0
    for a, size in zip(arrays, sizes):
        first = start // a.itemsize
        tensor = typed[_TORCH_DTYPES[a.dtype]][first : first + a.size]
        tensors.append(tensor if a.ndim == 1 else tensor.view(a.shape))
        start += size
    return tensors
