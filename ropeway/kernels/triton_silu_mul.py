"""Triton silu(gate) * up in one launch: the MLP's activation between its two GEMMs.

Unfused it is three launches (SiLU, multiply, and a copy from the chunk views) with an
[T, I] intermediate written and read back. Here each program handles one token and a
block of BLOCK columns: it reads BLOCK gate and BLOCK up values and writes BLOCK outputs,
so the grid (T, cdiv(I, BLOCK)) keeps a batch-1 decode spread over many SMs. Math in fp32,
one rounding to the input dtype on store (the reference rounds after SiLU and again after
the product, so low-precision results may differ by an ulp).
"""

import torch
import triton
import triton.language as tl

from .triton_launch import use_pdl, wait_for_previous_kernel


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_xt, stride_xc, stride_ot, intermediate,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    row = x_ptr + token * stride_xt
    gate = tl.load(row + cols * stride_xc, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + (cols + intermediate) * stride_xc, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + token * stride_ot + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(gate_up: torch.Tensor, block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """block and num_warps are exposed for the tuning sweep in benchmarks/kernels.py."""
    num_tokens, width = gate_up.shape
    intermediate = width // 2
    out = torch.empty((num_tokens, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0 or intermediate == 0:
        return out
    block = min(block, triton.next_power_of_2(intermediate))
    pdl = use_pdl(gate_up)
    _silu_mul_kernel[(num_tokens, triton.cdiv(intermediate, block))](
        gate_up, out, gate_up.stride(0), gate_up.stride(1), out.stride(0), intermediate,
        BLOCK=block, PDL=pdl, num_warps=num_warps, launch_pdl=pdl)
    return out
