"""Archived KV blocks copied from host memory back into pool blocks.

A host block is the pool's block as bytes, block-major: [num_layers, 2, ...] in one run. The
torch version stages the runs of consecutive blocks on the device (one copy each) and scatters
them into the pool in one index_copy_; the Triton version (triton_host_blocks.py) reads every
block from pinned host memory itself, by address, in one launch.
"""

import torch


def blocks_from_host_reference(kv_cache: torch.Tensor, destinations: torch.Tensor, runs: list[torch.Tensor]) -> None:
    """kv_cache [num_layers, 2, num_blocks, ...] (any pool dtype); destinations [n] int64, the
    pool blocks that the runs' blocks go to, in order; runs: host tensors [k, num_layers, 2, ...]
    whose blocks are those n blocks, in order (on CUDA, pinned: queued copies, no wait)."""
    lengths = [len(run) for run in runs]
    staged = torch.empty((sum(lengths), *runs[0].shape[1:]), dtype=kv_cache.dtype, device=kv_cache.device)
    for part, run in zip(staged.split(lengths), runs):
        part.copy_(run, non_blocking=True)
    kv_cache.index_copy_(2, destinations, staged.movedim(0, 2))
