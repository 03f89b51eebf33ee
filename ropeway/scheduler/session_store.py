"""Retained state of finished bounded-cache sequences, for the next turn of a long chat.

The OpenAI API is stateless: each chat turn resends the whole history. A sequence under a
bounded policy (sinks + window) cannot be found in the prefix cache once it has evicted,
so when it finishes, its blocks stay here, keyed by the hash of the token history they
stand for. The next request whose prompt extends that history takes them over and
continues from there instead of re-reading the history. Entries hold blocks, so the store
is bounded (LRU) and gives blocks back whenever the pool runs short.
"""

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence


def history_key(token_ids: list[int], seq: Sequence) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((seq.context_policy, seq.rope_plan)).encode())
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


@dataclass
class RetainedSession:
    num_tokens: int          # history length: the retained cache covers exactly these tokens
    block_table: list[int]
    num_evicted_tokens: int
    num_region_positions: int
    archive: object | None


class SessionStore:
    def __init__(self, block_manager: BlockManager, max_blocks: int):
        self.block_manager = block_manager
        self.max_blocks = max_blocks
        self.entries: OrderedDict[bytes, RetainedSession] = OrderedDict()  # oldest first
        self.hits = 0
        self.misses = 0

    @property
    def num_blocks(self) -> int:
        """Blocks the store holds: a block that several sessions share (a common prefix) counts once."""
        return len({block for entry in self.entries.values() for block in entry.block_table})

    def retain(self, seq: Sequence) -> bool:
        """Keep a finished sequence's cache (its block references pass to the store)."""
        n = seq.num_computed_tokens
        if n == 0 or len(seq.block_table) > self.max_blocks:
            return False
        key = history_key(seq.token_ids[:n], seq)
        if key in self.entries:
            self._release(key)
        self.entries[key] = RetainedSession(n, list(seq.block_table), seq.num_evicted_tokens,
                                            seq.num_region_positions, seq.archive)
        while self.num_blocks > self.max_blocks:
            self.release_oldest()
        return True

    def take(self, seq: Sequence) -> bool:
        """Give a new sequence the longest retained history its tokens extend (leaving at
        least one token to compute). Counts a hit or a miss."""
        lengths = sorted({e.num_tokens for e in self.entries.values() if e.num_tokens < seq.num_tokens},
                         reverse=True)
        for length in lengths:
            key = history_key(seq.token_ids[:length], seq)
            entry = self.entries.pop(key, None)
            if entry is not None:
                seq.block_table = entry.block_table
                seq.num_computed_tokens = entry.num_tokens
                seq.num_evicted_tokens = entry.num_evicted_tokens
                seq.num_region_positions = entry.num_region_positions
                seq.archive = entry.archive
                self.hits += 1
                return True
        self.misses += 1
        return False

    def release_oldest(self) -> bool:
        """Free the least recently retained entry's blocks; False if the store is empty."""
        if not self.entries:
            return False
        self._release(next(iter(self.entries)))
        return True

    def _release(self, key: bytes) -> None:
        entry = self.entries.pop(key)
        holder = Sequence(seq_id=-1, request_id="", choice_index=0, prompt_token_ids=[], rope_plan=None,
                          arrival=-1, max_total_tokens=0, block_table=entry.block_table)
        self.block_manager.free(holder)
