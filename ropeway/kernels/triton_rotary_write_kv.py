"""Triton rotary + KV write in one launch: one program per token.

Each program computes its token's cos/sin once (from its sequence's RoPE row), rotates its
query heads in place, rotates its key heads in place and also stores them to the token's
cache slot, then copies its value heads to the same slot. A negative slot (padding, e.g.
CUDA-graph filler rows) writes nothing to the cache; q and k are still rotated, as in
rotary_write_kv_reference. Saves the KV-write launch and its re-read of k and v.
With CAPTURE, tokens with a capture row (>= 0) also store their query heads before RoPE
there (retrieval keeps a prompt chunk's queries: a gather per layer cost a launch each).
With HAS_SCALES the cache is fp8 (fp8_kv.py): each key head, rotated and rounded to k's dtype
as the reference does, and each value head is quantized by its own max and stored with its
scale.
"""

import torch
import triton
import triton.language as tl

from .triton_fp8 import fp8_scales, quantize_halves, to_fp8_range
from .triton_launch import use_pdl, wait_for_previous_kernel
from .triton_rotary import load_halves, rotate_heads, store_halves, store_rotated, token_cos_sin


@triton.jit
def _rotary_write_kv_kernel(
        q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_mapping_ptr,
        positions_ptr, seq_index_ptr, inv_freq_ptr, factor_ptr, capture_ptr, capture_rows_ptr,
        stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd,
        stride_kcb, stride_kco, stride_kch, stride_kcd,
        stride_vcb, stride_vco, stride_vch, stride_vcd,
        stride_ksb, stride_kso, stride_ksh, stride_vsb, stride_vso, stride_vsh,
        stride_freq, stride_freq_d, stride_cr, stride_ch, stride_cd, num_q_heads, num_kv_heads, page_size,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
        HAS_SCALES: tl.constexpr, CAPTURE: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    cos, sin = token_cos_sin(token, positions_ptr, seq_index_ptr, inv_freq_ptr, factor_ptr,
                             stride_freq, stride_freq_d, HALF, BLOCK_HALF)

    q_heads = tl.arange(0, BLOCK_HQ)
    q_rows = q_ptr + token * stride_qt + q_heads * stride_qh
    q1, q2 = load_halves(q_rows, q_heads < num_q_heads, stride_qd, HALF, BLOCK_HALF)
    if CAPTURE:  # the queries as they are before RoPE, to the token's capture row if it has one
        capture_row = tl.load(capture_rows_ptr + token).to(tl.int64)
        store_halves(capture_ptr + capture_row * stride_cr + q_heads * stride_ch,
                     q_heads < tl.where(capture_row >= 0, num_q_heads, 0), stride_cd, q1, q2, HALF, BLOCK_HALF)
    store_rotated(q_rows, q_heads < num_q_heads, stride_qd, q1, q2, cos, sin, HALF, BLOCK_HALF)
    # Keys: rotated in place (rounded to k's dtype, as the reference does) and, unless the
    # token is padding, also stored to its cache slot.
    r1, r2 = rotate_heads(k_ptr, token, stride_kt, stride_kh, stride_kd, num_kv_heads, cos, sin,
                          HALF, BLOCK_HALF, BLOCK_HK)
    k_heads = tl.arange(0, BLOCK_HK)
    block = slot // page_size
    offset = slot % page_size
    # A padding token masks out all heads (the interpreter rejects scalar & tensor masks).
    cache_heads = k_heads < tl.where(slot >= 0, num_kv_heads, 0)
    kc_rows = k_cache_ptr + block * stride_kcb + offset * stride_kco + k_heads * stride_kch
    if HAS_SCALES:
        r1, r2, k_scales = quantize_halves(r1, r2)
        tl.store(k_scale_ptr + block * stride_ksb + offset * stride_kso + k_heads * stride_ksh, k_scales,
                 mask=cache_heads)
    store_halves(kc_rows, cache_heads, stride_kcd, r1, r2, HALF, BLOCK_HALF)

    # Values: copied to the slot, both halves at once.
    full_dims = tl.arange(0, 2 * BLOCK_HALF)
    v_mask = cache_heads[:, None] & (full_dims < 2 * HALF)[None, :]
    v = tl.load(v_ptr + token * stride_vt + k_heads[:, None] * stride_vh
                + full_dims[None, :] * stride_vd, mask=v_mask, other=0.0)
    vc = (v_cache_ptr + block * stride_vcb + offset * stride_vco
          + k_heads[:, None] * stride_vch + full_dims[None, :] * stride_vcd)
    if HAS_SCALES:
        vf = v.to(tl.float32)
        v_scales, divisor = fp8_scales(tl.max(tl.abs(vf), 1))
        tl.store(v_scale_ptr + block * stride_vsb + offset * stride_vso + k_heads * stride_vsh, v_scales,
                 mask=cache_heads)
        v = to_fp8_range(vf, divisor)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def rotary_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, positions: torch.Tensor,
                           seq_index: torch.Tensor, inv_freq: torch.Tensor,
                           attention_factor: torch.Tensor, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, capture: torch.Tensor | None = None,
                           capture_rows: torch.Tensor | None = None, num_warps: int = 4) -> None:
    """k_scale, v_scale [num_blocks, page_size, Hkv] fp32: the caches are fp8. capture [U, Hq, D]
    with capture_rows [T] (int64, -1 for none): token t's queries before RoPE go to row
    capture_rows[t]. num_warps is exposed for the tuning sweep in benchmarks/kernels.py."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    half = head_dim // 2
    pdl = use_pdl(q)
    has_scales = k_scale is not None
    # Without scales the kernel never reads these: any tensor stands in.
    k_scales, v_scales = (k_scale, v_scale) if has_scales else (slot_mapping[:, None, None],) * 2
    captures = capture is not None
    if not captures:  # never read either
        capture, capture_rows = q, slot_mapping
    _rotary_write_kv_kernel[(num_tokens,)](
        q, k, v, k_cache, v_cache, k_scales, v_scales, slot_mapping, positions, seq_index, inv_freq, attention_factor,
        capture, capture_rows, *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        *k_scales.stride(), *v_scales.stride(),
        *inv_freq.stride(), *capture.stride(), num_q_heads, num_kv_heads, k_cache.shape[1],
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads), HAS_SCALES=has_scales, CAPTURE=captures, PDL=pdl,
        num_warps=num_warps, launch_pdl=pdl,
    )
