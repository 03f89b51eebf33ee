"""Triton paged attention for a flat batch mixing prefill chunks and decodes, in one launch.

Same semantics as attention.paged_attention_reference. The grid is
(query tile, KV head, KV split):
- A query tile holds up to BLOCK_Q queries of one sequence times the GROUP query heads that
  share a KV head, packed as BLOCK_M rows, so every KV tile is read once per KV head for
  all of them (GQA packing; a decode is one query, so its rows are its group's heads).
- Tiles are numbered without a device-side prefix sum: sequence s owns tiles from
  query_start_loc[s] // BLOCK_Q + s, an upper bound on the tiles before it, and a program
  finds its sequence by binary search. Tiles past a sequence's queries exit at once.
- With NUM_SPLITS > 1 (flash-decoding) each program covers one slice of the keys and
  writes a partial output and its log-sum-exp; a second kernel merges the slices. This is
  what lets a few long decodes fill the GPU.
- Keys are gathered per token through the block table, so the KV tile (BLOCK_N) is
  independent of the cache's page size.
- HAS_BIAS (a landmark cache) adds a per-slot logit bias; without it the kernel compiles
  exactly as before.
- HAS_SCALES (an fp8 cache, fp8_kv.py) reads fp8 keys and values, widens them in registers,
  and applies each key's scale to its column of scores and each value's scale to its column of
  probabilities: a multiply per score, not per key element. FP8_WIDEN picks the dots' type:
  "q", the queries' dtype (fp32 queries always); "f16", fp16 (16-bit queries): every e4m3
  value is exact in fp16 and sm_89+ widens two per instruction, where bf16 costs three; the
  queries, pre-multiplied by the softmax scale so they stay far from fp16's limit, carry 3
  more mantissa bits than bf16; the probabilities times each value's scale over the tile's
  largest value scale stay within [0, 1] (full fp16 precision), the largest scale multiplied
  back onto the tile's product. "f16_ptx" widens both by inline PTX and "f16_ptx_v" only the
  values (triton_fp8.e4m3_to_f16 says why); GPU only (the interpreter takes "f16").
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .cudnn_attention import attend_long_chunk, cudnn_prefill_usable
from .triton_fp8 import e4m3_to_f16
from .triton_launch import use_pdl, wait_for_previous_kernel

LOG2_E = 1.4426950408889634


FP8_WIDENINGS = ("q", "f16", "f16_ptx_v", "f16_ptx")
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class AttentionConfig:
    block_m: int
    block_n: int
    num_splits: int
    num_warps: int
    num_stages: int
    # An fp8 cache only: FP8_WIDENINGS (module docstring). Values by PTX, keys by Triton's cast
    # measured fastest on the H200 (fp8_decode_sweep.py: 103 against 130 us a layer at 128k).
    fp8_widen: str = "f16_ptx_v"
    max_registers: int | None = None  # per thread (ptxas maxnreg): more programs resident per SM


@triton.jit
def _find_sequence(query_start_loc_ptr, first_query, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence whose first tile is <= tile (branch-free binary search)."""
    lo = tl.zeros((), dtype=tl.int32)
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = (tl.load(query_start_loc_ptr + mid) - first_query) // BLOCK_Q + mid
        lo = tl.where(first_tile <= tile, mid, lo)
        hi = tl.where(first_tile <= tile, hi, mid - 1)
    return lo


@triton.jit
def _attend_kv_tile(acc, m_i, l_i, q, kv_start, k_cache_ptr, v_cache_ptr, block_table_ptr,
                    kv_head, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
                    scale_log2e, row_limit, kv_stop, dims, dim_mask, slot_bias_ptr,
                    k_scale_ptr, v_scale_ptr, stride_ksb, stride_kso, stride_ksh, stride_vsb, stride_vso, stride_vsh,
                    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr,
                    FP8_WIDEN: tl.constexpr):
    """One online-softmax step over keys kv_start..kv_start+BLOCK_N. MASKED tiles also mask
    keys at or past kv_stop and keys a row may not see (key > row_limit). With an fp8 cache
    widened to fp16, q is already in fp16 and multiplied by scale_log2e."""
    keys = kv_start + tl.arange(0, BLOCK_N)
    if MASKED:
        key_valid = keys < kv_stop
        block = tl.load(block_table_ptr + keys // PAGE_SIZE, mask=key_valid, other=0).to(tl.int64)
        load_mask = key_valid[:, None] & dim_mask[None, :]
    else:
        block = tl.load(block_table_ptr + keys // PAGE_SIZE).to(tl.int64)
        load_mask = dim_mask[None, :]
    offset = (keys % PAGE_SIZE)[:, None]
    k = tl.load(k_cache_ptr + block[:, None] * stride_kb + offset * stride_ko
                + kv_head * stride_kh + dims[None, :], mask=load_mask, other=0.0)
    v = tl.load(v_cache_ptr + block[:, None] * stride_vb + offset * stride_vo
                + kv_head * stride_vh + dims[None, :], mask=load_mask, other=0.0)
    if HAS_SCALES and FP8_WIDEN != "q":
        scores = tl.dot(q, tl.trans(e4m3_to_f16(k, FP8_WIDEN == "f16_ptx")))
    else:
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * scale_log2e
    if HAS_SCALES:
        k_scale_ptrs = k_scale_ptr + block * stride_ksb + (keys % PAGE_SIZE) * stride_kso + kv_head * stride_ksh
        v_scale_ptrs = v_scale_ptr + block * stride_vsb + (keys % PAGE_SIZE) * stride_vso + kv_head * stride_vsh
        if MASKED:
            k_scales = tl.load(k_scale_ptrs, mask=key_valid, other=0.0)
            v_scales = tl.load(v_scale_ptrs, mask=key_valid, other=0.0)
        else:
            k_scales = tl.load(k_scale_ptrs)
            v_scales = tl.load(v_scale_ptrs)
        scores = scores * k_scales[None, :]
    if HAS_BIAS:
        slot = block * PAGE_SIZE + keys % PAGE_SIZE
        if MASKED:
            bias = tl.load(slot_bias_ptr + slot, mask=key_valid, other=0.0)
        else:
            bias = tl.load(slot_bias_ptr + slot)
        scores = scores + bias[None, :] * 1.4426950408889634  # the bias is in natural-log units
    if MASKED or HAS_BIAS:
        if MASKED:
            visible = (keys[None, :] <= row_limit[:, None]) & key_valid[None, :]
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row that sees no key of this slice yet (masked, or only empty landmark slots)
        # keeps m = -inf; shift by 0 instead so exp2 gives 0 rather than NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_shift = m_new
    p = tl.exp2(scores - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_SCALES and FP8_WIDEN != "q":
        v_top = tl.max(v_scales, 0)
        v_ref = tl.where(v_top > 0, v_top, 1.0)
        p = p * (v_scales * (1.0 / v_ref))[None, :]
        pv = tl.dot(p.to(tl.float16), e4m3_to_f16(v, FP8_WIDEN != "f16"))
        acc = acc * alpha[:, None] + pv * v_ref
    else:
        if HAS_SCALES:
            p = p * v_scales[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Triton compiles a variant per "divisible by 16" / "equal to 1" value of an integer
# argument: these change from step to step, and each new variant cost a 2.5 s compile in
# the middle of serving. (The block tables' row stride stays specialized: the runner pads
# rows to a multiple of 16 entries, models.forward_batch.block_table_width.)
@triton.jit(do_not_specialize=["first_seq", "num_seqs", "num_tiles"])
def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, partial_out_ptr, partial_lse_ptr,
        block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, slot_bias_ptr, k_scale_ptr, v_scale_ptr,
        scale_log2e, first_seq, num_seqs, num_tiles,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh, stride_bt,
        stride_ksb, stride_kso, stride_ksh, stride_vsb, stride_vso, stride_vsh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr, FP8_WIDEN: tl.constexpr, SEQ_OFFSET: tl.constexpr,
        PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    # Programs start in grid order, KV heads fastest, from the last tile: a causal prefill's
    # late tiles and a decode batch's last sequences (the runner puts the longest there)
    # have the most keys, so they start first and short ones fill the tail.
    tile = num_tiles - 1 - tl.program_id(1)
    kv_head = tl.program_id(0)
    num_kv_heads = tl.num_programs(0)
    split = tl.program_id(2)

    # With SEQ_OFFSET a launch covers sequences first_seq..first_seq+num_seqs-1 (a mixed
    # step's prefill chunks, after its decodes); tiles count from their first query. Without
    # it the kernel compiles as if both were 0 (measured: the offsets cost a 128k decode
    # 0.25 ms otherwise).
    if SEQ_OFFSET:
        query_start_loc_ptr += first_seq
        seq_lens_ptr += first_seq
        block_tables_ptr += first_seq.to(tl.int64) * stride_bt
        first_query = tl.load(query_start_loc_ptr)
    else:
        first_query = 0
    seq = _find_sequence(query_start_loc_ptr, first_query, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    num_queries = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_first = (tile - ((q_start - first_query) // BLOCK_Q + seq)) * BLOCK_Q
    if q_first >= num_queries:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - num_queries

    rows = tl.arange(0, BLOCK_M)
    q_index = q_first + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (q_index < num_queries)
    token = (q_start + q_index).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_mask = row_valid[:, None] & dim_mask[None, :]
    # Loaded before seq_len is known, so the two loads overlap (even where the slice turns
    # out empty: cheaper than serializing them).
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=q_mask, other=0.0)
    row_limit = context_len + q_index
    if HAS_SCALES and FP8_WIDEN != "q":
        q = (q.to(tl.float32) * scale_log2e).to(tl.float16)

    # Keys this tile needs, this program's slice of them, and the prefix of the slice that
    # every row sees (no masks there).
    q_last = tl.minimum(q_first + BLOCK_Q, num_queries) - 1
    kv_end = context_len + q_last + 1
    slice_len = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_lo = split * slice_len
    kv_hi = tl.minimum(kv_lo + slice_len, kv_end)
    seen_by_all = tl.minimum(kv_hi, context_len + q_first + 1)
    unmasked_hi = kv_lo + tl.maximum(seen_by_all - kv_lo, 0) // BLOCK_N * BLOCK_N
    if NUM_SPLITS > 1:
        partial_row = (token * (num_kv_heads * GROUP) + head) * NUM_SPLITS + split
        if kv_lo >= kv_end:
            # A slice past the keys (the split count is sized for the longest context a
            # graph serves): mark it empty for the merge and skip the partial, which would
            # weigh 0 anyway.
            tl.store(partial_lse_ptr + partial_row, float("-inf"), mask=row_valid)
            return

    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for kv_start in range(kv_lo, unmasked_hi, BLOCK_N):
        acc, m_i, l_i = _attend_kv_tile(
            acc, m_i, l_i, q, kv_start, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
            stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
            scale_log2e, row_limit, kv_hi, dims, dim_mask, slot_bias_ptr,
            k_scale_ptr, v_scale_ptr, stride_ksb, stride_kso, stride_ksh, stride_vsb, stride_vso, stride_vsh,
            PAGE_SIZE, BLOCK_N, False, DOT_PRECISION, HAS_BIAS, HAS_SCALES, FP8_WIDEN)
    for kv_start in range(unmasked_hi, kv_hi, BLOCK_N):
        acc, m_i, l_i = _attend_kv_tile(
            acc, m_i, l_i, q, kv_start, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
            stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
            scale_log2e, row_limit, kv_hi, dims, dim_mask, slot_bias_ptr,
            k_scale_ptr, v_scale_ptr, stride_ksb, stride_kso, stride_ksh, stride_vsb, stride_vso, stride_vsh,
            PAGE_SIZE, BLOCK_N, True, DOT_PRECISION, HAS_BIAS, HAS_SCALES, FP8_WIDEN)

    # l_i is 0 only for a slice with no key a row may see; its partial weighs 0 in the merge.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        tl.store(partial_out_ptr + partial_row[:, None] * HEAD_DIM + dims[None, :], out, mask=q_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(partial_lse_ptr + partial_row, lse, mask=row_valid)


@triton.jit
def _merge_splits_kernel(partial_out_ptr, partial_lse_ptr, out_ptr, stride_ot, stride_oh,
                         num_q_heads, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    row = (token * num_q_heads + head) * NUM_SPLITS + splits
    lse = tl.load(partial_lse_ptr + row, mask=splits < NUM_SPLITS, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    # Empty slices stored only their -inf log-sum-exp: their partial rows hold stale values.
    part = tl.load(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :],
                   mask=(lse > float("-inf"))[:, None] & dim_mask[None, :], other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_mask)


def _fp8_widening(requested: str, q: torch.Tensor) -> str:
    """The FP8_WIDEN this launch can take: fp32 queries keep their dtype; the interpreter
    cannot run inline PTX."""
    if requested not in FP8_WIDENINGS:
        raise ValueError(f"fp8_widen {requested!r} is not one of {FP8_WIDENINGS}")
    if q.dtype == torch.float32:
        return "q"
    if requested.startswith("f16_ptx") and (_INTERPRETED or not q.is_cuda):
        return "f16"
    return requested


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# fp8 decode (sm_90, Triton 3.6, GQA 4, head dim 128): 128-key tiles, widened by inline PTX
# and capped at 168 registers, so three programs of 4 warps stay resident per SM (75 KB of
# shared memory each) with a 34 KB tile in flight each, about the bytes in flight of bf16's
# three 64-key programs. The old path (bf16 dots, 219 registers, two 17 KB programs per SM)
# read at 1.45 TB/s against bf16's 3.69. A guess from ptxas's register and shared memory
# counts; benchmarks/fp8_decode_sweep.py times the alternatives on an H200.
FP8_DECODE_PROGRAMS_PER_SM = 3


def choose_config(q: torch.Tensor, num_kv_heads: int, num_seqs: int, max_query_len: int,
                  max_seq_len: int, fp8: bool = False) -> AttentionConfig:
    """Tiles and KV splits from host-side sizes only (no device sync); fp8: the cache is fp8.

    Decode-only batches use 16-row tiles (a GQA group padded to the smallest tensor-core
    tile) and, unless the tiles alone give every SM three programs, split the keys until the
    grid covers the GPU about six programs per SM (fp8: one wave of FP8_DECODE_PROGRAMS_PER_SM);
    batches with prefill chunks use 256x64 tiles and no splits, since their query tiles
    fill it. Tile shapes and pipeline depths were picked by the sweep in
    benchmarks/kernels.py on an H200 (see BENCHMARKS.md)."""
    group = q.shape[1] // num_kv_heads
    if max_query_len * group <= 16:
        tiles = num_seqs * num_kv_heads
        sms = _sm_count(q.device)
        block_m = max(16, triton.next_power_of_2(group))
        if fp8:
            resident = FP8_DECODE_PROGRAMS_PER_SM * sms
            num_splits = max(1, min(resident // tiles, max_seq_len // 2048)) if tiles < resident else 1
            return AttentionConfig(block_m=block_m, block_n=128, num_splits=num_splits, num_warps=4,
                                   num_stages=2, fp8_widen="f16_ptx_v", max_registers=168)
        num_splits = 1
        # Each slice keeps at least 1024 keys so the merge stays cheap next to the reads.
        # Tiles alone at 3+ per SM already keep the reads going: a split would only add
        # partial writes and a merge (64 decodes at 1k keys: 80 us split in 2, 67 us whole).
        while tiles < 3 * sms and tiles * num_splits < 6 * sms and num_splits * 2048 <= max_seq_len:
            num_splits *= 2
        return AttentionConfig(block_m=block_m, block_n=64,
                               num_splits=num_splits, num_warps=4, num_stages=2)
    return AttentionConfig(block_m=max(256, triton.next_power_of_2(group)), block_n=64,
                           num_splits=1, num_warps=8, num_stages=3)


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor, scale: float,
                           max_query_len: int | None = None, max_seq_len: int | None = None,
                           config: AttentionConfig | None = None,
                           slot_bias: torch.Tensor | None = None,
                           num_decode_seqs: int = 0,
                           long_chunks: tuple[tuple[int, int, int], ...] = (),
                           k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """See attention.paged_attention_reference. Without the hints, the grid is sized from
    shapes (all tokens in one sequence; the block table's full capacity). slot_bias must be
    contiguous [num_blocks, page_size] fp32.

    num_decode_seqs > 0 says the first sequences have one query each. In a step that also
    has prefill chunks, those decodes get a launch of their own with decode tiles: in the
    chunks' 64-query tiles each decode would fill one query row of 64 and still stream all
    its keys through the tile (at 250 decodes that was a third of a 2k-token step).

    long_chunks: (first query, queries, cached tokens before them) of the batch's last
    sequences, long prefill chunks: each goes to cuDNN (cudnn_attention.attend_long_chunk)
    where it can, else stays in a Triton launch.

    k_scale, v_scale [num_blocks, page_size, Hkv] fp32: the caches are fp8 (fp8_kv.py)."""
    num_tokens = q.shape[0]
    page_size = k_cache.shape[1]
    num_seqs = block_tables.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_query_len is None:
        max_query_len = num_tokens
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * page_size
    common = (q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, scale, max_seq_len, slot_bias,
              k_scale, v_scale)
    if config is not None:
        _attend(*common, first_seq=0, num_seqs=num_seqs, num_tokens=num_tokens,
                max_query_len=max_query_len, config=config)
        return out
    num_long = len(long_chunks) if long_chunks and slot_bias is None and cudnn_prefill_usable(q) else 0
    first_long = num_seqs - num_long
    # Sequences [start, first_long) in Triton: the decodes in a launch of their own, then
    # the other chunks.
    start = 0
    d = num_decode_seqs
    if 0 < d < num_seqs and max_query_len > 1:
        _attend(*common, first_seq=0, num_seqs=d, num_tokens=d, max_query_len=1, config=None)
        start = d
    if start < first_long:
        end_token = long_chunks[0][0] if num_long else num_tokens
        _attend(*common, first_seq=start, num_seqs=first_long - start, num_tokens=end_token - start,
                max_query_len=max_query_len, config=None)
    for row, (first_query, queries, context_len) in enumerate(long_chunks[:num_long], first_long):
        rows = slice(first_query, first_query + queries)
        if not attend_long_chunk(q[rows], k_cache, v_cache, block_tables[row], context_len, scale, out[rows],
                                 k_scale=k_scale, v_scale=v_scale):
            _attend(*common, first_seq=row, num_seqs=1, num_tokens=queries, max_query_len=queries, config=None)
    return out


def _attend(q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, scale: float,
            max_seq_len: int, slot_bias: torch.Tensor | None, k_scale: torch.Tensor | None,
            v_scale: torch.Tensor | None, first_seq: int, num_seqs: int,
            num_tokens: int, max_query_len: int, config: AttentionConfig | None) -> None:
    """One launch (two with split keys) over sequences first_seq..first_seq+num_seqs-1, whose
    queries are num_tokens consecutive tokens of q; writes their rows of out."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if config is None:
        config = choose_config(q, num_kv_heads, num_seqs, max_query_len, max_seq_len, fp8=k_scale is not None)
        if first_seq > 0 and config.num_splits > 1:
            # Short chunks after the decodes can get decode tiles, but split partials are
            # indexed from token 0: keep the keys in one slice there.
            config = dataclasses.replace(config, num_splits=1)
    group = num_q_heads // num_kv_heads
    block_q = config.block_m // group
    # Sequence s's tiles start at query_start // block_q + s, so its last tile is below
    # num_tokens // block_q + num_seqs; tiles past a sequence's queries exit at once. (A
    # tighter min() with num_seqs * cdiv(max_query_len, block_q) dropped the last sequences'
    # tiles whenever several of them shared the numbering's slack, e.g. rows 52-63 of a
    # 64-decode batch.)
    num_tiles = num_tokens // block_q + num_seqs
    if config.num_splits > 1:
        partial_out = torch.empty((num_tokens, num_q_heads, config.num_splits, head_dim),
                                  dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((num_tokens, num_q_heads, config.num_splits),
                                  dtype=torch.float32, device=q.device)
    else:
        partial_out = partial_lse = out
    block_d = triton.next_power_of_2(head_dim)
    pdl = use_pdl(q)
    has_scales = k_scale is not None
    # Without scales the kernel never reads them: any tensor stands in.
    k_scales, v_scales = (k_scale, v_scale) if has_scales else (q, q)
    assert num_tiles < 65536, "tiles are the grid's second axis"
    _paged_attention_kernel[(num_kv_heads, num_tiles, config.num_splits)](
        q, k_cache, v_cache, out, partial_out, partial_lse,
        block_tables, seq_lens, query_start_loc, q if slot_bias is None else slot_bias, k_scales, v_scales,
        scale * LOG2_E, first_seq, num_seqs, num_tiles,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        *k_scales.stride()[:3], *v_scales.stride()[:3],
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=config.block_m, BLOCK_Q=block_q, BLOCK_N=config.block_n,
        PAGE_SIZE=page_size, NUM_SPLITS=config.num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_BIAS=slot_bias is not None,
        HAS_SCALES=has_scales, FP8_WIDEN=_fp8_widening(config.fp8_widen, q) if has_scales else "q",
        SEQ_OFFSET=first_seq > 0, PDL=pdl, num_warps=config.num_warps, num_stages=config.num_stages,
        launch_pdl=pdl, **({} if config.max_registers is None else {"maxnreg": config.max_registers}),
    )
    if config.num_splits > 1:
        # Split launches are decode-only and start at sequence 0 and token 0.
        assert first_seq == 0
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            partial_out, partial_lse, out, out.stride(0), out.stride(1), num_q_heads,
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=config.num_splits,
            BLOCK_S=triton.next_power_of_2(config.num_splits), PDL=pdl, num_warps=4,
            launch_pdl=pdl)
