"""Triton block relevance: two launches in place of a dozen torch operations (each costs the
host of an eager prompt step ~10-40 us on the H200's machines; retrieval scores before every
chunk of a long prompt).

The first kernel takes ROWS rows of best logits (one layer, KV head, query row and head of the
group each) and finds each row's max and sum of exponentials over all blocks. The second takes
BLOCK_N blocks and walks the layers in order (so the sum is the same every run): a layer's rows
as one tile [heads, query rows, group, blocks], shares summed over heads and group, the scoring
rows' max over the baseline rows' mean. Same semantics as block_relevance_reference.
"""

import torch
import triton
import triton.language as tl

ROWS = 16
BLOCK_N_STATS = 256
BLOCK_N = 16
TILE = 8192


@triton.jit
def _row_stats_kernel(best_ptr, max_ptr, sum_ptr, num_rows, num_blocks,
                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < num_rows
    running_max = tl.full((ROWS,), float("-inf"), tl.float32)
    running_sum = tl.zeros((ROWS,), tl.float32)
    for first in range(0, num_blocks, BLOCK_N):
        blocks = first + tl.arange(0, BLOCK_N)
        x = tl.load(best_ptr + rows.to(tl.int64)[:, None] * num_blocks + blocks[None, :],
                    mask=row_mask[:, None] & (blocks < num_blocks)[None, :], other=float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # (padding rows stay empty)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(x - safe_max[:, None]), axis=1)
        running_max = new_max
    tl.store(max_ptr + rows, running_max, mask=row_mask)
    tl.store(sum_ptr + rows, running_sum, mask=row_mask)


@triton.jit
def _relevance_kernel(best_ptr, max_ptr, sum_ptr, out_ptr, num_layers, num_kv_heads, num_rows, group,
                      num_queries, num_blocks, floor, weight,
                      HEADS: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_BASELINE: tl.constexpr):
    blocks = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    block_mask = blocks < num_blocks
    # A layer's tile: [HEADS, ROWS, GROUP] flattened, row index ((head * R) + row) * G + member.
    i = tl.arange(0, HEADS * ROWS * GROUP)
    head, row, member = i // (ROWS * GROUP), (i // GROUP) % ROWS, i % GROUP
    valid = (head < num_kv_heads) & (row < num_rows) & (member < group)
    query_rows = tl.arange(0, ROWS)
    scoring = query_rows < num_queries
    baseline = (query_rows >= num_queries) & (query_rows < num_rows)
    total = tl.zeros((BLOCK_N,), tl.float32)
    for layer in range(num_layers):
        flat = ((layer * num_kv_heads + head) * num_rows + row) * group + member
        row_max = tl.load(max_ptr + flat, mask=valid, other=0.0)
        row_sum = tl.load(sum_ptr + flat, mask=valid, other=1.0)
        x = tl.load(best_ptr + flat.to(tl.int64)[:, None] * num_blocks + blocks[None, :],
                    mask=valid[:, None] & block_mask[None, :], other=float("-inf"))
        shares = tl.exp(x - row_max[:, None]) / row_sum[:, None]
        per_row = tl.sum(tl.sum(tl.reshape(shares, (HEADS, ROWS, GROUP, BLOCK_N)), axis=2), axis=0)  # [ROWS, N]
        relevance = tl.max(tl.where(scoring[:, None], per_row, 0.0), axis=0)
        if HAS_BASELINE:
            prior = tl.sum(tl.where(baseline[:, None], per_row, 0.0), axis=0) / (num_rows - num_queries)
            relevance = relevance / (prior + floor)
        total += relevance
    tl.store(out_ptr + blocks, total * weight, mask=block_mask)


def block_relevance_triton(best: torch.Tensor, num_queries: int, floor: float, weight: float) -> torch.Tensor:
    """As block_relevance_reference."""
    num_layers, num_kv_heads, num_rows, group, num_blocks = best.shape
    best = best.contiguous()
    out = torch.empty(num_blocks, dtype=torch.float32, device=best.device)
    if num_blocks == 0:
        return out
    total_rows = num_layers * num_kv_heads * num_rows * group
    row_max = torch.empty(total_rows, dtype=torch.float32, device=best.device)
    row_sum = torch.empty_like(row_max)
    _row_stats_kernel[(triton.cdiv(total_rows, ROWS),)](best, row_max, row_sum, total_rows, num_blocks,
                                                        ROWS=ROWS, BLOCK_N=BLOCK_N_STATS, num_warps=4)
    heads, rows, members = (triton.next_power_of_2(x) for x in (num_kv_heads, num_rows, group))
    # A layer's tile is heads * rows * members by block_n: at most TILE values (registers), so
    # models with more heads per layer take fewer blocks per program.
    block_n = max(1, min(BLOCK_N, TILE // (heads * rows * members)))
    _relevance_kernel[(triton.cdiv(num_blocks, block_n),)](
        best, row_max, row_sum, out, num_layers, num_kv_heads, num_rows, group, num_queries, num_blocks,
        floor, weight, HEADS=heads, ROWS=rows, GROUP=members, BLOCK_N=block_n,
        HAS_BASELINE=num_rows > num_queries, num_warps=4)
    return out
