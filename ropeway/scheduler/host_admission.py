"""A sequence whose cached blocks come back from the host tier, a slice of blocks per step.

Bringing a 32k-token hit (2,048 blocks) back in one step costs milliseconds of Python in that step:
hashing and finding its blocks, taking as many pool blocks (whose cached contents leave for the
host tier), pinning and freeing slots, registering the blocks once back. The engine pipelines its
steps, so such a step stalls every running stream. So the scheduler brings a hit back in slices
of at most SchedulerConfig.host_blocks_per_step blocks per step, each slice its own BlockLoad, and
the sequence rejoins the queue once its last slice is in the pool.

A prefix hit is found slice by slice too: each slice hashes the next blocks of the prompt and
takes the run of them the host tier holds. It ends at the first block the tier lacks, or when the
pool has no room for the next slice (the sequence then computes the rest). A session must come
back whole, so the pool reserves all of its blocks when it is taken, and each slice takes its
blocks from that reservation.
"""

from collections.abc import Callable
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(eq=False)
class BlockLoad:
    """Blocks of seq's cache coming back from the host tier: (host slot, pool block) copies, into
    seq's block table from index first_block on. seq waits outside the queues until the engine
    reports every load of its admission done."""
    seq: Sequence
    copies: list[tuple[int, int]]
    first_block: int = 0


class HostAdmission:
    def __init__(self, seq: Sequence, block_manager: BlockManager, session_slots: list[int] | None = None):
        """session_slots: a session's host slots, all of whose blocks the pool has reserved; None:
        a prefix hit, whose next blocks are looked up in the host tier slice by slice."""
        self.seq = seq
        self.block_manager = block_manager
        self.session_slots = session_slots
        self.looking = session_slots is None  # a prefix hit whose run in the host tier may go on
        self.in_flight: list[BlockLoad] = []

    @property
    def issuing(self) -> bool:
        """Whether slices remain to be started."""
        return bool(self.session_slots) if self.session_slots is not None else self.looking

    @property
    def done(self) -> bool:
        return not self.issuing and not self.in_flight

    def start(self, slots: list[int], blocks: list[int]) -> BlockLoad:
        """The load of a slice: these (pinned) slots into these blocks, just appended to seq's table."""
        load = BlockLoad(self.seq, list(zip(slots, blocks)), len(self.seq.block_table) - len(blocks))
        self.in_flight.append(load)
        return load

    def next_slice(self, max_blocks: int, make_room: Callable[[int], bool]) -> BlockLoad | None:
        """Take the next slice (at most max_blocks blocks) and start its load; None if no slice
        was taken (max_blocks is 0, or a prefix hit's run has ended). make_room(n): whether n
        blocks are free (after giving back what may be given back)."""
        if max_blocks <= 0 or not self.issuing:
            return None
        bm, host, seq = self.block_manager, self.block_manager.host_tier, self.seq
        if self.session_slots is not None:
            slots, self.session_slots = self.session_slots[:max_blocks], self.session_slots[max_blocks:]
            blocks = bm.take_free_blocks(len(slots), reserved=True)
            host.pin(slots)
            host.free(slots)  # the session leaves the host tier: its slots return once read
        else:
            slots = host.find_run(bm.prefix_hashes(seq, len(seq.block_table), max_blocks))
            self.looking = len(slots) == max_blocks
            if not slots:
                return None
            host.pin(slots)  # making room sends blocks to the host tier: they must not take these slots
            if not make_room(len(slots)):
                host.unpin(slots)
                self.looking = False
                return None
            blocks = bm.take_free_blocks(len(slots))
            seq.num_computed_tokens = (len(seq.block_table) + len(blocks)) * bm.block_size
        seq.block_table += blocks
        return self.start(slots, blocks)

    def load_finished(self, load: BlockLoad) -> None:
        """A slice is in the pool: its slots are free to reuse, and its blocks findable (unless
        the sequence was aborted: its blocks are freed once the whole admission is done)."""
        self.in_flight.remove(load)
        self.block_manager.host_tier.unpin([slot for slot, _ in load.copies])
        if self.seq.status is not SequenceStatus.FINISHED:
            self.block_manager.register_full_blocks(self.seq, load.first_block, load.first_block + len(load.copies))

    def cancel(self) -> None:
        """The sequence was aborted or failed: start no more slices; a session's blocks not yet
        loaded give back their reservation and their slots (the session is gone)."""
        self.looking = False
        if self.session_slots:
            self.block_manager.release_reservation(len(self.session_slots))
            self.block_manager.host_tier.free(self.session_slots)
            self.session_slots = []
