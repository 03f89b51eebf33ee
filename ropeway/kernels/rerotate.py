"""Re-rotate cached keys from (position, RoPE row) to (new position, new RoPE row).

A row is one of the tables every RoPE plan of the engine has a row in (model_runner.py): a
slot names its rows, never copies of them, so a move costs no gathers.

The rotation angle is the difference of the two angles, computed in fp32, and the key is
rotated once by it: never un-rotated and re-rotated in the cache dtype, which would round
twice. A change of YaRN attention factor rescales the key by new/old. In an fp8 cache the
key is dequantized, rotated in fp32 and quantized again with a scale of its own.
"""

import torch

from .fp8_kv import read_vectors, write_vectors
from .rotary import rotate_by


def rerotate_keys_reference(
    k_cache: torch.Tensor,
    slots: torch.Tensor,
    old_positions: torch.Tensor,
    new_positions: torch.Tensor,
    old_rows: torch.Tensor,
    new_rows: torch.Tensor,
    inv_freq_table: torch.Tensor,
    factor_table: torch.Tensor,
    k_scale: torch.Tensor | None = None,
) -> None:
    """k_cache [num_layers, num_blocks, block_size, Hkv, D] (any strides), rotated in place
    at slots [N] for every layer. Per slot: old/new positions [N] and old/new RoPE rows [N],
    rows of inv_freq_table [P, D/2] and factor_table [P] (attention factors). k_scale
    [num_layers, num_blocks, block_size, Hkv]: the cache is fp8 (fp8_kv.py)."""
    block_size = k_cache.shape[2]
    slots = slots.long()
    blocks, offsets = slots // block_size, slots % block_size
    old_rows, new_rows = old_rows.long(), new_rows.long()
    old_inv_freq, new_inv_freq = inv_freq_table[old_rows], inv_freq_table[new_rows]
    old_attention_factor, new_attention_factor = factor_table[old_rows], factor_table[new_rows]
    old_angles = old_positions.to(torch.float32)[:, None] * old_inv_freq.to(torch.float32)
    new_angles = new_positions.to(torch.float32)[:, None] * new_inv_freq.to(torch.float32)
    delta = new_angles - old_angles
    ratio = (new_attention_factor.to(torch.float32) / old_attention_factor.to(torch.float32))[:, None]
    cos, sin = torch.cos(delta) * ratio, torch.sin(delta) * ratio
    for layer in range(k_cache.shape[0]):
        index = (layer, blocks, offsets)
        keys = read_vectors(k_cache, k_scale, index, torch.float32)
        write_vectors(k_cache, k_scale, index, rotate_by(keys, cos, sin))
