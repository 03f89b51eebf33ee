"""Paged KV blocks: a free list, reference counts, and prefix caching by content hash.

A full block's hash chains its parent's hash, its tokens and the RoPE plan's key, so a hit
means the whole prefix up to and including that block is identical and was computed under
the same plan. Freed blocks keep their hash and stay findable until the pool reuses them,
least recently freed first. With a host tier, a block the pool reuses goes there first: the
manager lists the (block, host slot) copies the runner must make before the step writes.
"""

import hashlib
from array import array
from collections import OrderedDict

from .host_tier import HostTier
from .sequence import Sequence
from ropeway.arith import cdiv


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 host_tier: HostTier | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of_block: list[bytes | None] = [None] * num_blocks
        self.block_of_hash: dict[bytes, int] = {}
        # Insertion order is reuse order: the front is the least recently freed block.
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0     # of those, tokens found
        self.host_tier = host_tier
        # (pool block, host slot) copies owed before the next step writes to the pool.
        self.offloads: list[tuple[int, int]] = []
        # Free blocks promised to sessions coming back from the host tier a slice per step: nobody
        # else may take them, so a session taken back always finds room for its last slice.
        self.reserved = 0

    @property
    def num_free_blocks(self) -> int:
        """Free blocks anyone may take (the reserved ones aside)."""
        return len(self.free_blocks) - self.reserved

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ----- prefix cache -----

    def full_block_hashes(self, seq: Sequence, num_tokens: int) -> list[bytes]:
        """Chained hashes of (at least) the full blocks among the first num_tokens tokens of seq: seq's
        own list, extended incrementally (full blocks never change), so callers slice it."""
        hashes, size = seq.block_hashes, self.block_size
        end = num_tokens // size
        if end > len(hashes):
            key = seq.rope_plan.cache_key
            # One conversion of the tokens for all the new blocks, one blake2b call per block.
            data = array("q", seq.token_ids[len(hashes) * size : end * size]).tobytes()
            width = 8 * size
            parent = hashes[-1] if hashes else b""
            for offset in range(0, len(data), width):
                parent = hashlib.blake2b(parent + key + data[offset : offset + width], digest_size=16).digest()
                hashes.append(parent)
        return hashes

    def prefix_block_limit(self, seq: Sequence) -> int:
        """How many leading blocks of seq a cache may hold. At least one token is left to compute,
        since its logits are what the step is for. A request for prompt logprobs computes its
        whole prompt; a bounded cache reuses no more than it holds before its first eviction
        (where streaming and full attention still agree)."""
        if not self.enable_prefix_caching or seq.wants_prompt_logprobs:
            return 0
        limit = seq.num_tokens - 1
        if seq.context_policy.bounded:
            limit = min(limit, seq.context_policy.max_cache_tokens(self.block_size))
        return limit // self.block_size

    def prefix_hashes(self, seq: Sequence, first: int = 0, count: int | None = None) -> list[bytes]:
        """Hashes of the blocks first.. first+count-1 of seq (fewer past prefix_block_limit), hashing
        no further than that: a lookup that stops at its first miss never hashes a whole prompt."""
        limit = self.prefix_block_limit(seq)
        end = limit if count is None else min(limit, first + count)
        if end <= first:
            return []
        return self.full_block_hashes(seq, end * self.block_size)[first:end]

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the pool holding the longest cached prefix of seq. Hashed in doubling batches:
        a cold prompt hashes a few blocks, a hit of n blocks at most about 2n."""
        block_of_hash = self.block_of_hash
        hits: list[int] = []
        batch = 16
        while True:
            hashes = self.prefix_hashes(seq, len(hits), batch)
            for h in hashes:
                block = block_of_hash.get(h)
                if block is None:
                    return hits
                hits.append(block)
            if len(hashes) < batch:
                return hits
            batch *= 2

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def register_full_blocks(self, seq: Sequence, first: int = 0, end: int | None = None) -> None:
        """Make seq's blocks that are full of computed tokens findable by later requests (those of
        its table's indices first..end-1 only: a slice of blocks back from the host tier)."""
        if not self.enable_prefix_caching or seq.num_evicted_tokens:
            return  # after an eviction, blocks no longer line up with token indices
        num_full = seq.num_computed_tokens // self.block_size
        end = num_full if end is None else min(end, num_full)
        hashes = self.full_block_hashes(seq, end * self.block_size)
        for block, h in zip(seq.block_table[first:end], hashes[first:end]):
            if self.hash_of_block[block] is None and h not in self.block_of_hash:
                self.hash_of_block[block] = h
                self.block_of_hash[h] = block

    # ----- allocation -----

    def blocks_to_grow(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks seq needs for num_new_tokens more cache positions."""
        return max(0, self.blocks_needed(seq.num_cached_positions + num_new_tokens) - len(seq.block_table))

    def can_admit(self, cached: list[int], num_new_tokens: int) -> bool:
        """Whether a waiting sequence fits: its cached prefix blocks (taken out of the free
        list if nobody holds them) plus fresh blocks for num_new_tokens after that prefix."""
        fresh = self.blocks_needed(len(cached) * self.block_size + num_new_tokens) - len(cached)
        return fresh + self.num_revived(cached) <= self.num_free_blocks

    def num_revived(self, cached: list[int]) -> int:
        """Of these cached blocks, those that nobody holds: taking them takes them out of the free list."""
        ref_counts = self.ref_counts
        return sum(1 for b in cached if ref_counts[b] == 0)

    def take_cached(self, seq: Sequence, cached: list[int]) -> None:
        """Give seq the cached prefix blocks (shared, no copies)."""
        for block in cached:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
        seq.block_table = list(cached)
        seq.num_computed_tokens = len(cached) * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to hold num_computed + num_new tokens."""
        # In ascending order: the pool hands a freed sequence's blocks back tail first, and a
        # prefill chunk whose blocks ascend is one run of cache slots, which CPU attention
        # reads in place (kernels/cpu_long_decode.py).
        seq.block_table += sorted(self.take_free_blocks(self.blocks_to_grow(seq, num_new_tokens)))

    def take_free_block(self) -> int:
        """The least recently freed block, now held once. If it was in the prefix cache, it leaves
        for the host tier (when there is one) instead of being lost."""
        return self.take_free_blocks(1)[0]

    def take_free_blocks(self, count: int, reserved: bool = False) -> list[int]:
        """take_free_block, count times, in a few loops (a host hit's slice takes hundreds in the
        step's time); reserved: blocks reserve() promised, now taken."""
        if reserved:
            self.reserved -= count
        free_blocks, hash_of_block = self.free_blocks, self.hash_of_block
        blocks = [free_blocks.popitem(last=False)[0] for _ in range(count)]
        hashed = [block for block in blocks if hash_of_block[block] is not None]
        if hashed and self.host_tier is not None:
            slots = self.host_tier.store_blocks([hash_of_block[block] for block in hashed])
            self.offloads += [(block, slot) for block, slot in zip(hashed, slots) if slot is not None]
        for block in hashed:
            self._forget(block)
        for block in blocks:
            self.ref_counts[block] = 1
        return blocks

    def reserve(self, count: int) -> None:
        """Promise count free blocks (the caller saw them free) to later take_free_blocks(reserved=True)."""
        self.reserved += count

    def release_reservation(self, count: int) -> None:
        self.reserved -= count

    def take_offloads(self) -> list[tuple[int, int]]:
        offloads, self.offloads = self.offloads, []
        return offloads

    def make_private(self, seq: Sequence, first_index: int = 0) -> list[tuple[int, int]]:
        """Give seq its own copy of every block it shares (from first_index on in its table),
        before their keys are changed in place. Returns the (source, destination) block
        copies the runner must perform."""
        copies = []
        for index, block in enumerate(seq.block_table):
            if index >= first_index and self.ref_counts[block] > 1:
                fresh = self.take_free_block()
                self.ref_counts[block] -= 1
                seq.block_table[index] = fresh
                copies.append((block, fresh))
        return copies

    def num_shared_blocks(self, seq: Sequence, first_index: int = 0) -> int:
        return sum(1 for b in seq.block_table[first_index:] if self.ref_counts[b] > 1)

    def drop_blocks(self, seq: Sequence, start: int, count: int) -> list[int]:
        """Remove count blocks from seq's table at start; they return to the pool at once."""
        dropped = seq.block_table[start : start + count]
        del seq.block_table[start : start + count]
        for block in dropped:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        return dropped

    def forget_hashes(self, seq: Sequence) -> None:
        """seq's cached keys are about to be re-rotated under a new plan: its blocks no longer
        hold what their hashes say, and its hashes must be recomputed under the new plan key."""
        for block in seq.block_table:
            if self.ref_counts[block] == 1:
                self._forget(block)
        seq.block_hashes = []

    def _forget(self, block: int) -> None:
        old_hash = self.hash_of_block[block]
        if old_hash is not None:
            if self.block_of_hash.get(old_hash) == block:
                del self.block_of_hash[old_hash]
            self.hash_of_block[block] = None

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so a shared prefix outlives the suffixes in the LRU order.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_evicted_tokens = 0
        seq.num_region_positions = 0
        seq.archive = None
