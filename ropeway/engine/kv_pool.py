"""Sizing and allocating the paged KV pool from a memory budget."""

import logging
from dataclasses import dataclass

import torch

from ropeway.kernels.fp8_kv import FP8, allocate_fp8_cache, fp8_block_bytes
from ropeway.models import LlamaModel

log = logging.getLogger("ropeway")

DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(frozen=True)
class KVPoolShape:
    num_blocks: int
    block_size: int
    bytes_per_block: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: torch.dtype,
                       block_size: int) -> int:
    """One block's K and V over all layers (of the KV heads a rank holds); an fp8 block counts
    its scales."""
    if kv_dtype == FP8:
        return 2 * num_layers * fp8_block_bytes(block_size, num_kv_heads, head_dim)
    return 2 * num_layers * block_size * num_kv_heads * head_dim * kv_dtype.itemsize


def plan_kv_pool(model: LlamaModel, kv_dtype: torch.dtype, device: torch.device, block_size: int,
                 budget_bytes: int | None, gpu_memory_utilization: float) -> KVPoolShape:
    """The pool of this rank: under tensor parallelism a block holds the rank's KV heads only,
    so the same budget per GPU holds world_size / replication times the tokens. kv_dtype: the
    model's dtype, or fp8_kv.FP8."""
    bytes_per_block = kv_bytes_per_block(model.config.num_layers, model.num_local_kv_heads, model.config.head_dim,
                                         kv_dtype, block_size)
    if budget_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = int(free * gpu_memory_utilization)
        else:
            budget_bytes = DEFAULT_CPU_KV_BYTES
    num_blocks = budget_bytes // bytes_per_block
    if num_blocks < 1:
        raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of {bytes_per_block} bytes")
    return KVPoolShape(num_blocks, block_size, bytes_per_block)


def cache_block_views(kv_cache: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor of the pool that holds per-block state, as a view with the block axis first:
    what moving a block between the pool and host memory copies."""
    return [kv_cache.movedim(2, 0)]


def allocate_kv_cache(model: LlamaModel, shape: KVPoolShape, kv_dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """[num_layers, 2 (K, V), num_blocks, block_size, num_local_kv_heads, head_dim] in the model's
    dtype, or for fp8 uint8 [num_layers, 2, num_blocks, block bytes] (fp8_kv.py's layout). Either
    way dim 2 is the block: kv_cache[:, :, blocks] is whole blocks, scales included."""
    cfg = model.config
    if kv_dtype == FP8:
        return allocate_fp8_cache(cfg.num_layers, shape.num_blocks, shape.block_size, model.num_local_kv_heads,
                                  cfg.head_dim, device)
    return torch.zeros(cfg.num_layers, 2, shape.num_blocks, shape.block_size, model.num_local_kv_heads,
                       cfg.head_dim, dtype=kv_dtype, device=device)
