"""A decode at a long context on CPU: its keys read where they lie, in pieces merged by log-sum-exp.

Gathering a 4k-token context into one tensor per layer (what cpu_attention does for short
decodes) cost more than attending to it. Here a sequence's keys, in their logical order, are
cut into pieces of PIECE_KEYS; four pieces (GROUP_KEYS) are the batch of one call of torch's
CPU flash kernel, so the pool's threads share one sequence (flash decoding), and the pieces'
outputs merge by their log-sum-exps. Where a call's keys lie in one ascending run of cache
slots (a prefill chunk's blocks, as the block manager hands them out) the call reads a view of
the cache, no copy; elsewhere it gathers them, whole blocks at a time where it can.

The result does not depend on where the blocks lie: which keys each call sees, in which
order, and the order of the merge follow from the sequence's length alone, and a view and a
gathered copy hand the kernel the same shape and strides. (The kernel's rounding depends on
how a call's items fall to threads, so the calls themselves must not follow the layout.) A
prefix taken back from the host tier into other blocks gives the same bits.
"""

from dataclasses import dataclass

import torch

from .cpu_threads import one_thread

_flash_attention_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

# Decodes with at least this many keys take this path; shorter ones are gathered and batched
# (cpu_attention), where one call serves many sequences and the gather costs little.
LONG_DECODE_KEYS = 1024
# Keys of one piece (one item of a call's batch per KV head).
PIECE_KEYS = 512
# Keys of one call: four pieces, so a call has 4 x Hkv items for the pool's threads; also the
# default prefill chunk, whose blocks the block manager hands out in one ascending run.
GROUP_KEYS = 4 * PIECE_KEYS


@dataclass
class KeyCall:
    """One flash call's keys: pieces x length keys, in logical order from key first."""
    pieces: int
    length: int
    start: int | None                 # their first cache slot where they lie in one run of slots, in order
    slots: torch.Tensor | None        # else their cache slots, to gather
    blocks: torch.Tensor | None       # and where they fill whole blocks, those (fewer, longer rows to copy)
    mask: torch.Tensor | None         # [pieces, 1, 1, length] fp32 slot bias
    masked: torch.Tensor | None       # [pieces, 1, 1] bool: pieces whose every key is masked


@dataclass
class LongDecode:
    row: int                          # the sequence's query row in q
    calls: list[KeyCall]
    num_keys: int


def plan_long_decode(row: int, blocks: torch.Tensor, seq_len: int, block_size: int,
                     slot_bias: torch.Tensor | None) -> LongDecode:
    """The calls of one decode of seq_len keys whose block table starts with blocks."""
    count = -(-seq_len // block_size)
    ids = blocks[:count].long()
    # next_in_run[i]: block i + 1 directly follows block i in the cache.
    next_in_run = ((ids[1:] - ids[:-1]) == 1).tolist()
    id_list = ids.tolist()
    bias = None if slot_bias is None else slot_bias.view(-1)
    calls = []
    for group in range(0, seq_len, GROUP_KEYS):
        size = min(GROUP_KEYS, seq_len - group)
        whole, left = divmod(size, PIECE_KEYS)
        for first, pieces, length in ((group, whole, PIECE_KEYS), (group + whole * PIECE_KEYS, 1, left)):
            if not pieces or not length:
                continue
            keys = pieces * length
            first_block, last_block = first // block_size, (first + keys - 1) // block_size
            call = KeyCall(pieces, length, None, None, None, None, None)
            if all(next_in_run[first_block:last_block]):
                call.start = id_list[first_block] * block_size + first % block_size
            else:
                positions = torch.arange(first, first + keys)
                call.slots = ids[positions // block_size] * block_size + positions % block_size
                if first % block_size == 0 and keys % block_size == 0:
                    call.blocks = ids[first_block : last_block + 1]
            if bias is not None:
                slots = call.slots if call.start is None else slice(call.start, call.start + keys)
                call.mask = bias[slots].view(pieces, 1, 1, length)
                masked = call.mask.isneginf().all(-1)
                # torch's CPU flash kernel gives a row whose keys are all masked output 0 and
                # log-sum-exp 0, not -inf: the merge must be told that it weighs nothing.
                call.masked = masked if bool(masked.any()) else None
            calls.append(call)
    return LongDecode(row, calls, seq_len)


def long_decode_attention(q, read, decode: LongDecode, scale, out) -> None:
    """out[decode.row] = the decode's attention. read(call) -> its keys and values, [keys, Hkv, D] each."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    outputs, lses = [], []
    for call in decode.calls:
        k, v = (x.view(call.pieces, call.length, *x.shape[1:]).transpose(1, 2) for x in read(call))
        num_kv_heads = k.shape[1]
        # Each KV head's query group stacked into its query rows, the same for every piece.
        queries = q[decode.row].view(1, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
        mask = None if call.mask is None else call.mask.to(q.dtype)
        # A sequence's short last piece alone is not worth waking the pool for.
        with one_thread(call.pieces * call.length * num_q_heads * head_dim):
            o, lse = _flash_attention_cpu(queries.expand(call.pieces, -1, -1, -1), k, v, attn_mask=mask, scale=scale)
        outputs.append(o)
        lses.append(lse if call.masked is None else lse.masked_fill(call.masked, float("-inf")))
    o, lse = torch.cat(outputs), torch.cat(lses)
    # The softmax over all keys: each piece's output weighed by its share of exp(lse).
    weights = torch.softmax(lse, dim=0)[..., None]
    merged = (o.float() * weights).sum(0)
    out[decode.row] = merged.view(num_q_heads, head_dim).to(q.dtype)
