"""Triton rotary: RoPE in place on q and k, one program per token.

Each token reads its sequence's row of RoPE parameters, so one launch serves a batch that
mixes bases and scaling. Same semantics as rotary.apply_rotary_reference.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def rotate_heads(base_ptr, stride_h, stride_d, num_heads, cos, sin,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate the [num_heads, 2*HALF] head vectors at base_ptr in place by cos/sin [BLOCK_HALF]."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads < num_heads)[:, None] & (dims < HALF)[None, :]
    first = base_ptr + heads[:, None] * stride_h + dims[None, :] * stride_d
    second = first + HALF * stride_d
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(second, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    c = cos[None, :]
    s = sin[None, :]
    tl.store(first, (x1f * c - x2f * s).to(x1.dtype), mask=mask)
    tl.store(second, (x2f * c + x1f * s).to(x2.dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, seq_index_ptr, inv_freq_ptr, factor_ptr,
                   stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
                   stride_freq, stride_freq_d, num_q_heads, num_kv_heads,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token).to(tl.float32)
    row = tl.load(seq_index_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    inv_freq = tl.load(inv_freq_ptr + row * stride_freq + dims * stride_freq_d, mask=dims < HALF, other=0.0)
    factor = tl.load(factor_ptr + row).to(tl.float32)
    angle = position * inv_freq.to(tl.float32)
    cos = tl.cos(angle) * factor
    sin = tl.sin(angle) * factor
    token = token.to(tl.int64)
    rotate_heads(q_ptr + token * stride_qt, stride_qh, stride_qd, num_q_heads, cos, sin,
                 HALF, BLOCK_HQ, BLOCK_HALF)
    rotate_heads(k_ptr + token * stride_kt, stride_kh, stride_kd, num_kv_heads, cos, sin,
                 HALF, BLOCK_HK, BLOCK_HALF)


def apply_rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                        seq_index: torch.Tensor, inv_freq: torch.Tensor,
                        attention_factor: torch.Tensor) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, seq_index, inv_freq, attention_factor,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        *inv_freq.stride(), num_q_heads, num_kv_heads,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )
