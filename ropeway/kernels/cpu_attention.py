"""Paged attention on CPU, fast: the same contract as paged_attention_reference (attention.py).

The reference gives every sequence an explicit [queries, keys] mask, which sends torch's SDPA
down its slowest (math) path. Here:
- decodes at short contexts run batched, with no Python per sequence: their keys are gathered
  into [B, Hkv, L, D] per length bucket (powers of two of the block count, so padding at most
  doubles the work), one SDPA call per bucket with a key-length mask;
- a decode at a long context reads its keys where they lie. One query sees every key of its
  sequence, in any order, so its keys are the runs of consecutive cache slots its blocks
  cover, whatever their order in the block table. A long run is read as a view of the cache
  (no copy: gathering it cost more than attending to it), cut into equal pieces that are the
  batch of one call (flash decoding: the pool's threads share one sequence); short runs are
  gathered into one more piece; the pieces merge by their log-sum-exps;
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
class KeyRun:
    start: int                      # first cache slot
    pieces: int                     # the run is pieces x length slots, one call's batch
    length: int
    mask: torch.Tensor | None       # [pieces, 1, 1, length] fp32 slot bias
    masked: torch.Tensor | None     # [pieces, 1, 1] bool: pieces whose every key is masked


@dataclass
class LongDecode:
    row: int                        # the sequence's query row in q
    runs: list[KeyRun]              # its keys that lie in long runs of consecutive slots
    rest: torch.Tensor | None       # [R] slots of its other keys, gathered
    rest_mask: torch.Tensor | None  # [1, 1, 1, R] fp32 slot bias of those
    num_keys: int


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


# A run of consecutive slots at least this long is read in place; shorter ones are gathered.
# Gathering costs about 0.3 us per key and layer on one core (index_select of K and V rows),
# one more attention call about 20-40 us: below a few hundred keys the gather is cheaper.
MIN_RUN_SLOTS = 256
# Slots of one piece of a long run: small enough that a 4k context gives the pool a few
# pieces per KV head to share, large enough that each is mostly arithmetic.
PIECE_SLOTS = 512


def key_runs(blocks: torch.Tensor, seq_len: int, block_size: int) -> list[tuple[int, int]]:
    """(first slot, slots) of each run of consecutive cache slots that holds keys of a sequence
    of seq_len keys whose block table starts with blocks. Together the runs hold exactly its
    keys; in slot order, which is the keys' order only where its blocks ascend."""
    count = -(-seq_len // block_size)
    ids = blocks[:count].long()
    ordered = ids.sort().values
    # Where the next block is not the one after: the end of a run of blocks.
    ends = ((ordered[1:] - ordered[:-1]) != 1).nonzero().flatten().tolist()
    firsts = ordered[[0] + [end + 1 for end in ends]].tolist()
    lasts = ordered[ends + [count - 1]].tolist()
    # The last block's slots past seq_len hold no key of this sequence: a hole in its run.
    used = seq_len - (count - 1) * block_size
    last = int(ids[-1])
    hole = (last * block_size + used, (last + 1) * block_size)
    runs = []
    for first, final in zip(firsts, lasts):
        start, end = first * block_size, (final + 1) * block_size
        if used < block_size and first <= last <= final:
            runs += [(start, hole[0] - start), (hole[1], end - hole[1])]
        else:
            runs.append((start, end - start))
    return [(start, length) for start, length in runs if length > 0]


def plan_long_decode(row: int, blocks: torch.Tensor, seq_len: int, block_size: int,
                     slot_bias: torch.Tensor | None) -> LongDecode | None:
    """How a decode reads its keys in place; None where none of its runs is long enough."""
    runs = key_runs(blocks, seq_len, block_size)
    if not any(length >= MIN_RUN_SLOTS for _, length in runs):
        return None
    bias = None if slot_bias is None else slot_bias.view(-1)
    in_place, gathered = [], []
    for start, length in runs:
        if length < MIN_RUN_SLOTS:
            gathered.append(torch.arange(start, start + length))
            continue
        # Whole pieces, then what is left of the run as a piece of its own.
        pieces, left = divmod(length, PIECE_SLOTS)
        for first, count, size in ((start, pieces, PIECE_SLOTS), (start + pieces * PIECE_SLOTS, 1, left)):
            if count and size:
                mask = None if bias is None else bias[first : first + count * size].view(count, 1, 1, size)
                in_place.append(KeyRun(first, count, size, mask, _masked_rows(mask)))
    rest = torch.cat(gathered) if gathered else None
    rest_mask = None if bias is None or rest is None else bias[rest].view(1, 1, 1, -1)
    if rest_mask is not None and _masked_rows(rest_mask) is not None:
        rest = rest_mask = None  # nothing there to see
    return LongDecode(row, in_place, rest, rest_mask, seq_len)


def _masked_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Which rows of an additive mask [..., keys] hide every key (bool [...]); None if none
    does. torch's CPU flash kernel gives such a row output 0 and log-sum-exp 0, not -inf, so a
    merge must be told they weigh nothing."""
    if mask is None:
        return None
    masked = mask.isneginf().all(-1)
    return masked if bool(masked.any()) else None


def plan_cpu_attention(block_tables, seq_lens, query_start_loc, block_size, slot_bias=None) -> CpuAttentionPlan:
    """The layer-independent part of paged_attention_cpu for one batch."""
    starts = query_start_loc.long()
    num_queries = starts[1:] - starts[:-1]
    seq_lens = seq_lens.long()
    decodes = (num_queries == 1).nonzero().flatten()
    long_decodes = []
    if decodes.numel() and int(seq_lens[decodes].max()) >= MIN_RUN_SLOTS:
        short = []
        for s, seq_len in zip(decodes.tolist(), seq_lens[decodes].tolist()):
            plan = None
            if seq_len >= MIN_RUN_SLOTS:
                plan = plan_long_decode(int(starts[s]), block_tables[s], seq_len, block_size, slot_bias)
            if plan is None:
                short.append(s)
            else:
                long_decodes.append(plan)
        decodes = torch.tensor(short, dtype=torch.int64)
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

    def read_run(run: KeyRun):
        """A run's keys and values, [pieces, Hkv, length, D] each: views of the cache, or
        dequantized copies from an fp8 one."""
        if k_scale is None and k_cache.is_contiguous() and v_cache.is_contiguous():
            slots = slice(run.start, run.start + run.pieces * run.length)
            k, v = (cache.view(-1, *cache.shape[2:])[slots].to(q.dtype) for cache in (k_cache, v_cache))
        else:
            k, v = gather(torch.arange(run.start, run.start + run.pieces * run.length))
        return tuple(x.view(run.pieces, run.length, *x.shape[1:]).transpose(1, 2) for x in (k, v))

    num_q_heads, head_dim = q.shape[1], q.shape[2]
    # Small attentions stay on this thread (cpu_threads.py): the gather too, which index_select
    # splits over the pool from a few hundred rows.
    for bucket in plan.decode_buckets:
        with one_thread(bucket.slots.numel() * num_q_heads * head_dim):
            _decode(q, gather, bucket, scale, out)
    for decode in plan.long_decodes:
        with one_thread(decode.num_keys * num_q_heads * head_dim):
            _long_decode(q, read_run, gather, decode, scale, out)
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


def _long_decode(q, read_run, gather, decode: LongDecode, scale, out):
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    outputs, lses = [], []

    def attend(k, v, mask, masked):
        """One call over pieces [P, Hkv, L, D] of keys: the query's output and log-sum-exp per piece."""
        pieces, num_kv_heads = k.shape[0], k.shape[1]
        # Each KV head's query group stacked into its query rows, the same for every piece.
        queries = q[decode.row].view(1, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
        # A run's short last piece alone is not worth waking the pool for.
        with one_thread(pieces * k.shape[2] * num_q_heads * head_dim):
            o, lse = _flash_attention_cpu(queries.expand(pieces, -1, -1, -1), k, v,
                                          attn_mask=None if mask is None else mask.to(q.dtype), scale=scale)
        outputs.append(o)
        lses.append(lse if masked is None else lse.masked_fill(masked, float("-inf")))

    for run in decode.runs:
        attend(*read_run(run), run.mask, run.masked)
    if decode.rest is not None:
        k, v = (x.transpose(0, 1)[None] for x in gather(decode.rest))
        attend(k, v, decode.rest_mask, None)
    o, lse = torch.cat(outputs), torch.cat(lses)
    # The softmax over all keys: each piece's output weighed by its share of exp(lse).
    weights = torch.softmax(lse, dim=0)[..., None]
    merged = (o.float() * weights).sum(0)
    out[decode.row] = merged.view(num_q_heads, head_dim).to(q.dtype)


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
            lse_own = lse_own.masked_fill(chunk.masked_rows, float("-inf"))  # see _masked_rows
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
