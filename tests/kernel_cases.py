"""Random inputs for the kernel tests, shared by the interpreter and GPU test files."""

import math

import torch


def rope_rows(num_rows: int, head_dim: int, device, generator=None):
    """inv_freq [num_rows, D/2] with a different base per row, and attention factors."""
    bases = 10000.0 * (1.0 + 9.0 * torch.rand(num_rows, generator=generator, dtype=torch.float64))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = (1.0 / bases[:, None] ** exponents[None, :]).to(torch.float32)
    factors = (1.0 + 0.2 * torch.rand(num_rows, generator=generator)).to(torch.float32)
    return inv_freq.to(device), factors.to(device)


def table_rows(old_inv_freq, new_inv_freq, old_factors, new_factors):
    """Per-slot RoPE rows as the re-rotation kernels take them: (old rows [N], new rows [N],
    inv_freq table [2N, D/2], factor table [2N]), every slot's old row, then its new one."""
    n = old_inv_freq.shape[0]
    rows = torch.arange(2 * n, device=old_inv_freq.device)
    return rows[:n], rows[n:], torch.cat([old_inv_freq, new_inv_freq]), torch.cat([old_factors, new_factors])


def paged_case(seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page_size, dtype,
               device, generator=None, tables=None):
    """A paged cache holding each sequence's keys and values in shuffled, non-contiguous
    blocks (or in tables[s], a list of block ids per sequence, where given); every slot that
    no sequence owns is NaN, so reading one shows up."""
    blocks_per_seq = [math.ceil(n / page_size) for n in seq_lens]
    num_blocks = 2 * sum(blocks_per_seq) + 3
    if tables is not None:
        num_blocks = max(max(table) for table in tables) + 3
    order = torch.randperm(num_blocks, generator=generator)
    max_blocks = max(blocks_per_seq) + 2
    block_tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=generator,
                                 dtype=torch.int32)
    cache_shape = (num_blocks, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    used = 0
    for s, (seq_len, count) in enumerate(zip(seq_lens, blocks_per_seq)):
        blocks = order[used:used + 2 * count:2]
        used += 2 * count
        if tables is not None:
            blocks = torch.tensor(tables[s][:count])
        block_tables[s, :count] = blocks.to(torch.int32)
        positions = torch.arange(seq_len)
        slots = blocks[positions // page_size] * page_size + positions % page_size
        shape = (seq_len, num_kv_heads, head_dim)
        k_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(shape, generator=generator).to(dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(shape, generator=generator).to(dtype)
    total = sum(query_lens)
    q = torch.randn(total, num_q_heads, head_dim, generator=generator).to(dtype)
    query_start_loc = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    return {
        "q": q.to(device), "k_cache": k_cache.to(device), "v_cache": v_cache.to(device),
        "block_tables": block_tables.to(device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "query_start_loc": query_start_loc.to(device),
        "scale": head_dim ** -0.5,
    }
