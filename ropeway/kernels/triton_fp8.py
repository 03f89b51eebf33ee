"""Quantizing to the fp8 KV cache inside Triton kernels, with fp8_kv.quantize_fp8's arithmetic.

Values are rounded to e4m3 (nearest, ties to even) in fp32 before the store's cast, which then
is exact: the same bits on a GPU as in Triton's interpreter, whose fp32 -> fp8 cast does not
carry a rounding up into the exponent (125.7 became 64, not 128).
"""

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)


@triton.jit
def fp8_scales(amax):
    """Per-row scales max|x| / 448, and the divisor to quantize by (1 where a row is all zeros)."""
    scales = amax / FP8_MAX
    return scales, tl.where(scales > 0, scales, 1.0)


@triton.jit
def round_to_e4m3(y):
    """fp32 y (|y| <= 448) rounded to the nearest e4m3 value, ties to even."""
    # Normal range: keep 3 of fp32's 23 mantissa bits, rounding on the bits below (a carry
    # moves into the exponent as it should).
    bits = y.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    # Below 2**-6 e4m3 is subnormal, in steps of 2**-9: adding 1.5 * 2**14 (an fp32 ulp of 2**-9)
    # and taking it away again rounds to those steps.
    subnormal = (y + 24576.0) - 24576.0
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


@triton.jit
def to_fp8_range(x, divisor):
    """x [ROWS, COLS] fp32 divided by its row's divisor [ROWS], clamped to e4m3's finite range
    and rounded to e4m3 values."""
    y = x / divisor[:, None]
    return round_to_e4m3(tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX))


@triton.jit
def quantize_halves(x1, x2):
    """Rows split in two halves [ROWS, BLOCK_HALF] (zero past the row's end) -> the halves in
    fp8 range and each row's scale."""
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x1f), 1), tl.max(tl.abs(x2f), 1))
    scales, divisor = fp8_scales(amax)
    return to_fp8_range(x1f, divisor), to_fp8_range(x2f, divisor), scales
