"""Triton y = x @ W.T for decode batches of 1..16 rows: a weight-streaming GEMM.

At batch 1..16 a decode step's linear layers read every weight once and do next to no math,
so their floor is weight bytes over memory bandwidth. Each program owns BLOCK_N output
columns (BLOCK_N rows of W, contiguous along K) and one of SPLIT_K slices of K, and streams
those rows in [BLOCK_N, BLOCK_K] tiles; the few rows of x are re-read per tile from L1/L2.

- One row (M = 1): multiply and add on CUDA cores into a [BLOCK_N, BLOCK_K] fp32 tile,
  summed along K once at the end (no cross-thread reduction inside the loop).
- 2..16 rows: tensor-core dots of the W tile (left operand, so BLOCK_N fills the MMA's M
  side) with x padded to 16 rows.
- SPLIT_K > 1 puts more programs on the GPU when N alone gives too few (4096-wide outputs
  at BLOCK_N = 16 are 256 programs for 132 SMs): each slice writes an fp32 partial
  [SPLIT_K, M, N] and a second kernel sums them, adds the bias and casts. No atomics, so the
  result does not depend on scheduling, and no buffer to zero first.

Everything is decided on the host from shapes alone and the output and partials are
allocated with torch.empty, so a call can be captured in a CUDA graph (after one eager
call has compiled the kernel for its config).
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16


@dataclass(frozen=True)
class LinearConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


@triton.jit
def _skinny_linear_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, k_per_split,
                          stride_xm, stride_wn, stride_om, stride_split,
                          HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    # Columns past N re-read row N - 1 instead of masking, so W loads stay unpredicated;
    # their results are never stored.
    w_rows = (offs_n % N).to(tl.int64)
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + (k_begin + offs_k)[None, :]
    n_mask = offs_n < N
    out_base = out_ptr + split.to(tl.int64) * stride_split
    if BLOCK_M == 1:
        x_ptrs = x_ptr + k_begin + offs_k
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in range(k_begin, k_end, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                xk = tl.load(x_ptrs)
            else:
                k_mask = k + offs_k < K
                w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
                xk = tl.load(x_ptrs, mask=k_mask, other=0.0)
            acc += w.to(tl.float32) * xk.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y = tl.sum(acc, axis=1)
        if not PARTIAL:
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            y = y.to(out_ptr.dtype.element_ty)
        tl.store(out_base + offs_n, y, mask=n_mask)
    else:
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_begin + offs_k)[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k in range(k_begin, k_end, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs)
                xk = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
            else:
                k_mask = k + offs_k < K
                w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
                xk = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(w, tl.trans(xk), acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        y = acc
        if not PARTIAL:
            if HAS_BIAS:
                y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
            y = y.to(out_ptr.dtype.element_ty)
        out_ptrs = out_base + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(out_ptrs, y, mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, N, stride_pm, stride_split, stride_om,
                       SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    ptrs = partial_ptr + row * stride_pm + offs
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ptrs + s * stride_split, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Candidate tiles, swept by benchmarks/skinny_gemm.py. A row of W is read BLOCK_K elements
# at a time: 256 bf16 = 512 contiguous bytes, 16 bytes per thread per row and tile.
ROW_CANDIDATES = (
    LinearConfig(16, 256, 1, 4, 1),
    LinearConfig(16, 512, 1, 4, 1),
    LinearConfig(32, 256, 1, 4, 1),
    LinearConfig(32, 256, 1, 8, 2),
    LinearConfig(64, 128, 1, 4, 1),
)
DOT_CANDIDATES = (
    LinearConfig(16, 256, 1, 4, 3),
    LinearConfig(32, 256, 1, 4, 3),
    LinearConfig(64, 128, 1, 4, 4),
    LinearConfig(64, 256, 1, 8, 3),
    LinearConfig(128, 128, 1, 8, 3),
)
SPLIT_CANDIDATES = (1, 2, 4, 8)

# Enough resident programs per SM to keep several tiles of loads in flight on each.
PROGRAMS_PER_SM = 4
# A K slice keeps at least this many columns, so the fp32 partials (SPLIT_K * M * N * 4
# bytes) stay a few percent of the weight bytes they replace.
MIN_SPLIT_COLUMNS = 1024


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def choose_split(n: int, k: int, block_n: int, num_sms: int) -> int:
    """Split K in two until the grid has PROGRAMS_PER_SM programs per SM or the slices would
    get shorter than MIN_SPLIT_COLUMNS."""
    tiles = triton.cdiv(n, block_n)
    split = 1
    while tiles * split < PROGRAMS_PER_SM * num_sms and k // (2 * split) >= MIN_SPLIT_COLUMNS:
        split *= 2
    return split


def choose_config(m: int, n: int, k: int, num_sms: int) -> LinearConfig:
    """The first candidate tile of the row count's path, with choose_split's K split."""
    base = ROW_CANDIDATES[0] if m == 1 else DOT_CANDIDATES[0]
    return LinearConfig(base.block_n, base.block_k, choose_split(n, k, base.block_n, num_sms),
                        base.num_warps, base.num_stages)


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         config: LinearConfig | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16, unit stride along K) @ weight[N, K].T (+ bias [N]), fp32
    accumulation, output [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    assert m <= MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if config is None:
        config = choose_config(m, n, k, _sm_count(x.device))
    # Slices are whole tiles, and none is empty (an empty one would still write zeros).
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), config.block_k) * config.block_k
    split_k = triton.cdiv(k, k_per_split)
    partial = split_k > 1
    target = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if partial else out
    bias_arg = x if bias is None else bias
    _skinny_linear_kernel[(triton.cdiv(n, config.block_n), split_k)](
        x, weight, bias_arg, target, m, n, k, k_per_split,
        x.stride(0), weight.stride(0), target.stride(-2), m * n if partial else 0,
        HAS_BIAS=bias is not None and not partial, PARTIAL=partial, EVEN_K=k % config.block_k == 0,
        BLOCK_M=1 if m == 1 else 16, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if partial:
        block = 1024
        _sum_splits_kernel[(m, triton.cdiv(n, block))](
            target, bias_arg, out, n, target.stride(1), target.stride(0), out.stride(0),
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out
