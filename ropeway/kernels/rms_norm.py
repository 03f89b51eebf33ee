"""RMSNorm, alone and fused with the residual add that precedes it in a decoder layer."""

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As HF's LlamaRMSNorm: normalise in fp32, cast back, then scale.
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_reference(delta: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """residual += delta (in place, rounded to residual's dtype); returns rms_norm(residual)."""
    residual.add_(delta)
    return rms_norm_reference(residual, weight, eps)
