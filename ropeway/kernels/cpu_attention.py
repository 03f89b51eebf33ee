"""Paged attention on CPU, fast: the same contract as paged_attention_reference (attention.py).

The reference gives every sequence an explicit [queries, keys] mask, which sends torch's SDPA
down its slowest (math) path. Here:
- decodes at short contexts run batched, with no Python per sequence: their keys are gathered
  into [B, Hkv, L, D] per length bucket (powers of two of the block count, so padding at most
  doubles the work), one SDPA call per bucket with a key-length mask;
- a decode at a long context (LONG_DECODE_KEYS) reads its keys in place where they lie in
  runs of cache slots, in pieces merged by log-sum-exp (cpu_long_decode.py);
- a prefill chunk with no cached prefix is plain causal SDPA, no mask;
- a chunk after a cached prefix attends to the prefix (no mask) and to itself (causal) in two
  calls of torch's CPU flash kernel, merged by their log-sum-exps: no [chunk, prefix] mask.
GQA needs no repeated keys for the unmasked parts: a KV head's query group is stacked into
its query rows. slot_bias (landmark caches) is added as a float mask where it applies. An fp8
cache's keys and values are dequantized as they are gathered.

Everything that depends only on the batch's layout (which cache slots each sequence reads,
the masks) is worked out once per step in a CpuAttentionPlan; each layer then only gathers
its keys and values and attends.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cpu_long_decode import LONG_DECODE_KEYS, KeyCall, LongDecode, long_decode_attention, plan_long_decode
from .cpu_threads import one_thread
from .fp8_kv import read_vectors

# What F.scaled_dot_product_attention runs on CPU, called directly because it also returns
# the log-sum-exp of each query's scores, which merging two partial attentions needs.
_flash_attention_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


@dataclass
class DecodeBucket:
    rows: torch.Tensor              # [B] each sequence's query row in q
    slots: torch.Tensor             # [B, L] cache slots of its keys; padding repeats a real slot
    mask: torch.Tensor | None       # [B, 1, 1, L] fp32: 0 or slot bias on keys, -inf on padding


@dataclass
class Chunk:
    start: int                      # first query row in q
    num_queries: int
    prefix: int                     # cached tokens before the chunk
    slots: torch.Tensor             # [prefix + num_queries] cache slots
    bias: torch.Tensor | None       # [prefix + num_queries] fp32 slot bias
    prefix_masked: bool = False     # every key of the prefix masked
    masked_rows: torch.Tensor | None = None  # [num_queries] bool: queries whose own keys are all masked


@dataclass
class CpuAttentionPlan:
    decode_buckets: list[DecodeBucket]
    chunks: list[Chunk]
    long_decodes: list[LongDecode] = field(default_factory=list)


def plan_cpu_attention(block_tables, seq_lens, query_start_loc, block_size, slot_bias=None) -> CpuAttentionPlan:
    """The layer-independent part of paged_attention_cpu for one batch."""
    starts = query_start_loc.long()
    num_queries = starts[1:] - starts[:-1]
    seq_lens = seq_lens.long()
    decodes = (num_queries == 1).nonzero().flatten()
    long_decodes = []
    if decodes.numel() and int(seq_lens[decodes].max()) >= LONG_DECODE_KEYS:
        long = seq_lens[decodes] >= LONG_DECODE_KEYS
        for s, seq_len in zip(decodes[long].tolist(), seq_lens[decodes[long]].tolist()):
            long_decodes.append(plan_long_decode(int(starts[s]), block_tables[s], seq_len, block_size, slot_bias))
        decodes = decodes[~long]
    buckets = []
    if decodes.numel():
        lens = seq_lens[decodes]
        num_blocks = -(-lens // block_size)
        bucket_of = torch.ceil(torch.log2(num_blocks.to(torch.float64))).to(torch.int64)
        for bucket in bucket_of.unique().tolist():
            members = decodes[bucket_of == bucket]
            member_lens = seq_lens[members]
            length = int(member_lens.max())
            positions = torch.arange(length)
            valid = positions[None, :] < member_lens[:, None]
            # Past a sequence's end read its first key instead (any slot may hold NaN, which a
            # -inf score would not keep out of the weighted sum); the mask drops it.
            positions = torch.where(valid, positions, 0)  # [B, L]
            blocks = block_tables[members].long().gather(1, positions // block_size)
            slots = blocks * block_size + positions % block_size
            mask = None
            if slot_bias is not None or not bool(valid.all()):
                bias = 0.0 if slot_bias is None else slot_bias.view(-1)[slots]
                mask = torch.where(valid, bias, float("-inf"))[:, None, None, :]
            buckets.append(DecodeBucket(starts[members], slots, mask))
    chunks = []
    for s in (num_queries > 1).nonzero().flatten().tolist():
        seq_len, n = int(seq_lens[s]), int(num_queries[s])
        positions = torch.arange(seq_len)
        slots = block_tables[s].long()[positions // block_size] * block_size + positions % block_size
        bias = None if slot_bias is None else slot_bias.view(-1)[slots]
        chunk = Chunk(int(starts[s]), n, seq_len - n, slots, bias)
        if bias is not None:
            hidden = bias.isneginf()
            chunk.prefix_masked = bool(hidden[: chunk.prefix].all())
            # A query sees its own keys up to itself: all masked while its prefix of them is.
            rows = hidden[chunk.prefix :].cumprod(0).bool()
            chunk.masked_rows = rows if bool(rows.any()) else None
        chunks.append(chunk)
    return CpuAttentionPlan(buckets, chunks, long_decodes)


def paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, slot_bias=None,
                        plan: CpuAttentionPlan | None = None, k_scale=None, v_scale=None) -> torch.Tensor:
    """As paged_attention_reference (attention.py): q [T, Hq, D] -> [T, Hq, D]. plan: this batch's
    plan_cpu_attention, made once for all layers (None: made here)."""
    if plan is None:
        plan = plan_cpu_attention(block_tables, seq_lens, query_start_loc, k_cache.shape[1], slot_bias)
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]

    kv_rows = _kv_rows(k_cache, v_cache) if k_scale is None else None
    kv_blocks = None if kv_rows is None else kv_rows.view(-1, block_size * kv_rows.shape[1])

    def gather(slots):
        """Keys and values of cache slots [...] -> [..., Hkv, D] each, in q's dtype."""
        shape = (*slots.shape, *k_cache.shape[2:])
        flat = slots.reshape(-1)
        if kv_rows is not None:
            # Keys and values in one index_select: one pass over the thread pool, not two.
            both = kv_rows.index_select(0, torch.cat([flat, flat + kv_rows.shape[0] // 2]))
            return both[: flat.numel()].view(shape).to(q.dtype), both[flat.numel() :].view(shape).to(q.dtype)
        if k_scale is None:
            # index_select, not advanced indexing: on CPU that wakes the thread pool even for a
            # few rows, which on a busy 2-core machine costs milliseconds per call.
            return tuple(cache.view(-1, *cache.shape[2:]).index_select(0, flat).view(shape).to(q.dtype)
                         for cache in (k_cache, v_cache))
        index = (slots // block_size, slots % block_size)
        return read_vectors(k_cache, k_scale, index, q.dtype), read_vectors(v_cache, v_scale, index, q.dtype)

    def read(call: KeyCall):
        """A long decode call's keys and values, [keys, Hkv, D] each, in logical order: views of
        the cache where they lie in one run of slots, else gathered."""
        keys = call.pieces * call.length
        if call.start is None:
            if call.blocks is None or kv_blocks is None:
                return gather(call.slots)
            both = kv_blocks.index_select(0, torch.cat([call.blocks, call.blocks + kv_blocks.shape[0] // 2]))
            return tuple(x.view(keys, *k_cache.shape[2:]).to(q.dtype) for x in both.chunk(2))
        if k_scale is not None or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            return gather(torch.arange(call.start, call.start + keys))
        return tuple(cache.view(-1, *cache.shape[2:])[call.start : call.start + keys].to(q.dtype)
                     for cache in (k_cache, v_cache))

    num_q_heads, head_dim = q.shape[1], q.shape[2]
    # Small attentions stay on this thread (cpu_threads.py): the gather too, which index_select
    # splits over the pool from a few hundred rows.
    for bucket in plan.decode_buckets:
        with one_thread(bucket.slots.numel() * num_q_heads * head_dim):
            _decode(q, gather, bucket, scale, out)
    for decode in plan.long_decodes:
        with one_thread(decode.num_keys * num_q_heads * head_dim):
            long_decode_attention(q, read, decode, scale, out)
    for chunk in plan.chunks:
        with one_thread(chunk.num_queries * chunk.slots.numel() * num_q_heads * head_dim):
            _chunk(q, gather, chunk, scale, out)
    return out


def _kv_rows(k_cache, v_cache) -> torch.Tensor | None:
    """[2 * slots, Hkv * D]: the key rows then the value rows, when the value cache directly
    follows the key cache in memory (a layer's slice of the KV pool: kv_cache[layer]); else None."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
            and k_cache.untyped_storage().data_ptr() == v_cache.untyped_storage().data_ptr()
            and v_cache.data_ptr() == k_cache.data_ptr() + k_cache.nbytes):
        return None
    row = k_cache.shape[2] * k_cache.shape[3]
    return k_cache.as_strided((2 * k_cache.numel() // row, row), (row, 1))


def _decode(q, gather, bucket: DecodeBucket, scale, out):
    k, v = (x.transpose(1, 2) for x in gather(bucket.slots))  # [B, Hkv, L, D]
    batch, num_kv_heads, _, head_dim = k.shape
    # Query head h reads KV head h // group: each KV head's group becomes its query rows.
    queries = q.index_select(0, bucket.rows).view(batch, num_kv_heads, -1, head_dim)
    mask = None if bucket.mask is None else bucket.mask.to(q.dtype)
    o = F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, scale=scale)
    out.index_copy_(0, bucket.rows, o.reshape(batch, -1, head_dim))


def _chunk(q, gather, chunk: Chunk, scale, out):
    k, v = (x.transpose(0, 1)[None] for x in gather(chunk.slots))  # [1, Hkv, L, D]
    num_kv_heads, head_dim = k.shape[1], k.shape[3]
    num_q_heads = q.shape[1]
    group = num_q_heads // num_kv_heads
    start, n, prefix = chunk.start, chunk.num_queries, chunk.prefix
    bias = None if chunk.bias is None else chunk.bias.to(q.dtype)
    queries = q[start : start + n].transpose(0, 1)[None]  # [1, Hq, n, D]
    if prefix == 0 and bias is None:
        o = F.scaled_dot_product_attention(queries, k, v, is_causal=True, scale=scale, enable_gqa=True)
        out[start : start + n] = o[0].transpose(0, 1)
        return
    # The chunk over its own keys, causal; GQA by repeating its (few) keys.
    own_k = k[:, :, prefix:].repeat_interleave(group, dim=1)
    own_v = v[:, :, prefix:].repeat_interleave(group, dim=1)
    if bias is None:
        o_own, lse_own = _flash_attention_cpu(queries, own_k, own_v, is_causal=True, scale=scale)
    else:
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = torch.where(causal, bias[prefix:][None, :], float("-inf"))
        o_own, lse_own = _flash_attention_cpu(queries, own_k, own_v, attn_mask=mask, scale=scale)
        if chunk.masked_rows is not None:
            # torch's CPU flash kernel gives a row whose keys are all masked log-sum-exp 0, not -inf.
            lse_own = lse_own.masked_fill(chunk.masked_rows, float("-inf"))
    if prefix == 0 or chunk.prefix_masked:
        out[start : start + n] = o_own[0].transpose(0, 1)
        return
    # Every query sees the whole prefix: each KV head's group stacked into its query rows.
    stacked = queries.reshape(1, num_kv_heads, group * n, head_dim)
    prefix_mask = None if bias is None else bias[:prefix][None, :]
    o_prefix, lse_prefix = _flash_attention_cpu(stacked, k[:, :, :prefix], v[:, :, :prefix],
                                                attn_mask=prefix_mask, scale=scale)
    o_prefix = o_prefix.reshape(1, num_q_heads, n, head_dim)
    lse_prefix = lse_prefix.reshape(1, num_q_heads, n)
    # softmax over the union of keys = the two partial results weighed by their exp(lse).
    weight_prefix = torch.sigmoid(lse_prefix - lse_own)[..., None]
    merged = torch.lerp(o_own.float(), o_prefix.float(), weight_prefix)
    out[start : start + n] = merged[0].transpose(0, 1).to(q.dtype)
