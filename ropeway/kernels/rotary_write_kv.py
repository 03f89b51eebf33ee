"""RoPE on the step's queries and keys fused with the paged KV write of keys and values."""

import torch

from .kv_cache import write_kv_reference
from .rotary import apply_rotary_reference


def rotary_write_kv_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor,
    seq_index: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """apply_rotary_reference on q and k (in place), then write_kv_reference of the rotated
    k and v to slot_mapping (a negative slot, i.e. padding, is skipped); with scales, into an
    fp8 cache, keys quantized after RoPE as they are rounded to k's dtype."""
    apply_rotary_reference(q, k, positions, seq_index, inv_freq, attention_factor)
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
