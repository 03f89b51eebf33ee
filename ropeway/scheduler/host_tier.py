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
        return self.store_blocks([block_hash])[0]

    def store_blocks(self, block_hashes: list[bytes]) -> list[int | None]:
        """store_block of each, in order, in one loop: a host hit stores thousands (in the step's time)."""
        entries, free_slots = self.entries, self.free_slots
        slots = []
        for block_hash in block_hashes:
            key = b"B" + block_hash
            if key in entries:
                entries.move_to_end(key)
                slots.append(None)
                continue
            reserved = [heapq.heappop(free_slots)] if free_slots else self._reserve(1)
            if reserved is not None:
                entries[key] = HostEntry(reserved)
            slots.append(reserved[0] if reserved is not None else None)
        return slots

    def find_block(self, block_hash: bytes) -> int | None:
        found = self.find_run([block_hash])
        return found[0] if found else None

    def find_run(self, block_hashes: list[bytes]) -> list[int]:
        """The slots of the leading blocks the tier holds, up to the first it does not."""
        entries = self.entries
        slots = []
        for block_hash in block_hashes:
            key = b"B" + block_hash
            entry = entries.get(key)
            if entry is None:
                break
            entries.move_to_end(key)
            slots.append(entry.slots[0])
        return slots

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
