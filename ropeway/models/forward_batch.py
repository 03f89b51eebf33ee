"""The flat batch one model step runs on: tokens of many sequences, no padding."""

from dataclasses import dataclass

import numpy as np
import torch
from ropeway.arith import round_up


def block_table_width(num_blocks: int) -> int:
    """Block-table rows are padded to a multiple of 16 entries: Triton specializes the
    attention kernel on its row stride being divisible by 16, so a width that changed with
    the batch recompiled it mid-serving (and the padding keeps the row loads vectorized)."""
    return round_up(num_blocks, 16)


def cache_slots(block_table, positions: np.ndarray, block_size: int) -> np.ndarray:
    """Slot (block * block_size + offset, int64) of each cache position of one sequence whose
    block table is block_table."""
    return np.asarray(block_table, dtype=np.int64)[positions // block_size] * block_size + positions % block_size


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor        # [T] token ids of every scheduled token, sequence after sequence
    positions: torch.Tensor        # [T] each token's RoPE position
    seq_index: torch.Tensor        # [T] the sequence (row) each token belongs to
    slot_mapping: torch.Tensor     # [T] cache slot each token's K/V is written to
    query_start_loc: torch.Tensor  # [S+1] where each sequence's tokens start in the flat batch
    seq_lens: torch.Tensor         # [S] tokens in each sequence's cache after this step
    block_tables: torch.Tensor     # [S, max_blocks] int32 block ids
    inv_freq: torch.Tensor         # [S, head_dim/2] fp32: each sequence's RoPE row
    attention_factor: torch.Tensor # [S] fp32: YaRN's cos/sin scale, 1.0 otherwise
    logits_indices: torch.Tensor   # [R] tokens whose next-token logits are needed
    max_query_len: int
    max_seq_len: int
    # The first sequences of a step that also has prefill chunks, one query each (decodes):
    # attention gives them tiles of their own. 0: no such split.
    num_decode_seqs: int = 0
    # (first query, queries, cached tokens before them) of the last sequences, prefill chunks
    # long enough for cuDNN's attention on CUDA (kernels.is_long_chunk). Host ints.
    long_chunks: tuple[tuple[int, int, int], ...] = ()
    # [num_blocks, block_size] fp32 logit bias per cache slot, when a landmark cache is in the batch.
    slot_bias: torch.Tensor | None = None

    @classmethod
    def one_sequence(cls, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                     block_table: torch.Tensor, seq_len: int, inv_freq: torch.Tensor, attention_factor: float,
                     logits_indices: torch.Tensor, slot_bias: torch.Tensor | None = None) -> "ForwardBatch":
        """A chunk of one sequence run outside the scheduler's steps (a landmark summary, a
        recomputed recall region, a perplexity pass): input_ids, positions and slot_mapping [T]
        and block_table [W] int32 on the device; seq_len its cache length after the chunk."""
        n, device = input_ids.shape[0], input_ids.device
        return cls(
            input_ids=input_ids, positions=positions, seq_index=torch.zeros(n, dtype=torch.int32, device=device),
            slot_mapping=slot_mapping, query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=device), block_tables=block_table[None],
            inv_freq=inv_freq[None], attention_factor=torch.tensor([attention_factor], dtype=torch.float32,
                                                                   device=device),
            logits_indices=logits_indices, max_query_len=n, max_seq_len=seq_len, slot_bias=slot_bias)
