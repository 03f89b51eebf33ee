"""Retrieval of evicted blocks for the landmark policy (InfLLM-style).

A landmark cache with `retrieve` keeps, for every block it evicts, a host copy of the
block's keys (as cached: rotated for the position they had) and values, and one scoring key
per layer and KV head: the mean of the block's keys before RoPE. When a prompt ends (a new
chat turn, a question), the queries of its last tokens score every archived block by the
attention mass they would give it (softmax over blocks, summed over layers and heads),
relative to the mass the tokens just before them give it, and the best blocks go back
into the recall region in their original order, re-rotated once to the region's positions.

The relative score matters: some blocks draw attention from any query (the text's start,
recurring phrases); by raw mass they fill the region, while the block the question is
about is the one the question attends to far more than the text before it does.

Scoring keys come from the cache, where each key was computed with its full context. Keys
of a chunk re-computed alone (as landmark summaries are) do not work for this: the chunk's
first tokens become attention sinks and outscore every block that matters.
"""

import weakref
from dataclasses import dataclass

import torch

from ropeway.kernels.rotary import rope_cos_sin, rotate_by
from ropeway.scheduler import RopePlan

# Queries of a prompt's last tokens score the archive (enough to cover a question), against
# the tokens before them as the baseline.
RECALL_QUERY_TOKENS = 16
RECALL_BASELINE_TOKENS = 32


@dataclass
class ArchivedBlocks:
    kv: torch.Tensor  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], host, cache dtype
    position: int     # cache position of the first token when the blocks were evicted
    plan: RopePlan    # the plan their keys were rotated under


class RecallArchive:
    """One sequence's evicted blocks, oldest first, with their scoring keys."""

    def __init__(self):
        self.chunks: list[ArchivedBlocks] = []
        self.scoring_keys: list[torch.Tensor] = []  # per chunk [num_layers, num_blocks, num_kv_heads, head_dim] fp32
        self.num_blocks = 0
        self.num_bytes = 0

    def add(self, kv: torch.Tensor, position: int, plan: RopePlan, inv_freq: torch.Tensor,
            attention_factor: float) -> None:
        """Archive evicted blocks kv [num_layers, 2, n, block_size, Hkv, D] (on the device)
        whose first token sat at cache position `position` under plan."""
        num_layers, _, num_blocks, block_size, num_kv_heads, head_dim = kv.shape
        n = num_blocks * block_size
        keys = kv[:, 0].reshape(num_layers, n, num_kv_heads, head_dim).transpose(0, 1).reshape(n, -1, head_dim)
        # Rotate back by each key's angle (and undo YaRN's scale): fp32, for scoring only.
        positions = torch.arange(position, position + n, device=kv.device)
        cos, sin = rope_cos_sin(positions, inv_freq.expand(n, -1),
                                torch.full((n,), 1.0 / attention_factor, device=kv.device))
        unrotated = rotate_by(keys.float(), cos, -sin).view(n, num_layers, num_kv_heads, head_dim)
        scoring = unrotated.view(num_blocks, block_size, num_layers, num_kv_heads, head_dim).mean(1)
        self.scoring_keys.append(scoring.permute(1, 0, 2, 3).contiguous().cpu())
        self.chunks.append(ArchivedBlocks(kv.cpu(), position, plan))
        self.num_blocks += num_blocks
        self.num_bytes += self.chunks[-1].kv.nbytes + self.scoring_keys[-1].nbytes

    def drop_oldest(self) -> None:
        self.num_blocks -= self.chunks[0].kv.shape[2]
        self.num_bytes -= self.chunks[0].kv.nbytes + self.scoring_keys[0].nbytes
        del self.chunks[0], self.scoring_keys[0]

    def select(self, queries: torch.Tensor, baseline: torch.Tensor, count: int, scale: float) -> list[int]:
        """Indices (oldest first) of the count archived blocks that queries [num_layers, Q,
        num_heads, head_dim] (before RoPE) attend to most, relative to the baseline queries
        of the tokens before them (same layout; Q may be 0)."""
        keys = torch.cat(self.scoring_keys, 1).to(queries.device)
        relevance = self._attention_mass(queries, keys, scale)
        if baseline.shape[1]:
            prior = self._attention_mass(baseline, keys, scale)
        else:
            prior = relevance.mean().expand_as(relevance)
        score = relevance / (prior + 0.1 * prior.mean())
        top = score.topk(min(count, score.shape[0])).indices
        return sorted(top.tolist())

    @staticmethod
    def _attention_mass(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
        """[num_blocks]: per query token, the softmax attention over blocks summed over layers
        and heads; averaged over the query tokens. One layer at a time bounds the memory."""
        num_layers, num_queries, num_heads, head_dim = queries.shape
        num_kv_heads = keys.shape[2]
        mass = torch.zeros(keys.shape[1], device=keys.device)
        for layer in range(num_layers):
            grouped = queries[layer].float().view(num_queries, num_kv_heads, num_heads // num_kv_heads, head_dim)
            logits = torch.einsum("qkgd,bkd->qkgb", grouped, keys[layer]) * scale
            mass += logits.softmax(-1).sum((1, 2)).mean(0)
        return mass

    def block(self, index: int) -> tuple[torch.Tensor, int, RopePlan]:
        """Archived block index: kv [num_layers, 2, block_size, Hkv, D], its first token's
        position when evicted, its plan."""
        for chunk in self.chunks:
            num_blocks, block_size = chunk.kv.shape[2], chunk.kv.shape[3]
            if index < num_blocks:
                return chunk.kv[:, :, index], chunk.position + index * block_size, chunk.plan
            index -= num_blocks
        raise IndexError(index)


class ArchiveBudget:
    """Host bytes all archives may hold together; over it, the largest archive drops its
    oldest chunk first (a long stream forgets its distant past before a short one does)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.archives: weakref.WeakSet[RecallArchive] = weakref.WeakSet()  # freed with their sequences

    def track(self, archive: RecallArchive) -> None:
        self.archives.add(archive)
        while self.num_bytes > self.max_bytes:
            largest = max(self.archives, key=lambda a: a.num_bytes)
            if not largest.chunks:
                break
            largest.drop_oldest()

    @property
    def num_bytes(self) -> int:
        return sum(a.num_bytes for a in self.archives)
