"""Triton copy of archived blocks from pinned host memory into the pool, in one launch.

Pinned host memory is mapped into the GPU's address space (unified addressing: torch pins with
cudaHostAlloc, whose pointers kernels may use as they are), so a kernel can read it by address: a
program takes one (block, layer and K/V) segment, reads its bytes over the bus as 4-byte words and
writes them to the pool block. The torch version pays the host a copy per run of consecutive
blocks, a staging buffer and a scatter (host_blocks.py); same result.
"""

import torch
import triton
import triton.language as tl

WORDS = 1024


@triton.jit
def _blocks_from_host_kernel(addresses_ptr, destinations_ptr, pool_ptr, num_pool_blocks, segment_words,
                             WORDS: tl.constexpr):
    block = tl.program_id(0)
    segment = tl.program_id(1).to(tl.int64)  # layer * 2 + (0 keys, 1 values)
    source = tl.load(addresses_ptr + block).to(tl.pointer_type(tl.int32)) + segment * segment_words
    destination = pool_ptr + (segment * num_pool_blocks + tl.load(destinations_ptr + block)) * segment_words
    for first in range(0, segment_words, WORDS):
        words = first + tl.arange(0, WORDS)
        mask = words < segment_words
        tl.store(destination + words, tl.load(source + words, mask=mask), mask=mask)


def blocks_from_host_triton(kv_cache: torch.Tensor, destinations: torch.Tensor, addresses: torch.Tensor) -> None:
    """As blocks_from_host_reference, the runs given as addresses [n] int64 on the device: the
    host address of each block (pinned memory, block-major as the archive holds it)."""
    num_layers, kinds, num_blocks = kv_cache.shape[:3]
    count = destinations.numel()
    if count == 0:
        return
    block_bytes = kv_cache[0, 0, 0].nbytes
    assert block_bytes % 4 == 0 and kv_cache.is_contiguous()
    pool_words = kv_cache.view(-1).view(torch.int32)
    _blocks_from_host_kernel[(count, num_layers * kinds)](
        addresses, destinations, pool_words, num_blocks, block_bytes // 4, WORDS=WORDS, num_warps=4)
