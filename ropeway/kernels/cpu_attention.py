"""Paged attention on CPU, fast: the same contract as paged_attention_reference (attention.py).

The reference gives every sequence an explicit [queries, keys] mask, which sends torch's SDPA
down its slowest (math) path. Here:
- decodes run batched, with no Python per sequence: their pages are gathered into
  [B, Hkv, L, D] per length bucket (powers of two of the block count, so padding at most
  doubles the work), one SDPA call per bucket with a key-length mask;
- a prefill chunk with no cached prefix is plain causal SDPA, no mask;
- a chunk after a cached prefix attends to the prefix (no mask) and to itself (causal) in two
  calls of torch's CPU flash kernel, merged by their log-sum-exps: no [chunk, prefix] mask.
GQA needs no repeated keys for the unmasked parts: a KV head's query group is stacked into
its query rows. slot_bias (landmark caches) is added as a float mask where it applies.
"""

import torch
import torch.nn.functional as F

# What F.scaled_dot_product_attention runs on CPU, called directly because it also returns
# the log-sum-exp of each query's scores, which merging two partial attentions needs.
_flash_attention_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def paged_attention_cpu(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                        slot_bias=None) -> torch.Tensor:
    """As paged_attention_reference (attention.py): q [T, Hq, D] -> [T, Hq, D]."""
    out = torch.empty_like(q)
    starts = query_start_loc.long()
    num_queries = starts[1:] - starts[:-1]
    decodes = (num_queries == 1).nonzero().flatten()
    if decodes.numel():
        _decode(q, k_cache, v_cache, block_tables[decodes], seq_lens[decodes].long(), starts[decodes], scale,
                slot_bias, out)
    for s in (num_queries > 1).nonzero().flatten().tolist():
        _chunk(q, k_cache, v_cache, block_tables[s], int(seq_lens[s]), int(starts[s]), int(num_queries[s]), scale,
               slot_bias, out)
    return out


def _gather(cache, blocks, length):
    """Pages blocks [..., nb] of cache [num_blocks, bs, Hkv, D] as [..., Hkv, length, D]."""
    pages = cache[blocks.long()]
    keys = pages.reshape(*pages.shape[:-4], -1, *pages.shape[-2:])[..., :length, :, :]
    return keys.transpose(-3, -2)


def _decode(q, k_cache, v_cache, block_tables, seq_lens, rows, scale, slot_bias, out):
    """One query per sequence: block_tables [B, *], seq_lens [B], rows [B] (each query's row of q)."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    num_blocks = -(-seq_lens // block_size)
    buckets = torch.ceil(torch.log2(num_blocks.to(torch.float64))).to(torch.int64)
    for bucket in buckets.unique().tolist():
        members = (buckets == bucket).nonzero().flatten()
        bucket_lens = seq_lens[members]
        length = int(bucket_lens.max())
        blocks = block_tables[members, : -(-length // block_size)]
        k = _gather(k_cache, blocks, length).to(q.dtype)
        v = _gather(v_cache, blocks, length).to(q.dtype)
        # Query head h reads KV head h // group: each KV head's group becomes its query rows.
        queries = q[rows[members]].view(len(members), num_kv_heads, group, head_dim)
        mask = None
        valid = torch.arange(length)[None, :] < bucket_lens[:, None]
        if not bool(valid.all()):
            # Slots past a sequence's end hold anything, NaN included, which a -inf score alone
            # would not keep out of the weighted sum.
            k.masked_fill_(~valid[:, None, :, None], 0.0)
            v.masked_fill_(~valid[:, None, :, None], 0.0)
        if slot_bias is not None or not bool(valid.all()):
            bias = 0.0 if slot_bias is None else slot_bias[blocks.long()].reshape(len(members), -1)[:, :length]
            mask = torch.where(valid, bias, float("-inf")).to(q.dtype)[:, None, None, :]
        o = F.scaled_dot_product_attention(queries, k, v, attn_mask=mask, scale=scale)
        out[rows[members]] = o.reshape(len(members), -1, head_dim)


def _chunk(q, k_cache, v_cache, block_table, seq_len, start, n, scale, slot_bias, out):
    """n > 1 queries at cache positions seq_len - n .. seq_len - 1."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    num_q_heads = q.shape[1]
    group = num_q_heads // num_kv_heads
    prefix = seq_len - n
    blocks = block_table[: -(-seq_len // block_size)]
    k = _gather(k_cache, blocks, seq_len).to(q.dtype)[None]
    v = _gather(v_cache, blocks, seq_len).to(q.dtype)[None]
    bias = None if slot_bias is None else slot_bias[blocks.long()].reshape(-1)[:seq_len].to(q.dtype)
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
    if prefix == 0:
        out[start : start + n] = o_own[0].transpose(0, 1)
        return
    # Every query sees the whole prefix: each KV head's group stacked into its query rows.
    stacked = queries.reshape(1, num_kv_heads, group * n, head_dim)
    prefix_mask = None if bias is None else bias[:prefix][None, :]
    o_prefix, lse_prefix = _flash_attention_cpu(stacked, k[:, :, :prefix], v[:, :, :prefix],
                                                attn_mask=prefix_mask, scale=scale)
    o_prefix = o_prefix.reshape(1, num_q_heads, n, head_dim)
    lse_prefix = lse_prefix.reshape(1, num_q_heads, n)
    # softmax over the union of keys = the two partial results weighed by their exp(lse);
    # a prefix entirely masked (lse -inf) weighs nothing, whatever its output holds.
    weight_prefix = torch.sigmoid(lse_prefix - lse_own)[..., None]
    merged = torch.lerp(o_own.float(), o_prefix.float().nan_to_num(), weight_prefix)
    out[start : start + n] = merged[0].transpose(0, 1).to(q.dtype)
