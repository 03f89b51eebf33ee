"""Triton re-rotation of cached keys, one program per (slot, layer).

Same semantics as rerotate.rerotate_keys_reference: the key turns once by the fp32
difference of its new and old angles, scaled by the ratio of attention factors.
"""

import torch
import triton
import triton.language as tl

from .triton_rotary import rotate_heads


@triton.jit
def _rerotate_kernel(cache_ptr, slots_ptr, old_positions_ptr, new_positions_ptr,
                     old_inv_freq_ptr, new_inv_freq_ptr, old_factor_ptr, new_factor_ptr,
                     stride_layer, stride_block, stride_offset, stride_head, stride_dim,
                     stride_old_freq, stride_old_freq_d, stride_new_freq, stride_new_freq_d, page_size, num_kv_heads,
                     HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    index = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + index).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < HALF
    old_freq = tl.load(old_inv_freq_ptr + index * stride_old_freq + dims * stride_old_freq_d, mask=dim_mask, other=0.0)
    new_freq = tl.load(new_inv_freq_ptr + index * stride_new_freq + dims * stride_new_freq_d, mask=dim_mask, other=0.0)
    old_angle = tl.load(old_positions_ptr + index).to(tl.float32) * old_freq.to(tl.float32)
    new_angle = tl.load(new_positions_ptr + index).to(tl.float32) * new_freq.to(tl.float32)
    delta = new_angle - old_angle
    ratio = (tl.load(new_factor_ptr + index).to(tl.float32)
             / tl.load(old_factor_ptr + index).to(tl.float32))
    base = (cache_ptr + layer * stride_layer + (slot // page_size) * stride_block
            + (slot % page_size) * stride_offset)
    rotate_heads(base, stride_head, stride_dim, num_kv_heads, tl.cos(delta) * ratio,
                 tl.sin(delta) * ratio, HALF, BLOCK_H, BLOCK_HALF)


def rerotate_keys_triton(k_cache: torch.Tensor, slots: torch.Tensor, old_positions: torch.Tensor,
                         new_positions: torch.Tensor, old_inv_freq: torch.Tensor,
                         new_inv_freq: torch.Tensor, old_attention_factor: torch.Tensor,
                         new_attention_factor: torch.Tensor) -> None:
    num_layers, _, page_size, num_kv_heads, head_dim = k_cache.shape
    if slots.numel() == 0:
        return
    half = head_dim // 2
    _rerotate_kernel[(slots.numel(), num_layers)](
        k_cache, slots, old_positions, new_positions, old_inv_freq, new_inv_freq,
        old_attention_factor, new_attention_factor,
        *k_cache.stride(), *old_inv_freq.stride(), *new_inv_freq.stride(),
        page_size, num_kv_heads,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )
