"""RoPE and the paged KV write on CPU, fast: the same contract as rotary_write_kv_reference.

The reference recomputes cos/sin in every layer, rotates into new tensors joined by a cat and
copied back, and picks the non-padding tokens with a boolean index (two more gathers). Here
the layer-independent part (cos/sin, the flat cache slots) is worked out once per step in a
CpuRotaryPlan; each layer then rotates q and k in place and writes k and v with index_copy_,
which on CPU, unlike indexing, never wakes the thread pool for a handful of rows (on a busy
2-core machine each wake-up of a second thread can cost milliseconds). fp32 results are
bit-identical to the reference: each product is rounded as there, and only the cat and copy
are gone.
"""

from dataclasses import dataclass

import torch

from .rotary import rope_cos_sin, rotate_by


@dataclass
class CpuRotaryPlan:
    cos: torch.Tensor               # [T, 1, D/2] fp32, attention factor included
    sin: torch.Tensor
    tokens: torch.Tensor | None     # rows of q/k/v to write; None: all (no padding)
    slots: torch.Tensor             # [tokens] flat cache slots


def plan_cpu_rotary(positions, seq_index, inv_freq, attention_factor, slot_mapping) -> CpuRotaryPlan:
    """The layer-independent part of rotary_write_kv_cpu for one batch."""
    rows = seq_index.long()
    cos, sin = rope_cos_sin(positions, inv_freq[rows], attention_factor[rows])
    slots = slot_mapping.long()
    keep = slots >= 0
    tokens = None
    if not bool(keep.all()):
        tokens = keep.nonzero().flatten()
        slots = slots[tokens]
    return CpuRotaryPlan(cos[:, None, :], sin[:, None, :], tokens, slots)


def rotary_write_kv_cpu(q, k, v, k_cache, v_cache, plan: CpuRotaryPlan) -> None:
    """As rotary_write_kv_reference (rotary_write_kv.py), with this batch's plan_cpu_rotary."""
    _rotate_in_place(q, plan.cos, plan.sin)
    _rotate_in_place(k, plan.cos, plan.sin)
    num_kv_heads, head_dim = k_cache.shape[2:]
    if plan.tokens is not None:
        k, v = k.index_select(0, plan.tokens), v.index_select(0, plan.tokens)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, plan.slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, plan.slots, v.to(v_cache.dtype))


def _rotate_in_place(x, cos, sin) -> None:
    if x.dtype != torch.float32:  # the math is fp32 whatever x holds: the reference's way
        x.copy_(rotate_by(x, cos[:, 0], sin[:, 0]))
        return
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    x1_sin, x2_sin = x1 * sin, x2 * sin
    x1.mul_(cos).sub_(x2_sin)  # x1·cos − x2·sin
    x2.mul_(cos).add_(x1_sin)  # x2·cos + x1·sin
