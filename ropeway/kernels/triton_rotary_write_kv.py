"""Triton rotary + KV write in one launch: one program per token.

Each program computes its token's cos/sin once (from its sequence's RoPE row), rotates its
query heads in place, rotates its key heads in place and also stores them to the token's
cache slot, then copies its value heads to the same slot. A negative slot (padding, e.g.
CUDA-graph filler rows) writes nothing to the cache; q and k are still rotated, as in
rotary_write_kv_reference. Saves the KV-write launch and its re-read of k and v.
"""

import torch
import triton
import triton.language as tl

from .triton_rotary import load_halves


@triton.jit
def _rotary_write_kv_kernel(
        q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
        positions_ptr, seq_index_ptr, inv_freq_ptr, factor_ptr,
        stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd,
        stride_kcb, stride_kco, stride_kch, stride_kcd,
        stride_vcb, stride_vco, stride_vch, stride_vcd,
        stride_freq, stride_freq_d, num_q_heads, num_kv_heads, page_size,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.float32)
    row = tl.load(seq_index_ptr + token).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < HALF
    inv_freq = tl.load(inv_freq_ptr + row * stride_freq + dims * stride_freq_d,
                       mask=dim_mask, other=0.0)
    factor = tl.load(factor_ptr + row).to(tl.float32)
    angle = position * inv_freq.to(tl.float32)
    cos = (tl.cos(angle) * factor)[None, :]
    sin = (tl.sin(angle) * factor)[None, :]

    # Queries: rotate in place.
    q_heads = tl.arange(0, BLOCK_HQ)
    q_rows = q_ptr + token * stride_qt + q_heads * stride_qh
    q_mask = (q_heads < num_q_heads)[:, None] & dim_mask[None, :]
    q1, q2 = load_halves(q_rows, q_heads < num_q_heads, stride_qd, HALF, BLOCK_HALF)
    q1f = q1.to(tl.float32)
    q2f = q2.to(tl.float32)
    q_first = q_rows[:, None] + dims[None, :] * stride_qd
    tl.store(q_first, (q1f * cos - q2f * sin).to(q1.dtype), mask=q_mask)
    tl.store(q_first + HALF * stride_qd, (q2f * cos + q1f * sin).to(q2.dtype), mask=q_mask)

    # Keys: rotate, round to k's dtype (as the in-place reference does), store in place
    # and, unless the token is padding, to the cache slot.
    k_heads = tl.arange(0, BLOCK_HK)
    k_rows = k_ptr + token * stride_kt + k_heads * stride_kh
    k_mask = (k_heads < num_kv_heads)[:, None] & dim_mask[None, :]
    k1, k2 = load_halves(k_rows, k_heads < num_kv_heads, stride_kd, HALF, BLOCK_HALF)
    k1f = k1.to(tl.float32)
    k2f = k2.to(tl.float32)
    r1 = (k1f * cos - k2f * sin).to(k1.dtype)
    r2 = (k2f * cos + k1f * sin).to(k2.dtype)
    k_first = k_rows[:, None] + dims[None, :] * stride_kd
    tl.store(k_first, r1, mask=k_mask)
    tl.store(k_first + HALF * stride_kd, r2, mask=k_mask)

    block = slot // page_size
    offset = slot % page_size
    # A padding token masks out all heads (the interpreter rejects scalar & tensor masks).
    cache_heads = k_heads < tl.where(slot >= 0, num_kv_heads, 0)
    cache_mask = cache_heads[:, None] & dim_mask[None, :]
    kc_first = (k_cache_ptr + block * stride_kcb + offset * stride_kco
                + k_heads[:, None] * stride_kch + dims[None, :] * stride_kcd)
    kc_dtype = k_cache_ptr.dtype.element_ty
    tl.store(kc_first, r1.to(kc_dtype), mask=cache_mask)
    tl.store(kc_first + HALF * stride_kcd, r2.to(kc_dtype), mask=cache_mask)

    # Values: copied to the slot, both halves at once.
    full_dims = tl.arange(0, 2 * BLOCK_HALF)
    v_mask = cache_heads[:, None] & (full_dims < 2 * HALF)[None, :]
    v = tl.load(v_ptr + token * stride_vt + k_heads[:, None] * stride_vh
                + full_dims[None, :] * stride_vd, mask=v_mask)
    vc = (v_cache_ptr + block * stride_vcb + offset * stride_vco
          + k_heads[:, None] * stride_vch + full_dims[None, :] * stride_vcd)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def rotary_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, positions: torch.Tensor,
                           seq_index: torch.Tensor, inv_freq: torch.Tensor,
                           attention_factor: torch.Tensor, num_warps: int = 4) -> None:
    """num_warps is exposed for the tuning sweep in benchmarks/kernels.py."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_write_kv_kernel[(num_tokens,)](
        q, k, v, k_cache, v_cache, slot_mapping, positions, seq_index, inv_freq, attention_factor,
        *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        *inv_freq.stride(), num_q_heads, num_kv_heads, k_cache.shape[1],
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        num_warps=num_warps,
    )
