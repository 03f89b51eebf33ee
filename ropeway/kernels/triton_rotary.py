"""Triton rotary: RoPE in place on q and k, one program per token.

Each token reads its sequence's row of RoPE parameters, so one launch serves a batch that
mixes bases and scaling. Same semantics as rotary.apply_rotary_reference.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def load_halves(row_ptrs, row_mask, stride_d, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The two halves [ROWS, BLOCK_HALF] of the head vectors starting at row_ptrs [ROWS]."""
    dims = tl.arange(0, BLOCK_HALF)
    mask = row_mask[:, None] & (dims < HALF)[None, :]
    first = row_ptrs[:, None] + dims[None, :] * stride_d
    return tl.load(first, mask=mask, other=0.0), tl.load(first + HALF * stride_d, mask=mask, other=0.0)


@triton.jit
def token_cos_sin(token, positions_ptr, seq_index_ptr, inv_freq_ptr, factor_ptr, stride_freq, stride_freq_d,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos and sin [1, BLOCK_HALF] of the token's position under its sequence's RoPE row,
    scaled by the row's attention factor."""
    position = tl.load(positions_ptr + token).to(tl.float32)
    row = tl.load(seq_index_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + row * stride_freq + dims * stride_freq_d,
                       mask=dims < HALF, other=0.0)
    factor = tl.load(factor_ptr + row).to(tl.float32)
    angle = position * inv_freq.to(tl.float32)
    return (tl.cos(angle) * factor)[None, :], (tl.sin(angle) * factor)[None, :]


@triton.jit
def rotate_halves(x1, x2, cos, sin):
    """(x1·cos − x2·sin, x2·cos + x1·sin), computed in fp32, rounded to x's dtype."""
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    return (x1f * cos - x2f * sin).to(x1.dtype), (x2f * cos + x1f * sin).to(x2.dtype)


@triton.jit
def store_halves(row_ptrs, row_mask, stride_d, x1, x2, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The inverse of load_halves (values converted to the destination's dtype)."""
    dims = tl.arange(0, BLOCK_HALF)
    mask = row_mask[:, None] & (dims < HALF)[None, :]
    first = row_ptrs[:, None] + dims[None, :] * stride_d
    tl.store(first, x1.to(row_ptrs.dtype.element_ty), mask=mask)
    tl.store(first + HALF * stride_d, x2.to(row_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def store_rotated(row_ptrs, row_mask, stride_d, x1, x2, cos, sin,
                  HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Store the halves rotated (rotate_halves) back in place; returns them."""
    r1, r2 = rotate_halves(x1, x2, cos, sin)
    store_halves(row_ptrs, row_mask, stride_d, r1, r2, HALF, BLOCK_HALF)
    return r1, r2


@triton.jit
def rotate_heads(x_ptr, token, stride_t, stride_h, stride_d, num_heads, cos, sin,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """RoPE in place on the token's heads of x; returns the rotated halves [BLOCK_H, BLOCK_HALF]."""
    heads = tl.arange(0, BLOCK_H)
    rows = x_ptr + token * stride_t + heads * stride_h
    x1, x2 = load_halves(rows, heads < num_heads, stride_d, HALF, BLOCK_HALF)
    return store_rotated(rows, heads < num_heads, stride_d, x1, x2, cos, sin, HALF, BLOCK_HALF)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, seq_index_ptr, inv_freq_ptr, factor_ptr,
                   stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                   stride_freq, stride_freq_d, num_q_heads, num_kv_heads,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = token_cos_sin(token, positions_ptr, seq_index_ptr, inv_freq_ptr, factor_ptr,
                             stride_freq, stride_freq_d, HALF, BLOCK_HALF)
    # q then k, each loaded and stored before the next: holding both in registers at once
    # measured slower on an H200 (fewer programs resident per SM).
    rotate_heads(q_ptr, token, stride_qt, stride_qh, stride_qd, num_q_heads, cos, sin, HALF, BLOCK_HALF, BLOCK_HQ)
    rotate_heads(k_ptr, token, stride_kt, stride_kh, stride_kd, num_kv_heads, cos, sin, HALF, BLOCK_HALF, BLOCK_HK)


def apply_rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                        seq_index: torch.Tensor, inv_freq: torch.Tensor,
                        attention_factor: torch.Tensor, num_warps: int = 2) -> None:
    """num_warps is exposed for the tuning sweep in benchmarks/kernels.py; 2 measured
    fastest on an H200 (more programs resident per SM)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, seq_index, inv_freq, attention_factor,
        *q.stride(), *k.stride(), *inv_freq.stride(), num_q_heads, num_kv_heads,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        num_warps=num_warps,
    )
