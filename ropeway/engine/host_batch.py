"""A step's flat batch as host arrays: built once by the engine core's runner, uploaded by it and,
under tensor parallelism, sent as is to every other rank, which uploads and runs the same batch."""

from typing import Any

import msgspec
import numpy as np


class HostBatch(msgspec.Struct):
    # input_ids, positions, slot_mapping, logits_indices, plan_index, placeholder holes and their
    # sources in the previous step's tokens
    int64: list[Any]   # numpy arrays (on the wire: [shape, bytes])
    # block_tables, seq_index, query_start, seq_lens
    int32: list[Any]
    max_query_len: int
    max_seq_len: int
    num_decode_seqs: int
    long_chunks: list[tuple[int, int, int]]   # (first query row, queries, cached keys) of cuDNN chunks
    uses_slot_bias: bool                       # a landmark cache is in the batch

    def __post_init__(self):
        # Decoded from the wire, the arrays arrive as (dtype, shape, bytes).
        self.int64 = [_array(a, np.int64) for a in self.int64]
        self.int32 = [_array(a, np.int32) for a in self.int32]


def _array(value, dtype) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.astype(dtype, copy=False)
    shape, data = value
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # writable, as torch.from_numpy wants


def encode_array(value):
    """msgspec's enc_hook for numpy arrays: (shape, raw bytes); the dtype is the field's."""
    if isinstance(value, np.ndarray):
        return (list(value.shape), np.ascontiguousarray(value).tobytes())
    raise NotImplementedError(f"cannot encode {type(value)}")
