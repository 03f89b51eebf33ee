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
Which device ops run depends only on the batch's `SamplerShape` (`sample_on_device`), so a
decode step's sampling can replay a CUDA graph of them instead of launching each
(`sampler_graphs.py`, engine option `sampler_cuda_graphs`).
"""

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ropeway.kernels import filtered_draw, logprob_terms, mask_by_bitmask
from ropeway.request_bounds import MAX_TOP_LOGPROBS
from ropeway.sampling_params import SamplingParams

from .random_stream import stream_keys
from .sampling_state import PenaltyState

if TYPE_CHECKING:
    from .sampler_graphs import SamplerGraphs

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


@dataclass(frozen=True)
class SamplerShape:
    """What a step's sampling does on the device, decided on the host: which ops run depends on
    this alone, their values on the rows' parameter columns (so one CUDA graph per shape and
    batch size can stand for every batch of that shape, `sampler_graphs.py`)."""
    logprobs: int = -1         # top logprobs to return per row (-1: none)
    greedy: bool = False       # some row takes the argmax
    drawn: bool = False        # some row draws
    search: bool = False       # some drawn row has a top-p cut to search (no top-k)
    min_p: bool = False        # some drawn row has a min-p
    top_k: int = 0             # candidates the top-k filter takes: a power of two >= every row's k (0: none)
    top_k_top_p: bool = False  # some top-k row also has a top-p


# The draw's parameter columns, in the order SamplingBatch.plan lays them out, with the value a
# padding row takes (a neutral draw whose token is dropped).
_PADDING = {"stream_keys": 0, "temperature": 1.0, "search_top_p": 1.0, "no_cut": -np.inf, "is_greedy": True,
            "min_p": 0.0, "has_top_k": False, "kth_index": 0, "top_k_top_p": 1.0}


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

    def plan(self, vocab: int, padded_rows: int | None = None,
             for_graph: bool = False) -> tuple[SamplerShape, dict[str, np.ndarray]]:
        """The batch's shape and the draw's per-row columns (none if no row draws), in one pass per
        column; padded_rows: rows to fill up to with padding rows (a graph's batch size). Greedy
        rows of a mixed batch draw too, neutrally (temperature 1, no filter), and keep their argmax.
        for_graph: top-k takes a power of two of candidates, so that batches whose largest k differs
        a little share a graph, and logprobs the most a request may ask for; eager sampling takes
        exactly the largest k (twice the candidates doubled the top-k sampler's time at B=64 on the
        H200)."""
        rows, flags = self.rows, self.flags
        greedy = (flags & GREEDY) != 0
        any_greedy, any_drawn = bool(greedy.any()), not bool(greedy.all())
        logprobs = max(s.logprobs for s in self.settings) if self.any_flags & LOGPROBS else -1
        if for_graph and logprobs >= 0:
            # Every request's count shares one graph: the top 20 cost a top 5's time, and each row
            # keeps its own k (output_processor.py).
            logprobs = MAX_TOP_LOGPROBS
        if not any_drawn:
            return SamplerShape(logprobs=logprobs, greedy=True), {}
        floats = self.floats
        top_k = np.fromiter((s.top_k for s in self.settings), np.int64, len(rows))
        has_top_k = (top_k > 0) & (top_k < vocab) & ~greedy
        top_p = np.where(greedy, np.float32(1.0), floats[:, TOP_P_COLUMN])
        searched = (top_p < 1.0) & ~has_top_k
        min_p = np.where(greedy, np.float32(0.0), floats[:, MIN_P_COLUMN])
        columns = {
            "stream_keys": stream_keys(np.fromiter((r.seed for r in rows), np.uint64, len(rows)),
                                       np.fromiter((r.step for r in rows), np.uint64, len(rows))),
            "temperature": np.where(greedy, np.float32(1.0), floats[:, TEMPERATURE])[:, None],
            "search_top_p": np.where(searched, top_p, np.float32(1.0)),
            # The cut starts at -inf (keep all): uploaded with the rest instead of filled on the device.
            "no_cut": np.full(len(rows), -np.inf, np.float32),
        }
        if any_greedy:
            columns["is_greedy"] = greedy
        any_min_p = bool((min_p > 0).any())
        if any_min_p:
            columns["min_p"] = min_p
        candidates = 0
        if has_top_k.any():
            largest = int(top_k[has_top_k].max())
            candidates = min(vocab, 1 << (largest - 1).bit_length()) if for_graph else largest
            # Where each row's k-th value sits among the candidates (rows without a top-k read 0).
            columns["has_top_k"] = has_top_k
            columns["kth_index"] = np.where(has_top_k, top_k - 1, 0)[:, None]
            columns["top_k_top_p"] = np.where(has_top_k, top_p, np.float32(1.0))
        shape = SamplerShape(logprobs=logprobs, greedy=any_greedy, drawn=True, search=bool(searched.any()),
                             min_p=any_min_p, top_k=candidates,
                             top_k_top_p=bool(candidates and (has_top_k & (top_p < 1.0)).any()))
        if padded_rows is not None and padded_rows > len(rows):
            extra = padded_rows - len(rows)
            columns = {name: np.concatenate([a, np.full((extra, *a.shape[1:]), _PADDING[name], a.dtype)])
                       for name, a in columns.items()}
        return shape, columns

    def draw_columns(self, vocab: int, device: torch.device) -> "DrawColumns":
        """The draw's per-row parameters on the device (top-k as large as the vocabulary is none)."""
        return DrawColumns.uploaded(*self.plan(vocab), device)


@dataclass
class DrawColumns:
    """The draw's per-row parameters on the device, and what the host knows about them."""
    stream_keys: torch.Tensor         # [R, 2] int64
    temperature: torch.Tensor         # [R, 1] fp32 (1 for greedy rows)
    search_top_p: torch.Tensor        # [R] fp32: the top_p the cut search applies (1: none)
    no_cut: torch.Tensor              # [R] fp32, all -inf: the cut before any filter
    any_search: bool
    is_greedy: torch.Tensor | None = None     # [R] bool, when some rows draw and others not
    min_p: torch.Tensor | None = None         # [R] fp32, when a row has one
    has_top_k: torch.Tensor | None = None     # [R] bool, when a row has a top-k below the vocabulary
    kth_index: torch.Tensor | None = None     # [R, 1] int64: top_k - 1 (0: none)
    top_k_top_p: torch.Tensor | None = None   # [R] fp32: top_p of rows with a top-k (1: none)
    max_top_k: int = 0
    any_top_k_top_p: bool = False

    @classmethod
    def of(cls, shape: SamplerShape, tensors: dict[str, torch.Tensor]) -> "DrawColumns":
        return cls(**tensors, any_search=shape.search, max_top_k=shape.top_k, any_top_k_top_p=shape.top_k_top_p)

    @classmethod
    def uploaded(cls, shape: SamplerShape, columns: dict[str, np.ndarray], device: torch.device) -> "DrawColumns":
        """SamplingBatch.plan's host columns on the device, in one copy (`upload`)."""
        return cls.of(shape, dict(zip(columns, upload(list(columns.values()), device))))


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


# Flags whose rows change the logits before the draw (on the host's side of the step).
PROCESSING = PENALTY | LOGIT_BIAS | MIN_TOKENS


def sample(logits: torch.Tensor, rows: list[SamplingRow], penalties: PenaltyState | None = None,
           eos_token_ids: tuple[int, ...] = (), grammar: GrammarMask | None = None,
           graphs: "SamplerGraphs | None" = None) -> SampledTokens:
    """logits [R, V] fp32. Rows with a penalty need `penalties` (their `penalty_row` set); rows with
    structured outputs, `grammar`. graphs: where the logits are a decode graph's output and no row
    processes them, the device work replays a CUDA graph (sampler_graphs.py) instead of its launches."""
    if grammar is not None:
        logits = grammar.apply(logits)
    batch = SamplingBatch(rows)
    if batch.all_flags & PLAIN_ARGMAX:
        result = SampledTokens(logits.argmax(dim=-1))
        result.queue_host_copy()
        return result
    if graphs is not None and not batch.any_flags & PROCESSING:
        result = graphs.sample(logits, batch)
        if result is not None:
            return result
    shape, columns = batch.plan(logits.shape[1])
    processed = process_logits(logits, batch, penalties, eos_token_ids)
    draw_columns = DrawColumns.uploaded(shape, columns, logits.device) if shape.drawn else None
    result = sample_on_device(logits, processed, draw_columns, shape)
    result.queue_host_copy()
    return result


def sample_on_device(logits: torch.Tensor, processed: torch.Tensor, columns: DrawColumns | None,
                     shape: SamplerShape) -> SampledTokens:
    """The device work of sampling: its ops depend on `shape` alone (a CUDA graph can hold them).
    Logprobs come from `logits`, tokens from `processed` (logit_bias, min_tokens, penalties applied)."""
    if not shape.drawn:
        chosen = processed.argmax(dim=-1)
    else:
        chosen = draw(processed, columns)
        if shape.greedy:
            chosen = torch.where(columns.is_greedy, processed.argmax(dim=-1), chosen)
    result = SampledTokens(chosen)
    if shape.logprobs >= 0:
        # log_softmax is (logits - max) - log_sum, and monotonic: the top logits are the top logprobs,
        # and only the few asked for need the subtraction (no [R, V] log_softmax to write and reread).
        row_max, log_sum, top_logits, result.top_token_ids = logprob_terms(logits, shape.logprobs)
        result.top_logprobs = (top_logits - row_max[:, None]) - log_sum[:, None]
        result.logprobs = (logits.gather(1, chosen[:, None])[:, 0] - row_max) - log_sum
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


def draw(logits: torch.Tensor, columns: DrawColumns) -> torch.Tensor:
    """[R] tokens drawn from the filtered, temperature-scaled distributions of processed logits."""
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
    if device.type != "cuda":
        return [torch.from_numpy(a) for a in _typed(arrays)]
    host, layout = pack(arrays)
    return unpack(host.to(device, non_blocking=True), layout)


def _typed(arrays: list[np.ndarray]) -> list[np.ndarray]:
    return [np.ascontiguousarray(a, dtype=np.float32 if a.dtype.kind == "f" else bool if a.dtype.kind == "b"
                                 else np.int64) for a in arrays]


def pack(arrays: list[np.ndarray], pin: bool = True) -> tuple[torch.Tensor, list[tuple[np.dtype, tuple, int]]]:
    """The arrays (as int64, float32 or bool) in one uint8 host buffer, pinned if `pin`, each at a
    16-byte aligned offset; and the layout (dtype, shape, offset) that `unpack` reads back."""
    arrays = _typed(arrays)
    sizes = [-(-a.nbytes // _ALIGNMENT) * _ALIGNMENT for a in arrays]
    host = torch.empty(sum(sizes), dtype=torch.uint8, pin_memory=pin)
    host_bytes = host.numpy()
    layout, start = [], 0
    for a, size in zip(arrays, sizes):
        host_bytes[start : start + a.nbytes] = a.reshape(-1).view(np.uint8)
        layout.append((a.dtype, a.shape, start))
        start += size
    return host, layout


def unpack(buffer: torch.Tensor, layout: list[tuple[np.dtype, tuple, int]]) -> list[torch.Tensor]:
    """Views of a packed buffer (on any device): one view per dtype, then a slice per array, since
    every view is a dispatch on the host."""
    typed = {dtype: buffer.view(_TORCH_DTYPES[dtype]) for dtype in {dtype for dtype, _, _ in layout}}
    tensors = []
    for dtype, shape, start in layout:
        first = start // dtype.itemsize
        tensor = typed[dtype][first : first + int(np.prod(shape))]
        tensors.append(tensor if len(shape) == 1 else tensor.view(shape))
    return tensors
