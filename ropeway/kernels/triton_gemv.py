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
  rounded to the output dtype first, as the unfused GEMM + silu_mul would).
"""

import torch
import triton
import triton.language as tl

from .triton_launch import use_pdl, wait_for_previous_kernel


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, N, K, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SILU_MUL: tl.constexpr, PDL: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w + ks[None, :]
    up_rows = w_ptr + (cols.to(tl.int64) + N)[:, None] * stride_w + ks[None, :]  # SILU_MUL: up's rows
    w = tl.load(rows, mask=col_mask[:, None] & (ks < K)[None, :], other=0.0)
    if SILU_MUL:
        w_up = tl.load(up_rows, mask=col_mask[:, None] & (ks < K)[None, :], other=0.0)
    wait_for_previous_kernel(PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + k0 + ks, mask=k0 + ks < K, other=0.0).to(tl.float32)[None, :]
        next_mask = col_mask[:, None] & (k0 + BLOCK_K + ks < K)[None, :]
        w_next = tl.load(rows + k0 + BLOCK_K, mask=next_mask, other=0.0)
        acc += w.to(tl.float32) * x
        w = w_next
        if SILU_MUL:
            up_next = tl.load(up_rows + k0 + BLOCK_K, mask=next_mask, other=0.0)
            acc_up += w_up.to(tl.float32) * x
            w_up = up_next
    out = tl.sum(acc, 1)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    if SILU_MUL:
        gate = out.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = tl.sum(acc_up, 1).to(out_ptr.dtype.element_ty).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
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
    pdl = use_pdl(x)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, weight if bias is None else bias, out, n, k, weight.stride(0),
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None, SILU_MUL=silu_mul, PDL=pdl,
        num_warps=num_warps, launch_pdl=pdl)
    return out
