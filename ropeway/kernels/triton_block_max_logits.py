"""Triton block max logits: every layer and KV head in one launch.

A program takes one (layer, KV head), BLOCK_M of that head's query rows (row m is query row
m // group of query head kv_head * group + m % group, read in place from the [L, R, H, D]
queries) and BLOCKS key blocks: one product over BLOCKS * block_size keys, then each block's
max. The logits never reach memory: the torch version wrote [L, Hkv, R * group, N] of them
(0.6 GB at 32k archived tokens) and read them back, in a few launches per group of layers.
Same semantics as block_max_logits.block_max_logits_reference.
"""

import torch
import triton
import triton.language as tl

# Keys a program reads per product: 8 blocks of 16.
KEYS_PER_PROGRAM = 128


@triton.jit
def _block_max_logits_kernel(q_ptr, k_ptr, out_ptr, scale,
                             stride_ql, stride_qr, stride_qh, stride_qd,
                             stride_kl, stride_kh, stride_kn, stride_kd,
                             num_kv_heads, num_rows_grouped, num_blocks, group, head_dim,
                             BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    layer_head = tl.program_id(0)
    layer = (layer_head // num_kv_heads).to(tl.int64)
    kv_head = (layer_head % num_kv_heads).to(tl.int64)
    first_block = tl.program_id(1) * BLOCKS
    m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_mask = m < num_rows_grouped
    dim_mask = dims < head_dim

    query_head = kv_head * group + m % group
    q_ptrs = (q_ptr + layer * stride_ql + (m // group).to(tl.int64)[:, None] * stride_qr
              + query_head[:, None] * stride_qh + dims[None, :] * stride_qd)
    tokens = first_block * BLOCK_SIZE + tl.arange(0, BLOCKS * BLOCK_SIZE)
    token_mask = tokens < num_blocks * BLOCK_SIZE
    k_ptrs = (k_ptr + layer * stride_kl + kv_head * stride_kh + tokens.to(tl.int64)[None, :] * stride_kn
              + dims[:, None] * stride_kd)
    k = tl.load(k_ptrs, mask=dim_mask[:, None] & token_mask[None, :], other=0.0)
    q = tl.load(q_ptrs, mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(k.dtype)
    logits = tl.dot(q, k, input_precision=DOT_PRECISION)
    best = tl.max(tl.reshape(logits, (BLOCK_M, BLOCKS, BLOCK_SIZE)), axis=2)
    # Rounded to the keys' dtype as a product in that dtype is (the max commutes with rounding).
    best = best.to(k.dtype).to(tl.float32) * scale

    blocks = first_block + tl.arange(0, BLOCKS)
    out_ptrs = out_ptr + (layer_head * num_rows_grouped + m).to(tl.int64)[:, None] * num_blocks + blocks[None, :]
    tl.store(out_ptrs, best, mask=row_mask[:, None] & (blocks < num_blocks)[None, :])


def block_max_logits_triton(queries: torch.Tensor, keys: torch.Tensor, block_size: int,
                            scale: float) -> torch.Tensor:
    """As block_max_logits_reference (queries and keys of any strides); block_size a power of
    two, at most KEYS_PER_PROGRAM."""
    num_layers, num_rows, num_heads, head_dim = queries.shape
    num_kv_heads, num_keys = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = num_keys // block_size
    rows_grouped = num_rows * group
    out = torch.empty(num_layers, num_kv_heads, num_rows, group, num_blocks, dtype=torch.float32,
                      device=keys.device)
    if out.numel() == 0:
        return out
    blocks_per_program = KEYS_PER_PROGRAM // block_size
    # tl.dot wants 16 rows at least; more than 64 rows a program hold too many logits in registers.
    block_m = min(64, max(16, triton.next_power_of_2(rows_grouped)))
    grid = (num_layers * num_kv_heads, triton.cdiv(num_blocks, blocks_per_program), triton.cdiv(rows_grouped, block_m))
    _block_max_logits_kernel[grid](
        queries, keys, out, scale, *queries.stride(), *keys.stride(),
        num_kv_heads, rows_grouped, num_blocks, group, head_dim,
        BLOCK_SIZE=block_size, BLOCKS=blocks_per_program, BLOCK_M=block_m,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_PRECISION="ieee" if keys.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out
