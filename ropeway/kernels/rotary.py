"""Rotary position embedding with one row of RoPE parameters per sequence.

Neox / Hugging Face layout: a head vector is split in halves (x1, x2) and rotated as
(x1·cos − x2·sin, x2·cos + x1·sin). GGUF loaders un-permute llama.cpp's interleaved
q/k weights so this layout holds for every model we load.

Angles and cos/sin are computed in fp32 whatever the activation dtype, as HF does.
"""

import torch


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: torch.Tensor):
    """cos/sin [N, D/2] in fp32 for positions [N] under per-token parameter rows
    inv_freq [N, D/2] and attention_factor [N]."""
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)
    factor = attention_factor.to(torch.float32)[:, None]
    return torch.cos(angles) * factor, torch.sin(angles) * factor


def rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, H, D] by per-token cos/sin [N, D/2]; math in fp32, result in x's dtype."""
    half = x.shape[-1] // 2
    xf = x.to(torch.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def apply_rotary_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    seq_index: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_factor: torch.Tensor,
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place.

    positions [T]: each token's position; seq_index [T]: the row of inv_freq [S, D/2] and
    attention_factor [S] (YaRN's mscale, 1.0 otherwise) that the token's sequence uses.
    """
    rows = seq_index.long()
    cos, sin = rope_cos_sin(positions, inv_freq[rows], attention_factor[rows])
    q.copy_(rotate_by(q, cos, sin))
    k.copy_(rotate_by(k, cos, sin))
