"""SiLU-gated product of the MLP: silu(gate) * up from the fused gate/up projection."""

import torch
import torch.nn.functional as F


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate columns first, then up) -> silu(gate) * up [T, I].

    The exact torch expression the model used before the fused kernel: each op rounds to
    the input dtype, so CPU results are unchanged."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
