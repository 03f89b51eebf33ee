"""Triton top-p cut search and seeded draw (see sampling.py for what they compute), and the
terms of the top logprobs (logprob_terms_triton).

Each row is split into chunks, so a batch-1 row of 128k logits keeps the whole GPU busy
instead of one SM (the old kernel's 2.6 ms at batch 1):
- The top-p search narrows the interval [low, high) of ordered fp32 keys that holds the cut
  (mass at or above low reaches what is needed, at or above high does not) 16 ways per pass:
  each program sums its chunk's kept mass at or above 16 thresholds spread over the
  interval, and the next pass's programs each add up the row's partial sums and pick the
  sub-interval (the same way in every program; the one on the row's chunk 0 records it). Eight passes
  shrink 2^32 keys to one. The draw's programs make the last pick.
- The draw: each program runs the exponential race over its chunk and writes its best key
  and token; the row's winner is the first chunk holding the largest key.
- Most rows need no search. The race is run over the unfiltered kept set first: where its
  winner lies inside the top-p set, it is also the winner of the race over that set (the same
  uniforms, a subset holding the winner). One pass sums the mass strictly above the winner,
  which decides it (sampling.py: a token stays while the mass above it is below top_p of the
  kept mass). A row's first winner fails with probability at most 1 - top_p, so the search
  passes and the second race run for a few rows. A row whose mass above falls within
  SETTLE_MARGIN of the bound takes the search too, so rounding in the sums never decides a
  token the search would not.
- The unsettled rows are compacted on the device (a stable sort puts them first; their count
  stays a device tensor, so nothing syncs and CUDA graphs can hold it). The search passes and
  the second race launch a fixed grid of at most PROGRAMS programs that share out the work
  items (unsettled row, chunk of MIN_CHUNK tokens) up to that count: their time follows the
  unsettled rows, where a (row, chunk) grid kept every settled row's programs and left a few
  rows' large chunks to walk alone (as long as a full pass at batch 256). Bounds and partial
  sums are indexed by the row itself, so any program can take any item.
- The race hashes in uint32 (the reference's int64 products keep only their low 32 bits, which
  wrapping 32-bit multiplies give exactly); its keys stay fp64 (sampling.py says why), but a
  tile that can't hold the winner (a bound from its largest value and largest hash) skips
  their per-token logs (_race_chunk).
"""

import torch
import triton
import triton.language as tl

from ropeway.request_bounds import MAX_TOP_LOGPROBS

# 16 thresholds per pass: 8 passes pin one of 2^32 keys.
BINS = 16
SEARCH_PASSES = 8
# Programs per launch to aim for (several per SM of an H200), and the smallest chunk: a batch-1
# row of 128k logits gets 126 programs, a batch-64 row 16. The search always takes chunks of
# MIN_CHUNK: 126 per row at 128k, so a program narrows its row's interval from 126 x BINS
# partial sums.
PROGRAMS = 1024
MIN_CHUNK = 1024
# A first winner settles its row only with the mass above it below top_p - SETTLE_MARGIN of the
# kept mass: fp32 sums of 128k terms in two orders differ by ~1e-5 of the total at worst.
SETTLE_MARGIN = 1e-4


@triton.jit
def _ordered_key(x):
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _mix32(x):
    """sampling.py's mix32 on uint32: the multiplies wrap modulo 2^32, the same low 32 bits the
    reference keeps of its int64 products, at a fraction of 64-bit arithmetic's cost."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _thresholds(low, high, BINS: tl.constexpr):
    return low + ((high - low) * tl.arange(0, BINS).to(tl.int64)) // BINS


@triton.jit
def _narrowed(bounds_ptr, partial_ptr, row, num_rows, previous, needed, num_chunks,
              BINS: tl.constexpr, CHUNKS: tl.constexpr):
    """The row's interval after the pick from pass `previous`'s partial masses."""
    low = tl.load(bounds_ptr + (previous * num_rows + row) * 2)
    high = tl.load(bounds_ptr + (previous * num_rows + row) * 2 + 1)
    chunks = tl.arange(0, CHUNKS)
    bins = tl.arange(0, BINS)
    in_row = chunks[:, None] < num_chunks
    partial = partial_ptr + (previous * num_rows + row) * num_chunks * BINS
    mass = tl.sum(tl.load(partial + chunks[:, None] * BINS + bins[None, :], mask=in_row, other=0.0), 0)
    thresholds = _thresholds(low, high, BINS)
    # Masses fall as thresholds rise: the last threshold that still reaches (0 if none, by rounding).
    pick = tl.max(tl.where(mass >= needed, bins, 0), 0)
    new_low = tl.sum(tl.where(bins == pick, thresholds, 0), 0)
    new_high = tl.where(pick == BINS - 1, high, tl.sum(tl.where(bins == pick + 1, thresholds, 0), 0))
    return new_low, new_high


@triton.jit
def _log_log(bits):
    """ln(-ln u) of the uniform u hashed to `bits` (fp64): a token's key is its value minus this.
    Decreasing in bits (u rises with them), so the most bits give the largest key offset."""
    uniform = (bits.to(tl.float64) + 0.5) * (1.0 / 4294967296.0)  # a power of two: exactly the reference's division
    return tl.log(-tl.log(uniform))


@triton.jit
def _race_chunk(base, first, second, cut, row_max, start, end, BLOCK: tl.constexpr):
    """The race over tokens [start, end) of a row: its largest key (fp64) and the first token holding
    it, or a smaller key where no token of the chunk can win the row's race.

    Most tiles can't hold the winner: no kept token's key exceeds the tile's largest kept value
    minus _log_log of its largest kept hash, and when that bound is below the chunk's best so far
    (a tie goes to the earlier token anyway) or below the lowest key the row's largest value can
    get (the winner's key is at least that), the tile skips the per-token fp64 logs, the race's
    main cost. The bound uses the same fp64 operations as the keys; the margin covers any rounding
    that could break their monotonicity (a few ulps of keys within ~23 of the row's largest value,
    where the margin is 1e-9 of that)."""
    offsets = tl.arange(0, BLOCK)
    best = tl.full((), float("-inf"), tl.float64)
    best_token = tl.full((), 0, tl.int32)
    row_max = row_max.to(tl.float64)
    margin = 1e-9 * (32.0 + tl.minimum(tl.abs(tl.where(row_max > float("-inf"), row_max, 0.0)), 1e30))
    floor = row_max - _log_log(tl.full((), 0, tl.uint32)) - margin  # -inf for a row with nothing kept
    for tile in range(start, end, BLOCK):
        tokens = tile + offsets
        x = tl.load(base + tokens, mask=tokens < end, other=float("-inf"))
        bits = _mix32(_mix32(tokens.to(tl.uint32) ^ first) ^ second)
        kept = x >= cut
        top = tl.max(tl.where(kept, x, float("-inf")), 0)
        bound = top.to(tl.float64) - _log_log(tl.max(tl.where(kept, bits, 0), 0))
        if bound + margin >= tl.maximum(best, floor):
            keys = tl.where(kept, x.to(tl.float64) - _log_log(bits), float("-inf"))
            tile_best = tl.max(keys, 0)
            tile_token = tile + tl.argmax(keys, 0)
            better = tile_best > best  # strictly: the earlier tile wins a tie
            best_token = tl.where(better, tile_token, best_token)
            best = tl.where(better, tile_best, best)
    return best, best_token


@triton.jit
def _work_items(count_ptr, num_chunks, programs):
    """This program's share [first, last) of the work items (unsettled row k, chunk c) = k * num_chunks + c:
    consecutive items, so a program mostly stays on one row and narrows its interval once."""
    total = tl.load(count_ptr) * num_chunks
    per = (total + programs - 1) // programs
    first = tl.program_id(0) * per
    return first, tl.minimum(first + per, total)


@triton.jit(do_not_specialize=["num_chunks"])
def _race_kernel(scaled_ptr, stride, cut_ptr, row_max_ptr, stream_keys_ptr, best_key_ptr, best_token_ptr, vocab,
                 chunk, num_chunks, BLOCK: tl.constexpr):
    """The unfiltered race: one program per (row, chunk)."""
    row = tl.program_id(0)
    chunk_index = tl.program_id(1)
    first = tl.load(stream_keys_ptr + row * 2).to(tl.uint32)
    second = tl.load(stream_keys_ptr + row * 2 + 1).to(tl.uint32)
    start = chunk_index * chunk
    best, best_token = _race_chunk(scaled_ptr + row.to(tl.int64) * stride, first, second, tl.load(cut_ptr + row),
                                   tl.load(row_max_ptr + row), start, tl.minimum(start + chunk, vocab), BLOCK)
    tl.store(best_key_ptr + row * num_chunks + chunk_index, best)
    tl.store(best_token_ptr + row * num_chunks + chunk_index, best_token.to(tl.int64))


# These integers vary with the batch, the pass and the unsettled rows: specializing on their values
# (1, multiples of 16) would compile new variants while a server ramps up (the stride, vocabulary
# and chunk stay specialized: they are fixed per model and let loads vectorize).
@triton.jit(do_not_specialize=["pass_index", "num_rows", "num_chunks", "programs"])
def _top_p_pass_kernel(scaled_ptr, stride, cut_ptr, row_max_ptr, needed_ptr, order_ptr, count_ptr, bounds_ptr,
                       partial_ptr, pass_index, num_rows, vocab, chunk, num_chunks, programs, BLOCK: tl.constexpr,
                       BINS: tl.constexpr, CHUNKS: tl.constexpr):
    """One search pass over the unsettled rows' work items; bounds and partial sums are indexed by
    the row itself, so the passes and the race agree whatever program took an item."""
    first_item, last_item = _work_items(count_ptr, num_chunks, programs)
    row = tl.full((), -1, tl.int64)
    low = tl.full((), 0, tl.int64)
    high = tl.full((), 0, tl.int64)
    row_max = tl.full((), 0.0, tl.float32)
    offsets = tl.arange(0, BLOCK)
    for item in range(first_item, last_item):
        item_row = tl.load(order_ptr + item // num_chunks)
        chunk_index = item % num_chunks
        if item_row != row:
            row = item_row
            row_max = tl.load(row_max_ptr + row)
            if pass_index == 0:
                low = _ordered_key(tl.load(cut_ptr + row))
                high = _ordered_key(row_max) + 1
            else:
                low, high = _narrowed(bounds_ptr, partial_ptr, row, num_rows, pass_index - 1,
                                      tl.load(needed_ptr + row), num_chunks, BINS, CHUNKS)
        if chunk_index == 0:
            tl.store(bounds_ptr + (pass_index * num_rows + row) * 2, low)
            tl.store(bounds_ptr + (pass_index * num_rows + row) * 2 + 1, high)
        thresholds = _thresholds(low, high, BINS)
        base = scaled_ptr + row * stride
        mass = tl.zeros((BLOCK, BINS), tl.float32)
        start = chunk_index * chunk
        for tile in range(start, tl.minimum(start + chunk, vocab), BLOCK):
            x = tl.load(base + tile + offsets, mask=tile + offsets < vocab, other=float("-inf"))
            above = _ordered_key(x)[:, None] >= thresholds[None, :]
            mass += tl.where(above, tl.exp(x - row_max)[:, None], 0.0)
        partial = partial_ptr + ((pass_index * num_rows + row) * num_chunks + chunk_index) * BINS
        tl.store(partial + tl.arange(0, BINS), tl.sum(mass, 0))


@triton.jit(do_not_specialize=["num_rows", "num_chunks", "programs"])
def _search_race_kernel(scaled_ptr, stride, cut_ptr, row_max_ptr, needed_ptr, order_ptr, count_ptr, stream_keys_ptr,
                        bounds_ptr, partial_ptr, best_key_ptr, best_token_ptr, num_rows, vocab, chunk, num_chunks,
                        programs, PASSES: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr, CHUNKS: tl.constexpr):
    """The race over the top-p set of the unsettled rows, on the search passes' work items."""
    first_item, last_item = _work_items(count_ptr, num_chunks, programs)
    row = tl.full((), -1, tl.int64)
    cut = tl.full((), 0.0, tl.float32)
    row_max = tl.full((), 0.0, tl.float32)
    first = tl.full((), 0, tl.uint32)
    second = tl.full((), 0, tl.uint32)
    for item in range(first_item, last_item):
        item_row = tl.load(order_ptr + item // num_chunks)
        chunk_index = item % num_chunks
        if item_row != row:
            row = item_row
            low, high = _narrowed(bounds_ptr, partial_ptr, row, num_rows, PASSES - 1, tl.load(needed_ptr + row),
                                  num_chunks, BINS, CHUNKS)
            bits = tl.where(low >= 0, low, low ^ 0x7FFFFFFF).to(tl.int32)
            cut = tl.maximum(tl.load(cut_ptr + row), bits.to(tl.float32, bitcast=True))
            row_max = tl.load(row_max_ptr + row)
            first = tl.load(stream_keys_ptr + row * 2).to(tl.uint32)
            second = tl.load(stream_keys_ptr + row * 2 + 1).to(tl.uint32)
        start = chunk_index * chunk
        best, best_token = _race_chunk(scaled_ptr + row * stride, first, second, cut, row_max, start,
                                       tl.minimum(start + chunk, vocab), BLOCK)
        tl.store(best_key_ptr + row * num_chunks + chunk_index, best)
        tl.store(best_token_ptr + row * num_chunks + chunk_index, best_token.to(tl.int64))


@triton.jit(do_not_specialize=["num_chunks"])
def _mass_above_kernel(scaled_ptr, stride, cut_ptr, row_max_ptr, pivot_ptr, kept_ptr, above_ptr, vocab, chunk,
                       num_chunks, BLOCK: tl.constexpr):
    """Per (row, chunk): the kept mass (x >= cut) and the part of it strictly above the pivot
    (the first race's winning value), both as exp(x - row max)."""
    row = tl.program_id(0)
    chunk_index = tl.program_id(1)
    cut = tl.load(cut_ptr + row)
    row_max = tl.load(row_max_ptr + row)
    pivot = tl.load(pivot_ptr + row)
    base = scaled_ptr + row.to(tl.int64) * stride
    offsets = tl.arange(0, BLOCK)
    kept = tl.zeros((BLOCK,), tl.float32)
    above = tl.zeros((BLOCK,), tl.float32)
    start = chunk_index * chunk
    for tile in range(start, tl.minimum(start + chunk, vocab), BLOCK):
        x = tl.load(base + tile + offsets, mask=tile + offsets < vocab, other=float("-inf"))
        mass = tl.where(x >= cut, tl.exp(x - row_max), 0.0)
        kept += mass
        above += tl.where(x > pivot, mass, 0.0)
    tl.store(kept_ptr + row * num_chunks + chunk_index, tl.sum(kept, 0))
    tl.store(above_ptr + row * num_chunks + chunk_index, tl.sum(above, 0))


# A logprob chunk's candidates pack (ordered key of the value, 2^16 - 1 - offset) into one int64: one
# max reduction finds the largest value and, among equal ones, the first token.
OFFSET_BITS = 16
LOGPROB_CHUNK = 1024
TAKEN = -(1 << 62)  # below every packed value (ordered keys are int32): an extracted or padding lane


@triton.jit(do_not_specialize=["chunk", "num_chunks", "k"])
def _logprob_kernel(logits_ptr, stride, max_ptr, sum_ptr, top_value_ptr, top_token_ptr, vocab, chunk, num_chunks, k,
                    BLOCK: tl.constexpr, OFFSET_BITS: tl.constexpr, TAKEN: tl.constexpr):
    """Per (row, chunk), in one read: the chunk's maximum, its sum of exp(x - that maximum), and
    its k largest values with their tokens, largest first."""
    row = tl.program_id(0)
    chunk_index = tl.program_id(1)
    offsets = tl.arange(0, BLOCK)
    start = chunk_index * chunk
    valid = (offsets < chunk) & (start + offsets < vocab)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride + start + offsets, mask=valid, other=float("-inf"))
    top = tl.max(x, 0)
    # A chunk of only -inf has a zero sum (exp(-inf - -inf) would be nan).
    total = tl.sum(tl.where(x == float("-inf"), 0.0, tl.exp(x - top)), 0)
    tl.store(max_ptr + row * num_chunks + chunk_index, top)
    tl.store(sum_ptr + row * num_chunks + chunk_index, total)
    low_mask: tl.constexpr = (1 << OFFSET_BITS) - 1
    packed = tl.where(valid, (_ordered_key(x) << OFFSET_BITS) | (low_mask - offsets).to(tl.int64), TAKEN)
    out = (row * num_chunks + chunk_index).to(tl.int64) * k
    for i in range(k):
        best = tl.max(packed, 0)
        packed = tl.where(packed == best, TAKEN, packed)
        key = best >> OFFSET_BITS  # back to the value: _ordered_key's inverse
        bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.int32)
        tl.store(top_value_ptr + out + i, bits.to(tl.float32, bitcast=True))
        tl.store(top_token_ptr + out + i, start + low_mask - (best & low_mask))


def default_chunk(rows: int, vocab: int) -> int:
    """Tokens of a row per program: about PROGRAMS programs in all, MIN_CHUNK at least."""
    return max(MIN_CHUNK, triton.next_power_of_2(triton.cdiv(vocab, max(1, PROGRAMS // rows))))


def warm_up_filtered_draw(vocab: int, max_rows: int, device: torch.device) -> None:
    """Compile every kernel variant a batch of 1..max_rows rows can launch (the first race and the
    mass above its winner: one per chunk size; the search's kernels and the logprobs': one, their
    chunks fixed per vocabulary) before serving, so a ramping batch never waits on Triton."""
    rows_per_chunk = {default_chunk(rows, vocab): rows for rows in range(1, max_rows + 1)}
    for rows in rows_per_chunk.values():
        scaled = torch.zeros(rows, vocab, dtype=torch.float32, device=device)
        cut = torch.full((rows,), float("-inf"), device=device)
        keys = torch.zeros(rows, 2, dtype=torch.int64, device=device)
        for search in (False, True):
            filtered_draw_triton(scaled, cut, torch.full((rows,), 0.9, device=device), torch.zeros(rows, device=device),
                                 keys, search)
        logprob_terms_triton(scaled, min(MAX_TOP_LOGPROBS, vocab))  # k is a runtime argument: one variant


def logprob_chunking(vocab: int, target: int = LOGPROB_CHUNK) -> tuple[int, int]:
    """(chunk, chunks) splitting a row into near-equal chunks of about `target` tokens: every
    chunk then holds more tokens than the top logprobs a request may ask for."""
    chunks = triton.cdiv(vocab, target)
    return triton.cdiv(vocab, chunks), chunks


def logprob_terms_triton(logits: torch.Tensor, k: int, target_chunk: int = LOGPROB_CHUNK
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[R] row maxima, [R] logs of sum(exp(x - max)) (logits.log_softmax(-1) is (logits - max) - log_sum),
    and the [R, k] largest logits with their tokens, largest first, as torch.topk gives them (any
    order among equal values). One read of the logits, where log_softmax writes all [R, V] and
    torch.topk's radix select reads them several times more: each (row, chunk) program keeps its
    chunk's k largest, and torch.topk picks among R x chunks x k candidates."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunk, num_chunks = logprob_chunking(vocab, target_chunk)
    assert chunk < 1 << OFFSET_BITS
    # The last chunk is the shortest: at most num_chunks - 1 fewer tokens than the others.
    if k > chunk - num_chunks + 1:  # only a toy vocabulary: its top k straight from torch
        return (*logprob_terms_triton(logits, 0, target_chunk)[:2], *logits.topk(k, dim=-1))
    maxima = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    sums = torch.empty_like(maxima)
    # Room for k >= 1 candidates a chunk, so that k = 0 passes no null pointer to the launcher.
    width = num_chunks * max(k, 1)
    candidates = torch.empty(rows, width, dtype=torch.float32, device=logits.device)[:, : num_chunks * k]
    tokens = torch.empty(rows, width, dtype=torch.int64, device=logits.device)[:, : num_chunks * k]
    if rows:
        _logprob_kernel[(rows, num_chunks)](logits, logits.stride(0), maxima, sums, candidates, tokens, vocab, chunk,
                                            num_chunks, k, BLOCK=triton.next_power_of_2(chunk),
                                            OFFSET_BITS=OFFSET_BITS, TAKEN=TAKEN)
    row_max = maxima.amax(dim=1)
    # Chunks of only -inf have a zero sum: exp(-inf) scales them to nothing.
    log_sum = (sums * (maxima - row_max[:, None]).exp()).sum(dim=1).log()
    top_values, picked = candidates.topk(k, dim=-1)
    return row_max, log_sum, top_values, tokens.gather(1, picked)


def _clamped(chunk: int, block: int, vocab: int) -> int:
    return max(block, min(chunk, triton.next_power_of_2(vocab)))


def filtered_draw_triton(scaled, cut, top_p, row_max, stream_keys, search: bool, chunk: int | None = None,
                         block: int = 256, search_chunk: int = MIN_CHUNK, programs: int = PROGRAMS) -> torch.Tensor:
    """As filtered_draw_reference; rows with top_p >= 1 skip the search. The first race and the
    mass above its winner take a `chunk` of a row per program (default: about PROGRAMS programs in
    all, chunks of 1k tokens at least). The search passes and the second race run on the unsettled
    rows alone: their (row, `search_chunk`) work items are shared out among at most `programs`
    programs, a fixed grid (CUDA graphs), each reading the unsettled rows' count from the device.
    The search walks its chunks in `block`-wide tiles (a [block, BINS] accumulator), the races in
    tiles four times as wide."""
    rows, vocab = scaled.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=scaled.device)
    scaled = scaled.contiguous()
    stream_keys = stream_keys.contiguous()
    if chunk is None:
        chunk = default_chunk(rows, vocab)
    block = min(block, triton.next_power_of_2(vocab))  # all powers of two
    chunk = _clamped(chunk, block, vocab)
    num_chunks = triton.cdiv(vocab, chunk)
    best_key = torch.empty(rows, num_chunks, dtype=torch.float64, device=scaled.device)
    best_token = torch.empty(rows, num_chunks, dtype=torch.int64, device=scaled.device)
    _race_kernel[(rows, num_chunks)](scaled, scaled.stride(0), cut, row_max, stream_keys, best_key, best_token, vocab,
                                     chunk, num_chunks, BLOCK=min(chunk, 4 * block))
    # torch.argmax gives the first of equal maxima: the earliest chunk, so the lowest token.
    first = best_token.gather(1, best_key.argmax(dim=1, keepdim=True))[:, 0]
    if not search:
        return first
    kept = torch.empty(rows, num_chunks, dtype=torch.float32, device=scaled.device)
    above = torch.empty_like(kept)
    pivot = scaled.gather(1, first[:, None])[:, 0]
    _mass_above_kernel[(rows, num_chunks)](scaled, scaled.stride(0), cut, row_max, pivot, kept, above, vocab, chunk,
                                           num_chunks, BLOCK=block)
    kept = kept.sum(dim=1)
    settled = (top_p >= 1.0) | (above.sum(dim=1) < (top_p - SETTLE_MARGIN) * kept)
    needed = top_p * kept  # the mass the top-p set must reach, the same number in every program
    # The unsettled rows first (a stable sort of 0s and 1s), and their count: both stay on the device.
    order = torch.sort(settled.to(torch.uint8), stable=True).indices
    count = (~settled).sum(dtype=torch.int32)

    search_chunk = _clamped(search_chunk, block, vocab)
    search_chunks = triton.cdiv(vocab, search_chunk)
    grid = (max(1, min(programs, rows * search_chunks)),)
    shape = {"BINS": BINS, "CHUNKS": triton.next_power_of_2(search_chunks)}
    bounds = torch.empty(SEARCH_PASSES, rows, 2, dtype=torch.int64, device=scaled.device)
    partial = torch.empty(SEARCH_PASSES, rows, search_chunks, BINS, dtype=torch.float32, device=scaled.device)
    for pass_index in range(SEARCH_PASSES):
        _top_p_pass_kernel[grid](scaled, scaled.stride(0), cut, row_max, needed, order, count, bounds, partial,
                                 pass_index, rows, vocab, search_chunk, search_chunks, grid[0], BLOCK=block, **shape)
    # Settled rows' entries stay unwritten: the first race's winner stands there.
    best_key = torch.empty(rows, search_chunks, dtype=torch.float64, device=scaled.device)
    best_token = torch.empty(rows, search_chunks, dtype=torch.int64, device=scaled.device)
    _search_race_kernel[grid](scaled, scaled.stride(0), cut, row_max, needed, order, count, stream_keys, bounds,
                              partial, best_key, best_token, rows, vocab, search_chunk, search_chunks, grid[0],
                              PASSES=SEARCH_PASSES, BLOCK=min(search_chunk, 4 * block), **shape)
    second = best_token.gather(1, best_key.argmax(dim=1, keepdim=True))[:, 0]
    return torch.where(settled, first, second)
