"""Tensor parallelism: which rank this model is, which slice of each weight it keeps, and the
collectives its layers call.

Megatron-style: q/k/v and gate/up are split by output rows (column-parallel), o and down by
input columns (row-parallel, their partial sums all-reduced), the embedding table and LM head
by vocabulary rows (vocab-parallel). At world size 1 every collective returns its input
untouched and no torch.distributed call is made, so a single-GPU or CPU model pays nothing
and needs no process group.

The collectives are plain torch.distributed calls on the group, with no Python state kept
between calls, so NCCL records them into a CUDA graph; each rank captures its own graphs and
all ranks replay them in lockstep.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ropeway.arith import cdiv

# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name); the GPU machine runs 2.11.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group. group None with world_size > 1 means
    torch.distributed's default group."""
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a tensor-parallel group of {self.world_size}")

    @classmethod
    def from_process_group(cls, group: dist.ProcessGroup | None = None) -> "TensorParallel":
        """Rank and size from an initialized process group (None: the default one)."""
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def split(self, total: int, what: str) -> slice:
        """This rank's equal share of `total` rows or columns; `what` names them in the error."""
        if total % self.world_size:
            raise ValueError(f"--tensor-parallel-size {self.world_size} must divide the model's {what} ({total})")
        share = total // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def kv_heads(self, num_kv_heads: int) -> slice:
        """The KV heads this rank keeps. With fewer KV heads than ranks each head is replicated on
        world_size / num_kv_heads consecutive ranks: those whose query heads attend with it."""
        if num_kv_heads >= self.world_size:
            return self.split(num_kv_heads, "number of KV heads")
        if self.world_size % num_kv_heads:
            raise ValueError(f"--tensor-parallel-size {self.world_size} must be a multiple of the model's "
                             f"number of KV heads ({num_kv_heads}) when it exceeds it")
        head = self.rank * num_kv_heads // self.world_size
        return slice(head, head + 1)

    def shard_vocab(self, table: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a [vocab, hidden] table. The vocabulary is padded with zero rows
        up to a multiple of world_size, so every rank's logits have one shape for the all-gather."""
        if self.world_size == 1:
            return table
        rows = cdiv(table.shape[0], self.world_size)
        shard = table[self.rank * rows : (self.rank + 1) * rows]
        return F.pad(shard, (0, 0, 0, rows - shard.shape[0]))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place (row-parallel outputs are partial sums)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def embed(self, input_ids: torch.Tensor, table_shard: torch.Tensor) -> torch.Tensor:
        """Embedding lookup in a vocab-sharded table: each rank fills the rows of the ids it
        holds, zeros elsewhere, and the all-reduce assembles the full rows."""
        if self.world_size == 1:
            return F.embedding(input_ids, table_shard)
        rows = table_shard.shape[0]
        local = input_ids - self.rank * rows
        elsewhere = (local < 0) | (local >= rows)
        h = F.embedding(local.masked_fill(elsewhere, 0), table_shard)
        h.masked_fill_(elsewhere[:, None], 0)
        return self.all_reduce(h)

    def gather_vocab(self, logits_shard: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[T, vocab] logits on every rank from each rank's [T, vocab shard] (padding dropped)."""
        if self.world_size == 1:
            return logits_shard
        num_tokens, rows = logits_shard.shape
        gathered = torch.empty(self.world_size * num_tokens, rows, dtype=logits_shard.dtype,
                               device=logits_shard.device)
        _all_gather_single(gathered, logits_shard.contiguous(), group=self.group)
        by_rank = gathered.view(self.world_size, num_tokens, rows)
        return by_rank.permute(1, 0, 2).reshape(num_tokens, self.world_size * rows)[:, :vocab_size]

