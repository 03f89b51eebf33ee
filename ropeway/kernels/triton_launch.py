"""Programmatic dependent launch (PDL) for the small Triton kernels of a step.

A batch-1 decode step is some 300 kernels of a few microseconds each, so the time between
one kernel's end and the next one's start is a real share of it. On Hopper and later a
kernel launched with PDL may be scheduled before the kernel ahead of it in the stream has
finished. Each kernel here calls wait_for_previous_kernel before touching memory an earlier
kernel may write or read, so it is safe whatever ran before it (a cuBLAS GEMM, a copy,
another Triton kernel): the overlap is the launch and scheduling of its programs, plus, in
the GEMV, its first weight loads (weights never depend on an earlier kernel). Right after
the wait it lets the next PDL kernel be scheduled in turn. Graph capture records the same
dependencies.

ROPEWAY_PDL=0 turns it off (for A/B timings). The interpreter and CPU tensors never use it.
"""

import functools
import os

import torch
import triton
import triton.language as tl

_DISABLED = os.environ.get("ROPEWAY_PDL") == "0" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(tensor: torch.Tensor) -> bool:
    """Whether kernels on this tensor's device launch with PDL (pass as launch_pdl= and PDL=)."""
    if _DISABLED or not tensor.is_cuda:
        return False
    index = tensor.device.index
    return _supports_pdl(torch.cuda.current_device() if index is None else index)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
