"""The host tier: KV blocks the GPU pool lets go of, kept in host memory until a request needs them back.

Bookkeeping only (slots and an LRU order); the engine owns the host buffers and moves the bytes.
Two kinds of entry share one slot budget and one LRU order: a prefix-cache block, keyed by its
chained content hash (one slot), and a retained chat session, keyed by its history key (one slot
per block). A slot that a load in flight still reads is pinned: an entry dropped meanwhile gives
its slots back only once the load is done.
"""

import heapq
from collections import Counter, OrderedDict
from dataclasses import dataclass


@dataclass
class HostEntry:
    slots: list[int]
    session: object | None = None  # a RetainedSession; None: a prefix-cache block


class HostTier:
    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        # Lowest slots first, so the slots of one offload tend to be one contiguous run to copy.
        self.free_slots = list(range(num_slots))
        self.entries: OrderedDict[bytes, HostEntry] = OrderedDict()  # oldest first
        self.pins: Counter[int] = Counter()
        self.dropped_while_pinned: set[int] = set()
        self.hits = 0  # requests that brought blocks back (a prefix or a session)

    @property
    def num_used_slots(self) -> int:
        return self.num_slots - len(self.free_slots)

    # ----- prefix-cache blocks -----

    def store_block(self, block_hash: bytes) -> int | None:
        """A slot for a prefix-cache block the pool is about to reuse; None if the block is
        already here (then only its recency changes) or nothing can make room."""
        key = b"B" + block_hash
        if key in self.entries:
            self.entries.move_to_end(key)
            return None
        slots = self._reserve(1)
        if slots is None:
            return None
        self.entries[key] = HostEntry(slots)
        return slots[0]

    def find_block(self, block_hash: bytes) -> int | None:
        entry = self.entries.get(b"B" + block_hash)
        if entry is None:
            return None
        self.entries.move_to_end(b"B" + block_hash)
        return entry.slots[0]

    # ----- sessions -----

    def store_session(self, key: bytes, session, num_blocks: int) -> list[int] | None:
        stale = self.entries.pop(b"S" + key, None)
        if stale is not None:
            self.free(stale.slots)
        slots = self._reserve(num_blocks)
        if slots is not None:
            self.entries[b"S" + key] = HostEntry(slots, session)
        return slots

    def session_lengths(self) -> set[int]:
        return {entry.session.num_tokens for entry in self.entries.values() if entry.session is not None}

    def pop_session(self, key: bytes) -> HostEntry | None:
        """Take a session out of the LRU order; its slots stay its own until freed or put back."""
        return self.entries.pop(b"S" + key, None)

    def put_back_session(self, key: bytes, entry: HostEntry) -> None:
        self.entries[b"S" + key] = entry

    # ----- slots -----

    def pin(self, slots: list[int]) -> None:
        self.pins.update(slots)

    def unpin(self, slots: list[int]) -> None:
        self.pins.subtract(slots)
        for slot in slots:
            if self.pins[slot] <= 0:
                del self.pins[slot]
                if slot in self.dropped_while_pinned:
                    self.dropped_while_pinned.discard(slot)
                    heapq.heappush(self.free_slots, slot)

    def free(self, slots: list[int]) -> None:
        for slot in slots:
            if slot in self.pins:
                self.dropped_while_pinned.add(slot)
            else:
                heapq.heappush(self.free_slots, slot)

    def _reserve(self, count: int) -> list[int] | None:
        """count free slots, dropping the least recently used entries to make room."""
        if count > self.num_slots:
            return None
        while len(self.free_slots) < count and self.entries:
            _, entry = self.entries.popitem(last=False)
            self.free(entry.slots)
        if len(self.free_slots) < count:
            return None  # the rest is pinned by loads in flight
        return [heapq.heappop(self.free_slots) for _ in range(count)]
