"""Sizing and allocating the paged KV pool from a memory budget."""

import logging
from dataclasses import dataclass

import torch

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


def plan_kv_pool(model: LlamaModel, dtype: torch.dtype, device: torch.device, block_size: int,
                 budget_bytes: int | None, gpu_memory_utilization: float) -> KVPoolShape:
    """The pool of this rank: under tensor parallelism a block holds the rank's KV heads only,
    so the same budget per GPU holds world_size / replication times the tokens."""
    element = torch.tensor([], dtype=dtype).element_size()
    bytes_per_block = block_size * model.kv_elements_per_token * element
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


def allocate_kv_cache(model: LlamaModel, shape: KVPoolShape, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """[num_layers, 2 (K, V), num_blocks, block_size, num_local_kv_heads, head_dim]."""
    return torch.zeros(model.config.num_layers, 2, shape.num_blocks, shape.block_size, model.num_local_kv_heads,
                       model.config.head_dim, dtype=dtype, device=device)
