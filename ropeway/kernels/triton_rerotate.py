"""Triton re-rotation of cached keys; a program takes one slot in LAYERS layers.

Same semantics as rerotate.rerotate_keys_reference: the key turns once by the fp32
difference of its new and old angles, scaled by the ratio of attention factors. One
slot's keys in one layer are only Hkv·D values, so a program covers several layers to
have enough bytes in flight. With HAS_SCALES (an fp8 cache) a key is dequantized, turned in
fp32 and quantized again with a scale of its own.
"""

import torch
import triton
import triton.language as tl

from .triton_fp8 import quantize_halves
from .triton_rotary import load_halves, rotate_halves, store_halves

LAYERS_PER_PROGRAM = 4


@triton.jit
def _rerotate_kernel(cache_ptr, scale_ptr, slots_ptr, old_positions_ptr, new_positions_ptr,
                     old_rows_ptr, new_rows_ptr, inv_freq_ptr, factor_ptr,
                     stride_layer, stride_block, stride_offset, stride_head, stride_dim,
                     stride_s_layer, stride_s_block, stride_s_offset, stride_s_head,
                     stride_freq_row, stride_freq_d,
                     page_size, num_layers, num_kv_heads,
                     HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                     LAYERS: tl.constexpr, HAS_SCALES: tl.constexpr):
    index = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + index).to(tl.int64)
    rows = tl.arange(0, LAYERS * BLOCK_H)
    layer = tl.program_id(1) * LAYERS + rows // BLOCK_H
    head = rows % BLOCK_H
    row_mask = (layer < num_layers) & (head < num_kv_heads)
    row_ptrs = (cache_ptr + layer.to(tl.int64) * stride_layer + (slot // page_size) * stride_block
                + (slot % page_size) * stride_offset + head * stride_head)
    x1, x2 = load_halves(row_ptrs, row_mask, stride_dim, HALF, BLOCK_HALF)
    if HAS_SCALES:
        scale_ptrs = (scale_ptr + layer.to(tl.int64) * stride_s_layer + (slot // page_size) * stride_s_block
                      + (slot % page_size) * stride_s_offset + head * stride_s_head)
        scales = tl.load(scale_ptrs, mask=row_mask, other=0.0)
        x1 = x1.to(tl.float32) * scales[:, None]
        x2 = x2.to(tl.float32) * scales[:, None]

    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < HALF
    old_row = tl.load(old_rows_ptr + index).to(tl.int64)
    new_row = tl.load(new_rows_ptr + index).to(tl.int64)
    old_freq = tl.load(inv_freq_ptr + old_row * stride_freq_row + dims * stride_freq_d, mask=dim_mask, other=0.0)
    new_freq = tl.load(inv_freq_ptr + new_row * stride_freq_row + dims * stride_freq_d, mask=dim_mask, other=0.0)
    old_angle = tl.load(old_positions_ptr + index).to(tl.float32) * old_freq.to(tl.float32)
    new_angle = tl.load(new_positions_ptr + index).to(tl.float32) * new_freq.to(tl.float32)
    delta = new_angle - old_angle
    ratio = tl.load(factor_ptr + new_row).to(tl.float32) / tl.load(factor_ptr + old_row).to(tl.float32)
    r1, r2 = rotate_halves(x1, x2, (tl.cos(delta) * ratio)[None, :], (tl.sin(delta) * ratio)[None, :])
    if HAS_SCALES:
        r1, r2, new_scales = quantize_halves(r1, r2)
        tl.store(scale_ptrs, new_scales, mask=row_mask)
    store_halves(row_ptrs, row_mask, stride_dim, r1, r2, HALF, BLOCK_HALF)


def rerotate_keys_triton(k_cache: torch.Tensor, slots: torch.Tensor, old_positions: torch.Tensor,
                         new_positions: torch.Tensor, old_rows: torch.Tensor, new_rows: torch.Tensor,
                         inv_freq_table: torch.Tensor, factor_table: torch.Tensor,
                         k_scale: torch.Tensor | None = None) -> None:
    """k_scale [num_layers, num_blocks, page_size, Hkv] fp32: the cache is fp8."""
    num_layers, _, page_size, num_kv_heads, head_dim = k_cache.shape
    if slots.numel() == 0:
        return
    half = head_dim // 2
    # The kernel indexes the per-slot vectors densely: a broadcast (stride-0) one is made whole
    # (no copy for the dense vectors callers upload).
    slots, old_positions, new_positions, old_rows, new_rows, factor_table = (
        x.contiguous() for x in (slots, old_positions, new_positions, old_rows, new_rows, factor_table))
    grid = (slots.numel(), triton.cdiv(num_layers, LAYERS_PER_PROGRAM))
    # Without scales the kernel never reads them: any tensor stands in.
    scales = k_cache if k_scale is None else k_scale
    _rerotate_kernel[grid](
        k_cache, scales, slots, old_positions, new_positions, old_rows, new_rows, inv_freq_table, factor_table,
        *k_cache.stride(), *scales.stride()[:4], *inv_freq_table.stride(),
        page_size, num_layers, num_kv_heads,
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_H=triton.next_power_of_2(num_kv_heads), LAYERS=LAYERS_PER_PROGRAM, HAS_SCALES=k_scale is not None,
        num_warps=4,
    )
