"""Paged attention over a flat batch that mixes prefill chunks and decodes.

Sequence s owns queries q[query_start_loc[s]:query_start_loc[s+1]] (its new tokens) and
attends to the first seq_lens[s] tokens of its cache, which already hold those new tokens.
Query j of a chunk of n queries sits at cache position seq_lens[s] - n + j and sees cache
positions 0..that position (causal over the cached prefix and the chunk itself).
An optional slot_bias [num_blocks, block_size] fp32 is added to the scaled score of the
key in each cache slot (a landmark's ln(chunk length), -inf for an empty slot).
With k_scale, v_scale [num_blocks, block_size, Hkv] fp32 the caches are fp8 (fp8_kv.py):
each cached vector is its fp8 numbers times its scale.
"""

import math

import torch
import torch.nn.functional as F

from .fp8_kv import read_vectors


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    slot_bias: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D];
    block_tables [S, max_blocks] int32; seq_lens [S]; query_start_loc [S+1].
    Returns [T, Hq, D] in q's dtype. max_query_len / max_seq_len are host-side hints
    for kernels that size their grids; the reference ignores them."""
    del max_query_len, max_seq_len
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        n = q_end - q_start
        if n == 0:
            continue
        num_blocks = math.ceil(seq_len / block_size)
        blocks = block_tables[s, :num_blocks].long()
        k = read_vectors(k_cache, k_scale, blocks, q.dtype).reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = read_vectors(v_cache, v_scale, blocks, q.dtype).reshape(-1, num_kv_heads, head_dim)[:seq_len]
        # [H, n, D] x [H, L, D], GQA by repeating each KV head over its query group.
        qs = q[q_start:q_end].transpose(0, 1)
        ks = k.transpose(0, 1).repeat_interleave(group, dim=0)
        vs = v.transpose(0, 1).repeat_interleave(group, dim=0)
        query_pos = torch.arange(seq_len - n, seq_len, device=q.device)[:, None]
        key_pos = torch.arange(seq_len, device=q.device)[None, :]
        mask = key_pos <= query_pos
        if slot_bias is not None:
            bias = slot_bias[blocks].reshape(-1)[:seq_len].to(q.dtype)
            mask = torch.where(mask, bias[None, :], float("-inf"))
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[q_start:q_end] = o.transpose(0, 1)
    return out
