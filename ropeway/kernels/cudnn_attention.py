"""Long prefill chunks through cuDNN's fused attention, on keys gathered out of the pages.

A chunk of a long prompt attends to the cached prefix (every key visible) and, causally, to
itself. On an H200, cuDNN's fused kernel (which torch's SDPA wraps) runs both parts at
~600 TFLOP/s against the Triton paged kernel's ~420 (benchmarks/prefill_vs_sdpa.py); it
cannot read pages, but gathering a 32k sequence's pages costs under 0.1 ms per layer. A single
call cannot take the chunk's mask (query i sees keys up to prefix + i: cuDNN gets that as a
dense bias and runs slower than Triton), so the chunk is attended twice and the two halves
merged by their log-sum-exps:
- queries x prefix keys, no mask;
- queries x the chunk's own keys, causal (a square, upper-left aligned mask).
GQA stays native (cuDNN reads each KV head for its group of query heads). An fp8 cache's pages
are dequantized to the queries' dtype as they are gathered (the gathered copy is in that dtype
either way).

ROPEWAY_CUDNN_PREFILL=0 keeps such chunks in the Triton kernel (for A/B timings).
"""

import os

import torch
import triton
import triton.language as tl

from .fp8_kv import read_vectors

_DISABLED = os.environ.get("ROPEWAY_CUDNN_PREFILL") == "0"
# Shapes cuDNN sees are rounded to these (see chunk_attention).
KEY_GRANULE = 1024
QUERY_GRANULE = 1024

_unsupported: set[tuple] = set()  # (dtype, head_dim) cuDNN refused once: do not ask again


def cudnn_prefill_usable(q: torch.Tensor) -> bool:
    return (not _DISABLED and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
            and torch.backends.cudnn.is_available() and (q.dtype, q.shape[-1]) not in _unsupported)


@triton.jit
def _merge_two_kernel(o1_ptr, lse1_ptr, o2_ptr, lse2_ptr, out_ptr, num_rows,
                      s1_h, s1_t, s2_h, s2_t, l1_h, l1_t, l2_h, l2_t, so_t, so_h,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[t, h] = softmax-weighted mix of two partial attentions over disjoint key sets."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < num_rows
    dims = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (dims < HEAD_DIM)[None, :]
    lse1 = tl.load(lse1_ptr + head * l1_h + rows * l1_t, mask=row_mask, other=0.0)
    lse2 = tl.load(lse2_ptr + head * l2_h + rows * l2_t, mask=row_mask, other=0.0)
    # weight of part 1 = e^lse1 / (e^lse1 + e^lse2); -inf on either side gives 0 or 1.
    w1 = 1.0 / (1.0 + tl.exp(lse2 - lse1))
    o1 = tl.load(o1_ptr + head * s1_h + rows[:, None] * s1_t + dims[None, :], mask=mask, other=0.0)
    o2 = tl.load(o2_ptr + head * s2_h + rows[:, None] * s2_t + dims[None, :], mask=mask, other=0.0)
    out = o2.to(tl.float32) + (o1.to(tl.float32) - o2.to(tl.float32)) * w1[:, None]
    tl.store(out_ptr + rows[:, None] * so_t + head * so_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """q [T, H, D], k/v [L, Hkv, D] -> (out [1, H, T, D], natural-log lse [1, H, T, 1])."""
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, tokens, D] views
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
    return out, lse


def _padded(t: torch.Tensor, front: int, total: int) -> torch.Tensor:
    """t with `front` zero rows before it and zero rows after, `total` rows in all."""
    if front == 0 and total == t.shape[0]:
        return t
    padded = t.new_zeros((total, *t.shape[1:]))
    padded[front : front + t.shape[0]] = t
    return padded


def _round_up(n: int, granule: int) -> int:
    return triton.cdiv(n, granule) * granule


def chunk_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, context_len: int,
                    scale: float, out: torch.Tensor, attend=_cudnn) -> None:
    """Attention of a chunk's queries q [n, H, D], which follow context_len cached tokens,
    over keys/values [context_len + n, Hkv, D], written into out [n, H, D].

    cuDNN builds an execution plan per shape (~75 ms each on the H200), so the calls only
    see shapes from a small set: prefix lengths in multiples of KEY_GRANULE and query counts
    in multiples of QUERY_GRANULE. The prefix keys past the last whole granule join the
    chunk's own causal part: with that many zero query rows put in front, query i of the
    chunk sits on the square mask's row lead + i and sees those keys and its own keys up to
    i, as it should. Zero rows and keys appended to round a size up are seen by no real
    query (or only by rows that are dropped)."""
    n = q.shape[0]
    seq_len = context_len + n
    aligned = context_len // KEY_GRANULE * KEY_GRANULE
    lead = context_len - aligned
    own = lead + n
    own_total = _round_up(own, QUERY_GRANULE)
    own_out, own_lse = attend(_padded(q, lead, own_total), _padded(keys[aligned:seq_len], 0, own_total),
                              _padded(values[aligned:seq_len], 0, own_total), True, scale)
    o2, l2 = own_out[0][:, lead:own], own_lse[0][:, lead:own]
    if aligned == 0:
        out.copy_(o2.transpose(0, 1))
        return
    prefix_out, prefix_lse = attend(_padded(q, 0, _round_up(n, QUERY_GRANULE)), keys[:aligned],
                                    values[:aligned], False, scale)
    o1, l1 = prefix_out[0][:, :n], prefix_lse[0][:, :n]
    head_dim, block_t = q.shape[2], 64
    _merge_two_kernel[(triton.cdiv(n, block_t), q.shape[1])](
        o1, l1, o2, l2, out, n,
        o1.stride(0), o1.stride(1), o2.stride(0), o2.stride(1),
        l1.stride(0), l1.stride(1), l2.stride(0), l2.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_T=block_t, num_warps=4)


def warm_up(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    """Load cuDNN's attention (its first call takes ~1.3 s) and compile the merge, so the
    first long prompt a server sees does not pay for them."""
    q = torch.zeros(QUERY_GRANULE, num_heads, head_dim, device=device, dtype=dtype)
    keys = torch.zeros(KEY_GRANULE + QUERY_GRANULE, num_kv_heads, head_dim, device=device, dtype=dtype)
    try:
        chunk_attention(q, keys, keys, KEY_GRANULE, head_dim ** -0.5, torch.empty_like(q))
    except RuntimeError:
        _unsupported.add((dtype, head_dim))


def attend_long_chunk(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, context_len: int, scale: float, out: torch.Tensor,
                      attend=_cudnn, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> bool:
    """chunk_attention through cuDNN (or attend: tests pass a plain-torch one) on keys
    gathered from the sequence's pages (block_table is its row); k_scale, v_scale: the
    caches are fp8. False, with nothing written, if cuDNN refuses: the caller uses Triton."""
    seq_len = context_len + q.shape[0]
    pages = block_table[: triton.cdiv(seq_len, k_cache.shape[1])].long()
    keys = read_vectors(k_cache, k_scale, pages, q.dtype).flatten(0, 1)
    values = read_vectors(v_cache, v_scale, pages, q.dtype).flatten(0, 1)
    try:
        chunk_attention(q, keys, values, context_len, scale, out, attend)
    except torch.cuda.OutOfMemoryError:
        return False  # the gathered copies did not fit this time; Triton reads the pages in place
    except RuntimeError:
        _unsupported.add((q.dtype, q.shape[-1]))
        return False
    return True
