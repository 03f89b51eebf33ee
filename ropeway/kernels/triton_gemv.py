"""Triton matrix-vector product for one-token steps (batch-1 decode): out = x @ W.T (+ bias).

A batch-1 decode step is a chain of weight reads: every GEMM reads its whole matrix to
produce one row. cuBLAS runs the smaller shapes at 62-75% of the copy bandwidth, and adds
a split-K reduction launch to two of them. Here each program owns BLOCK_N output columns,
streams their weight rows in BLOCK_K slices (requesting the next slice before it multiplies
the current one), and reduces once at the end:
- the first weight slice is requested before waiting for the kernel ahead (PDL): weights
  never depend on it, so their first round trip overlaps that kernel's tail;
- SILU_MUL reads a fused [gate; up] matrix and writes silu(gate) * up, so the MLP's
  activation costs no launch and no [1, 2I] round trip through memory (gate and up are
  rounded to the output dtype first, as the unfused GEMM + silu_mul would);
- ROPE is the qkv projection with rotary_write_kv as its epilogue: each program owns a few
  dimensions of one head's first half and their partners in the second half, so it can
  rotate them itself, and it stores k and v heads to the token's cache slot. That saves the
  rotary + KV write launch (4.4 us a layer on the H200, most of it latency).
"""

import torch
import triton
import triton.language as tl

from .triton_launch import use_pdl, wait_for_previous_kernel
from .triton_rotary import cos_sin_of


@triton.jit
def _rope_write_kv(x1, x2, cols, out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, positions_ptr,
                   seq_index_ptr, inv_freq_ptr, factor_ptr, stride_kcb, stride_kco, stride_kch,
                   stride_vcb, stride_vco, stride_vch, stride_freq, num_q_heads, num_kv_heads, page_size,
                   HEAD_DIM: tl.constexpr):
    """The epilogue of the one-token qkv projection: x1, x2 (fp32 sums) are dimensions `cols`
    of one head's first half and their partners in its second half. As linear then
    rotary_write_kv would: round them to the output dtype, rotate q and k heads (the token's
    position under its sequence's RoPE row), store them, and copy k and v heads to the
    token's cache slot (none for a negative slot)."""
    HALF: tl.constexpr = HEAD_DIM // 2
    dtype = out_ptr.dtype.element_ty
    x1 = x1.to(dtype).to(tl.float32)
    x2 = x2.to(dtype).to(tl.float32)
    head = cols // HEAD_DIM                   # the same head for every column of the program
    dims = cols % HEAD_DIM
    is_rotated = head < num_q_heads + num_kv_heads
    row = tl.load(seq_index_ptr).to(tl.int64)
    cos, sin = cos_sin_of(tl.load(positions_ptr), tl.load(inv_freq_ptr + row * stride_freq + dims),
                          tl.load(factor_ptr + row))
    r1 = tl.where(is_rotated, x1 * cos - x2 * sin, x1).to(dtype)
    r2 = tl.where(is_rotated, x2 * cos + x1 * sin, x2).to(dtype)
    tl.store(out_ptr + cols, r1)
    tl.store(out_ptr + cols + HALF, r2)
    slot = tl.load(slot_mapping_ptr).to(tl.int64)
    kv_head = (head - num_q_heads) % num_kv_heads
    # Masks from comparisons only (the interpreter rejects a scalar & a tensor).
    to_k = (head >= num_q_heads) & is_rotated & (dims < tl.where(slot >= 0, HEAD_DIM, 0))
    to_v = (head >= num_q_heads + num_kv_heads) & (dims < tl.where(slot >= 0, HEAD_DIM, 0))
    block, offset = slot // page_size, slot % page_size
    k_slot = k_cache_ptr + block * stride_kcb + offset * stride_kco + kv_head * stride_kch + dims
    v_slot = v_cache_ptr + block * stride_vcb + offset * stride_vco + kv_head * stride_vch + dims
    tl.store(k_slot, r1.to(k_cache_ptr.dtype.element_ty), mask=to_k)
    tl.store(k_slot + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=to_k)
    tl.store(v_slot, r1.to(v_cache_ptr.dtype.element_ty), mask=to_v)
    tl.store(v_slot + HALF, r2.to(v_cache_ptr.dtype.element_ty), mask=to_v)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, stride_w,
                 k_cache_ptr, v_cache_ptr, slot_mapping_ptr, positions_ptr, seq_index_ptr, inv_freq_ptr,
                 factor_ptr, stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
                 stride_freq, num_q_heads, num_kv_heads, page_size,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SILU_MUL: tl.constexpr, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr):
    # Paired variants stream two row sets at once: gate and up rows (SILU_MUL), or each
    # head's first-half rows and their second-half partners (ROPE), to combine them at the end.
    PAIRED: tl.constexpr = SILU_MUL or ROPE
    HALF: tl.constexpr = HEAD_DIM // 2
    if ROPE:
        # Program p owns BLOCK_N dimensions of one head's first half and their partners.
        blocks_per_half: tl.constexpr = HALF // BLOCK_N
        cols = ((tl.program_id(0) // blocks_per_half) * HEAD_DIM + (tl.program_id(0) % blocks_per_half) * BLOCK_N
                + tl.arange(0, BLOCK_N))
        partner_offset = HALF
    else:
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        partner_offset = N
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w + ks[None, :]
    partner_rows = w_ptr + (cols.to(tl.int64) + partner_offset)[:, None] * stride_w + ks[None, :]
    w = tl.load(rows, mask=col_mask[:, None] & (ks < K)[None, :], other=0.0)
    if PAIRED:
        w_partner = tl.load(partner_rows, mask=col_mask[:, None] & (ks < K)[None, :], other=0.0)
    wait_for_previous_kernel(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_partner = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + k0 + ks, mask=k0 + ks < K, other=0.0).to(tl.float32)[None, :]
        next_mask = col_mask[:, None] & (k0 + BLOCK_K + ks < K)[None, :]
        w_next = tl.load(rows + k0 + BLOCK_K, mask=next_mask, other=0.0)
        acc += w.to(tl.float32) * x
        w = w_next
        if PAIRED:
            partner_next = tl.load(partner_rows + k0 + BLOCK_K, mask=next_mask, other=0.0)
            acc_partner += w_partner.to(tl.float32) * x
            w_partner = partner_next
    out = tl.sum(acc, 1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if SILU_MUL:
        gate = out.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = tl.sum(acc_partner, 1).to(out_ptr.dtype.element_ty).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
    if ROPE:
        partner = tl.sum(acc_partner, 1)
        if HAS_BIAS:
            partner += tl.load(bias_ptr + cols + HALF, mask=col_mask, other=0.0).to(tl.float32)
        _rope_write_kv(out, partner, cols, out_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, positions_ptr,
                       seq_index_ptr, inv_freq_ptr, factor_ptr, stride_kcb, stride_kco, stride_kch,
                       stride_vcb, stride_vco, stride_vch, stride_freq, num_q_heads, num_kv_heads, page_size,
                       HEAD_DIM)
    else:
        tl.store(out_ptr + cols, out.to(out_ptr.dtype.element_ty), mask=col_mask)


def gemv_config(n: int, k: int, silu_mul: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): the sweep's best at each of Llama-3-8B's decode shapes
    on an H200 (`benchmarks/profile_gpu_step.py --gemms`, timed inside CUDA graphs), as a rule.
    Narrow column blocks give every SM several programs; long rows want long slices."""
    if silu_mul:
        return 4, 256, 4   # [gate; up] 2x14336 x 4096: two weight streams per program
    if n >= 65536:
        return 4, 1024, 4  # lm_head
    if n <= 4096 or k >= 8192:
        return 8, 1024, 4  # o, down
    return 8, 512, 4       # qkv


def gemv_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                silu_mul: bool = False, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [1, K] (unit stride along K), weight [N, K] contiguous: x @ weight.T + bias, [1, N].
    With silu_mul, weight is [gate; up] ([2I, K]) and the result is silu(gate) * up, [1, I]."""
    rows, k = x.shape
    assert rows == 1 and x.stride(1) == 1 and weight.is_contiguous() and weight.shape[1] == k
    n = weight.shape[0] // 2 if silu_mul else weight.shape[0]
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps = config or gemv_config(n, k, silu_mul)
    _launch(x, weight, bias, out, n, triton.cdiv(n, block_n), (x,) * 7 + (0,) * 10,
            block_n, block_k, num_warps, silu_mul=silu_mul, rope=False, head_dim=2)
    return out


def rope_pairs_per_program(head_dim: int) -> int | None:
    """Each program of the rotary variant owns this many (first-half, partner) dimension
    pairs of one head: the 8 rows a qkv program streams in gemv_config. None: the head's
    half does not split into such blocks."""
    half = head_dim // 2
    pairs = 4
    return pairs if head_dim % 2 == 0 and half % pairs == 0 else None


def gemv_rotary_write_kv_triton(x: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                                num_q_heads: int, num_kv_heads: int, head_dim: int,
                                k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                positions: torch.Tensor, seq_index: torch.Tensor, inv_freq: torch.Tensor,
                                attention_factor: torch.Tensor) -> torch.Tensor:
    """One token's qkv projection, [1, (Hq + 2 Hkv) D], with RoPE applied to its q and k
    heads and k and v copied to the token's cache slot: linear(x, qkv_weight, qkv_bias), then
    rotary_write_kv on its q, k, v views, in one launch."""
    rows, k = x.shape
    n = qkv_weight.shape[0]
    assert rows == 1 and x.stride(1) == 1 and qkv_weight.is_contiguous() and qkv_weight.shape[1] == k
    assert n == (num_q_heads + 2 * num_kv_heads) * head_dim and inv_freq.stride(1) == 1
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    pairs = rope_pairs_per_program(head_dim)
    assert pairs is not None
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _, block_k, num_warps = gemv_config(n, k)
    rope_args = (k_cache, v_cache, slot_mapping, positions, seq_index, inv_freq, attention_factor,
                 *k_cache.stride()[:3], *v_cache.stride()[:3], inv_freq.stride(0),
                 num_q_heads, num_kv_heads, k_cache.shape[1])
    _launch(x, qkv_weight, qkv_bias, out, n, n // 2 // pairs, rope_args, pairs, block_k, num_warps,
            silu_mul=False, rope=True, head_dim=head_dim)
    return out


def _launch(x, weight, bias, out, n, num_programs, rope_args, block_n, block_k, num_warps,
            silu_mul: bool, rope: bool, head_dim: int) -> None:
    pdl = use_pdl(x)
    _gemv_kernel[(num_programs,)](
        x, weight, weight if bias is None else bias, out, n, x.shape[1], weight.stride(0), *rope_args,
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None, SILU_MUL=silu_mul, ROPE=rope,
        HEAD_DIM=head_dim, PDL=pdl, num_warps=num_warps, launch_pdl=pdl)
