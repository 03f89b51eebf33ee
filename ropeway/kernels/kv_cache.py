"""Scatter new keys and values into the paged KV cache."""

import torch

from .fp8_kv import write_vectors


def write_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """k, v [T, Hkv, D] go to slots slot_mapping [T] of k_cache, v_cache
    [num_blocks, block_size, Hkv, D] (slot = block_id * block_size + offset).
    A negative slot marks a padding token and is skipped. With k_scale, v_scale
    [num_blocks, block_size, Hkv] the caches are fp8 (fp8_kv.py): each vector is quantized
    with its own scale."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    index = (slots // block_size, slots % block_size)
    write_vectors(k_cache, k_scale, index, k[keep])
    write_vectors(v_cache, v_scale, index, v[keep])
