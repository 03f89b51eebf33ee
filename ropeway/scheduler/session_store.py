"""Retained state of finished bounded-cache sequences, for the next turn of a long chat.

The OpenAI API is stateless: each chat turn resends the whole history. A sequence under a
bounded policy (sinks + window) cannot be found in the prefix cache once it has evicted,
so when it finishes, its blocks stay here, keyed by the hash of the token history they
stand for. The next request whose prompt extends that history takes them over and
continues from there instead of re-reading the history. Entries hold blocks, so the store
is bounded (LRU) and gives blocks back whenever the pool runs short; with a host tier, an entry
that gives its blocks back moves to host memory (the blocks are copied there first) and a later
turn brings it back.
"""

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from .block_manager import BlockManager
from .host_tier import HostEntry
from .sequence import Sequence


def history_key(token_ids: list[int], seq: Sequence) -> bytes:
    return history_keys(token_ids, seq, [len(token_ids)])[len(token_ids)]


def history_keys(token_ids: list[int], seq: Sequence, lengths) -> dict[int, bytes]:
    """history_key of token_ids[:n] for each n in lengths, in one pass over the tokens (a 32k
    history costs about half a millisecond to convert and hash: once, not once a length)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((seq.context_policy, seq.rope_plan)).encode())
    lengths = sorted(lengths)
    if lengths and 8 * lengths[-1] <= len(seq.prompt_bytes) and token_ids is seq.token_ids:
        data = memoryview(seq.prompt_bytes)
    else:
        data = memoryview(array("q", token_ids[: lengths[-1]] if lengths else []).tobytes())
    keys, done = {}, 0
    for n in lengths:
        digest.update(data[8 * done : 8 * n])
        keys[n] = digest.copy().digest()
        done = n
    return keys


@dataclass
class RetainedSession:
    num_tokens: int          # history length: the retained cache covers exactly these tokens
    block_table: list[int]
    num_evicted_tokens: int
    num_region_positions: int
    archive: object | None

    def restore_into(self, seq: Sequence) -> None:
        """seq continues from this session's cache (block_table aside, which the caller sets)."""
        seq.num_computed_tokens = self.num_tokens
        seq.num_evicted_tokens = self.num_evicted_tokens
        seq.num_region_positions = self.num_region_positions
        seq.archive = self.archive


@dataclass
class SessionMatch:
    """The longest retained history a new sequence extends: in the pool, or (host set) in host memory."""
    key: bytes
    session: RetainedSession
    host: HostEntry | None = None


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

    def take(self, seq: Sequence) -> SessionMatch | None:
        """The longest retained history seq's tokens extend (leaving at least one token to
        compute), taken out of the store. A match in the pool is restored into seq at once and
        counts a hit; one in host memory (match.host) is out of the host tier's LRU order, and
        the caller brings its blocks back (a hit) or puts it back. No match counts a miss."""
        host = self.block_manager.host_tier
        lengths = {e.num_tokens for e in self.entries.values()} | (host.session_lengths() if host else set())
        keys = history_keys(seq.token_ids, seq, [n for n in lengths if n < seq.num_tokens])
        for length in sorted(keys, reverse=True):
            key = keys[length]
            entry = self.entries.pop(key, None)
            if entry is not None:
                entry.restore_into(seq)
                seq.block_table = entry.block_table
                self.hits += 1
                return SessionMatch(key, entry)
            on_host = host.pop_session(key) if host else None
            if on_host is not None:
                return SessionMatch(key, on_host.session, on_host)
        self.misses += 1
        return None

    def release_oldest(self) -> bool:
        """Give back the least recently retained entry's blocks, moving the entry to the host
        tier if there is one and it has room; False if the store is empty."""
        if not self.entries:
            return False
        key = next(iter(self.entries))
        host = self.block_manager.host_tier
        entry = self.entries[key]
        slots = host.store_session(key, entry, len(entry.block_table)) if host else None
        if slots is not None:
            self.block_manager.offloads.extend(zip(entry.block_table, slots))
        self._release(key)
        return True

    def _release(self, key: bytes) -> None:
        entry = self.entries.pop(key)
        holder = Sequence(seq_id=-1, request_id="", choice_index=0, prompt_token_ids=[], rope_plan=None,
                          arrival=-1, max_total_tokens=0, block_table=entry.block_table)
        self.block_manager.free(holder)
        entry.block_table = []
