"""Landmark summaries: an evicted chunk, re-computed alone, reduced to one key and one value
per layer and KV head.

Keys are averaged before RoPE and the mean is rotated once, to its landmark slot's
position: averaging rotated keys would cancel their high-frequency components.
"""

import torch

from ropeway.kernels.rotary import rope_cos_sin, rotate_by
from ropeway.models import Capture, ForwardBatch, LlamaModel
from ropeway.arith import cdiv


def chunk_summary(model: LlamaModel, token_ids: list[int], inv_freq: torch.Tensor,
                  attention_factor: float, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean key before RoPE and mean value, fp32 [num_layers, num_local_kv_heads, head_dim], of
    the chunk run through the model alone (positions 0..n-1) in a private cache."""
    cfg, device = model.config, model.device
    n = len(token_ids)
    num_blocks = cdiv(n, block_size)
    cache = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, model.num_local_kv_heads, cfg.head_dim,
                        dtype=model.dtype, device=device)
    positions = torch.arange(n, device=device)
    batch = ForwardBatch.one_sequence(
        torch.tensor(token_ids, dtype=torch.int64, device=device), positions, positions,
        torch.arange(num_blocks, dtype=torch.int32, device=device), n, inv_freq, attention_factor, positions[-1:])
    captured = Capture()
    model.forward(batch, cache, captured)
    keys = torch.stack([k.float().mean(0) for k in captured.keys])
    values = torch.stack([v.float().mean(0) for v in captured.values])
    return keys, values


def rotate_to(keys: torch.Tensor, position: int, inv_freq: torch.Tensor, attention_factor: float) -> torch.Tensor:
    """keys [num_layers, num_kv_heads, head_dim] rotated to one position, as the model
    rotates a key there."""
    cos, sin = rope_cos_sin(torch.tensor([position], device=keys.device), inv_freq[None],
                            torch.tensor([attention_factor], device=keys.device))
    return rotate_by(keys, cos.expand(keys.shape[0], -1), sin.expand(keys.shape[0], -1))
