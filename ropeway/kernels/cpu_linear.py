"""Linear layers on CPU through oneDNN, on weights reordered once into its own layout.

torch's F.linear on CPU runs MKL's sgemm. Measured on this project's 2-core AMD EPYC development
machine (fp32, two threads), a decode step's GEMVs read the weights at ~17 GB/s there, of the ~45
GB/s two cores can read; oneDNN's matmul on weights reordered ahead of time (what torch.compile's
CPU freezing uses: `mkldnn._reorder_linear_weight` and `mkldnn._linear_pointwise`) reads them at
~35 GB/s, and a 2,048-token prefill chunk is no slower on it (benchmarks/cpu_vs_transformers.py).

A packed weight is an opaque oneDNN tensor (`is_mkldnn`): `linear` in this package sends those
here. Where oneDNN or its ops are missing, or the dtype is not fp32, weights stay as they are and
F.linear serves. The rounding differs from MKL's by the order of the sums (~1e-6 relative).
"""

import torch


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and not weight.is_mkldnn and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] in oneDNN's layout for linear_packed; the weight itself where it cannot be."""
    return torch.ops.mkldnn._reorder_linear_weight(weight) if can_pack(weight) else weight


def linear_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for a weight from pack_linear_weight; x [T, in] fp32 on CPU."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
