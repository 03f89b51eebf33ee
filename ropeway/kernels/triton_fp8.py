"""Quantizing to the fp8 KV cache inside Triton kernels, with fp8_kv.quantize_fp8's arithmetic."""

import triton
import triton.language as tl

FP8_MAX: tl.constexpr = 448.0


@triton.jit
def fp8_scales(amax):
    """Per-row scales max|x| / 448, and the divisor to quantize by (1 where a row is all zeros)."""
    scales = amax / FP8_MAX
    return scales, tl.where(scales > 0, scales, 1.0)


@triton.jit
def to_fp8_range(x, divisor):
    """x [ROWS, COLS] fp32 divided by its row's divisor [ROWS], clamped to e4m3's finite range
    (the store's cast then rounds to nearest)."""
    y = x / divisor[:, None]
    return tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)


@triton.jit
def quantize_halves(x1, x2):
    """Rows split in two halves [ROWS, BLOCK_HALF] (zero past the row's end) -> the halves in
    fp8 range and each row's scale."""
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x1f), 1), tl.max(tl.abs(x2f), 1))
    scales, divisor = fp8_scales(amax)
    return to_fp8_range(x1f, divisor), to_fp8_range(x2f, divisor), scales
