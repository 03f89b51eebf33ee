"""The fp8 (e4m3) KV cache: its storage layout and its scales.

Each cached vector (one token's key or value in one KV head) is head_dim fp8 numbers and one
fp32 scale, x ≈ fp8 · scale with scale = max|x| / 448 (e4m3's largest finite value). Scales
per token and head are made when the vector is written: nothing needs calibrating, a block
never needs re-quantizing as its later slots fill, and a key re-rotated to a new position
simply gets a new scale. They cost 4 bytes per head_dim bytes: at head_dim 128 a token takes
132 bytes per head where bf16 takes 256 (1.94x the tokens in the same memory).

Layout: a pool block is bytes, [block_size, Hkv, head_dim] fp8 then [Hkv, block_size] fp32
scales, so a block moves with its scales (kv_cache[:, :, blocks] copies both) and each fp8 row
stays 16-byte aligned for the kernels' vector loads. Scales are head-major so that attention,
which reads one KV head's keys, reads that head's scales of a block as one contiguous run. The
pool is uint8 [num_layers, 2 (K, V), num_blocks, block_bytes]; cache_views splits any
[..., block_bytes] into an fp8 view [..., block_size, Hkv, head_dim] and a scale view
[..., block_size, Hkv] (strided: indexed by slot and head like the values).
A cache in the model's dtype is [..., block_size, Hkv, head_dim] and has no scales.
"""

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_BYTES = 4


def fp8_block_bytes(block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one block of keys (or values) of one layer, scales included."""
    return block_size * num_kv_heads * (head_dim + SCALE_BYTES)


def allocate_fp8_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       device: torch.device) -> torch.Tensor:
    """A zeroed pool: every scale 0, so an unwritten slot reads as zeros."""
    return torch.zeros(num_layers, 2, num_blocks, fp8_block_bytes(block_size, num_kv_heads, head_dim),
                       dtype=torch.uint8, device=device)


def cache_views(blocks: torch.Tensor, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, scales) of cache blocks: an fp8 pool's bytes [..., block_bytes] as views
    ([..., block_size, Hkv, D] fp8, [..., block_size, Hkv] fp32); a cache in the model's dtype
    [..., block_size, Hkv, D] as it is, with None."""
    if blocks.dtype != torch.uint8:
        return blocks, None
    block_size = blocks.shape[-1] // (num_kv_heads * (head_dim + SCALE_BYTES))
    value_bytes = block_size * num_kv_heads * head_dim
    values = blocks[..., :value_bytes].view(FP8).unflatten(-1, (block_size, num_kv_heads, head_dim))
    scales = blocks[..., value_bytes:].view(torch.float32).unflatten(-1, (num_kv_heads, block_size)).transpose(-1, -2)
    return values, scales


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (fp8 [..., D], fp32 scales [...]): each vector over its own max|x|.
    The kernels quantize with the same arithmetic (fp32 division, then a round to nearest)."""
    xf = x.float()
    scales = xf.abs().amax(-1) / FP8_MAX
    safe = torch.where(scales > 0, scales, 1.0)
    return (xf / safe[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scales


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (values.float() * scales[..., None]).to(dtype)


def read_vectors(cache: torch.Tensor, scales: torch.Tensor | None, index, dtype: torch.dtype) -> torch.Tensor:
    """cache[index] in dtype, dequantized where the cache is fp8 (index selects whole vectors)."""
    if scales is None:
        return cache[index].to(dtype)
    return dequantize_fp8(cache[index], scales[index], dtype)


def write_vectors(cache: torch.Tensor, scales: torch.Tensor | None, index, vectors: torch.Tensor) -> None:
    """cache[index] = vectors, quantized where the cache is fp8."""
    if scales is None:
        cache[index] = vectors.to(cache.dtype)
    else:
        cache[index], scales[index] = quantize_fp8(vectors)
