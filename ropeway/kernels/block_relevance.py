"""How much each key block matters to the queries that score it, over what ordinary text gives
it: what retrieval ranks archived blocks by (engine/recall.py says why this measure).

From each block's best logits (block_max_logits): per layer, query row and head, a softmax over
the blocks gives each block's share of that head's attention; shares are summed over the heads.
A block's relevance in a layer is the most any scoring row gives it, over (the mean the baseline
rows give it + floor); layers are summed, times weight.
"""

import torch


def block_relevance_reference(best: torch.Tensor, num_queries: int, floor: float, weight: float) -> torch.Tensor:
    """best fp32 [L, Hkv, R, G, N] (block_max_logits' layout): rows :num_queries score, the rest
    (none: no baseline, and no division) are the baseline. Returns fp32 [N]."""
    shares = best.softmax(-1).sum((1, 3))  # [L, R, N]
    relevance = shares[:, :num_queries].amax(1)
    if shares.shape[1] > num_queries:
        relevance = relevance / (shares[:, num_queries:].mean(1) + floor)
    return relevance.sum(0) * weight
