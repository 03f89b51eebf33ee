"""The fp8 KV cache inside Triton kernels: quantizing with fp8_kv.quantize_fp8's arithmetic,
and widening fp8 to fp16 for attention's tensor-core dots.

Values are rounded to e4m3 (nearest, ties to even) in fp32 before the store's cast, which then
is exact: the same bits on a GPU as in Triton's interpreter, whose fp32 -> fp8 cast does not
carry a rounding up into the exponent (125.7 became 64, not 128).

Widening: every e4m3 value is exact in fp16, and sm_89+ converts two of them per instruction
(cvt.rn.f16x2.e4m3x2). Triton's own cast to fp16 uses it, but Triton moves the cast after the
load from shared memory into the dot's operand layout; for the values of P·V, whose rows are
the reduced dimension, that layout gathers the 8-bit elements from shared memory one byte at a
time (sm_90 SASS of the decode kernel: 64 byte loads per thread per 64-key tile, 2.2x the bf16
kernel's instructions per key). The same conversion written as inline PTX is opaque to that
rewrite: it runs on whole 16-byte rows in registers, and the fp16 tile takes the 16-bit path
(ldmatrix.trans) into the dot. The interpreter cannot run PTX, hence the choice.
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


@triton.jit
def e4m3_to_f16(x, INLINE_PTX: tl.constexpr):
    """fp8 e4m3 tensor -> fp16 (exact). INLINE_PTX: by cvt.rn.f16x2.e4m3x2 in inline PTX (GPU
    only), converted where the values are loaded; else by Triton's cast."""
    if INLINE_PTX:
        # Four bytes per 32-bit register in, two fp16 pairs out; the low half of each result
        # holds the lower-addressed element.
        return tl.inline_asm_elementwise(
            asm="{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; "
                "cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            constraints="=r,=r,r", args=[x.to(tl.uint8, bitcast=True)], dtype=tl.float16,
            is_pure=False, pack=4)
    else:
        return x.to(tl.float16)
