"""The host tier's memory and the copies between it and the KV pool.

A block is whatever the pool holds for it in every cache tensor (keys and values, and any other
per-block tensor: the landmark slot bias, a quantized cache's scales), copied as raw elements of
each tensor's own dtype. The host side holds one buffer per cache tensor, one row per slot: a
block's bytes for all layers are one run there (pinned on CUDA, so copies are asynchronous), and
consecutive slots are one run too.

A step's copies become a FIFO of chunks (CopyChunk) of at most CHUNK_BYTES. On CUDA a pump thread
(copy_pump.py) issues them, offloads on one copy stream and loads on another (PCIe moves both
ways at once), never more than QUEUE_DEPTH chunks ahead on either: a copy engine serves copies
in the order they reach it, so a step's own small host copies (its inputs, its sampled tokens)
wait behind at most that much, never behind a whole 32k-token chat. Nothing here waits for a
copy on the step's stream, and the step loop never waits for one either: the scheduler keeps a
loading sequence out of every batch until finished() sees its last chunk done.

Ordering, all on the GPU:
- offload (pool -> host) of a block that this step loads into: gathered chunk by chunk on the
  offload stream, after the work the step's stream queued before (its last writer). Nothing but
  that load writes the block until the load is done, and the load's chunks wait for the
  offload chunks issued before them.
- offload of any other block: the step's stream or a later one may write the block at once, so
  it is gathered on the step's stream now (a device copy: a step reuses few such blocks) and
  only the copy to the host is chunked.
- load (host -> pool): each chunk waits for the step's stream (the destination blocks' earlier
  contents) and for every offload chunk issued before it (the slots it reads were filled by
  one of them, the blocks it writes were gathered by one of them), then copies its slots to a
  staging buffer and scatters them into the pool.
On CPU every chunk is copied when the call returns.
"""

import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ropeway.scheduler import BlockLoad

from .copy_pump import CopyPump

# One chunk of copying: ~0.6 ms at the ~50 GB/s of pinned PCIe copies on the H200.
CHUNK_BYTES = 32 << 20
# Chunks queued on each copy stream at most: one copying, one ready to start when it ends.
QUEUE_DEPTH = 2
# Blocks gathered on the step's stream and not yet on the host, at most: past it the next such
# offload waits (a safety valve on device memory; a step reuses far fewer blocks than this).
MAX_GATHERED_BYTES = 1 << 30


@dataclass(eq=False)
class CopyChunk:
    """A chunk of copies on one copy stream: `slots` paired with `blocks` (pool blocks to gather
    from or scatter into) or with rows of `gathered` (blocks the step's stream gathered)."""
    offload: bool
    slots: list[int]
    blocks: list[int] | None = None
    index: torch.Tensor | None = None  # the blocks on the device (uploaded with the step's, on its stream)
    gathered: list[torch.Tensor] | None = None
    after: torch.cuda.Event | None = None  # the step's stream, when the chunk was made
    ends: BlockLoad | None = None          # the load whose last chunk this is
    starts_load: bool = False              # the first chunk of a load: timed from here
    started: torch.cuda.Event | None = None
    copy_seconds: tuple[float, float] = (0.0, 0.0)  # on CPU: when the copies began and ended
    done: torch.cuda.Event | None = None   # set once issued (None on CPU)
    issued: threading.Event = field(default_factory=threading.Event)

    @property
    def gathered_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.gathered) if self.gathered else 0


def slot_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """(first index, first slot, length) of each run of consecutive slots."""
    runs: list[tuple[int, int, int]] = []
    for index, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            first, start, length = runs[-1]
            runs[-1] = (first, start, length + 1)
        else:
            runs.append((index, slot, 1))
    return runs


def chunked(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class BlockTransfers:
    def __init__(self, cache_tensors: list[torch.Tensor], num_slots: int, chunk_bytes: int | None = None,
                 queue_depth: int | None = None, threaded: bool | None = None):
        """cache_tensors: every per-block tensor of the pool, as views with the block axis first.
        threaded: issue chunks from the pump thread (default: on CUDA; on CPU for tests only, since
        nothing orders a CPU copy after the step's writes but the caller)."""
        self.cache_tensors = cache_tensors
        self.device = cache_tensors[0].device
        self.on_cuda = self.device.type == "cuda"
        self.host = [torch.empty((num_slots, *t.shape[1:]), dtype=t.dtype, pin_memory=self.on_cuda)
                     for t in cache_tensors]
        self.bytes_per_slot = sum(t[0].numel() * t.element_size() for t in cache_tensors)
        chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self.blocks_per_chunk = max(1, min(chunk_bytes // self.bytes_per_slot, num_slots))
        self.staging: dict[bool, list[torch.Tensor]] = {}  # see _staging
        self.streams = {offload: torch.cuda.Stream(self.device) for offload in (True, False)} if self.on_cuda else {}
        self.last_offload_done: torch.cuda.Event | None = None  # of the last offload chunk issued
        threaded = self.on_cuda if threaded is None else threaded
        self.pump = CopyPump(self, QUEUE_DEPTH if queue_depth is None else queue_depth) if threaded else None
        self.loads: deque[tuple[BlockLoad, CopyChunk, CopyChunk]] = deque()  # (load, its first chunk, its last)
        self.offloaded_bytes = 0  # totals since start-up
        self.loaded_bytes = 0
        # (bytes, seconds from the load's first copy to its last) of each load finished, for benchmarks.
        self.load_timings: list[tuple[int, float]] = []

    # ----- the step loop's side -----

    def move(self, offloads: list[tuple[int, int]], loads: list[BlockLoad]) -> None:
        """Queue a step's copies: offloads are (pool block, host slot) pairs the pool lets go of
        before anything in the step writes to them; loads bring host slots back into pool blocks,
        and finished() reports each once done."""
        if not offloads and not loads:
            return
        self.offloaded_bytes += len(offloads) * self.bytes_per_slot
        self.loaded_bytes += sum(len(load.copies) for load in loads) * self.bytes_per_slot
        loaded_blocks = {block for load in loads for _, block in load.copies}
        slots_of_loaded: dict[int, list[int]] = {}
        others = []
        for block, slot in offloads:
            if block in loaded_blocks:
                slots_of_loaded.setdefault(block, []).append(slot)
            else:
                others.append((block, slot))
        chunks = self._gather_now(others)
        paired = []
        for load in loads:
            load_chunks = []
            for copies in chunked(load.copies, self.blocks_per_chunk):
                blocks = [block for _, block in copies]
                for pairs in chunked([(block, slot) for block in blocks for slot in slots_of_loaded.get(block, [])],
                                     self.blocks_per_chunk):
                    paired.append(CopyChunk(True, [s for _, s in pairs], blocks=[b for b, _ in pairs]))
                load_chunks.append(CopyChunk(False, [slot for slot, _ in copies], blocks=blocks))
                paired.append(load_chunks[-1])
            if not load_chunks:  # nothing to copy: done once what came before is
                load_chunks.append(CopyChunk(False, [], blocks=[]))
                paired.append(load_chunks[-1])
            load_chunks[0].starts_load = True
            load_chunks[-1].ends = load
            self.loads.append((load, load_chunks[0], load_chunks[-1]))
        if paired:
            # Every chunk's blocks in one upload on the step's stream (an upload on a copy stream
            # would queue behind the other direction's chunks).
            index = self._index([block for chunk in paired for block in chunk.blocks])
            after = None
            if self.on_cuda:
                after = torch.cuda.Event()
                after.record()  # the blocks' earlier writers and the upload
            start = 0
            for chunk in paired:
                chunk.index, chunk.after = index[start : start + len(chunk.blocks)], after
                start += len(chunk.blocks)
            chunks += paired
        if self.pump is not None:
            self.pump.submit(chunks)
        else:
            for chunk in chunks:
                self.issue(chunk)

    def offload(self, copies: list[tuple[int, int]]) -> None:
        self.move(copies, [])

    def load(self, loads: list[BlockLoad]) -> None:
        self.move([], loads)

    def finished(self) -> list[BlockLoad]:
        """The loads whose blocks are in the pool now (polled, never waited for; loads end in order)."""
        if self.pump is not None:
            self.pump.raise_if_failed()
        done = []
        while self.loads and self._is_done(self.loads[0][2]):
            load, first, last = self.loads.popleft()
            seconds = (first.started.elapsed_time(last.done) / 1000 if first.started is not None
                       else last.copy_seconds[1] - first.copy_seconds[0])
            self.load_timings.append((len(load.copies) * self.bytes_per_slot, seconds))
            done.append(load)
        return done

    def wait_for_a_load(self) -> list[BlockLoad]:
        """Wait until the oldest load in flight is done (when nothing else can run meanwhile)."""
        if self.loads:
            last = self.loads[0][2]
            while not last.issued.wait(0.1):
                if self.pump is not None:
                    self.pump.raise_if_failed()
            if last.done is not None:
                last.done.synchronize()
        return self.finished()

    def paused(self):
        """A context in which no copy is issued from another thread (see CopyPump.paused)."""
        return self.pump.paused() if self.pump is not None else nullcontext()

    @property
    def busy(self) -> bool:
        """Whether copies are queued or in flight."""
        return bool(self.loads) or (self.pump is not None and self.pump.busy)

    def _is_done(self, chunk: CopyChunk) -> bool:
        return chunk.issued.is_set() and (chunk.done is None or chunk.done.query())

    def _gather_now(self, offloads: list[tuple[int, int]]) -> list[CopyChunk]:
        """Gather blocks on the step's stream (before the step writes to them); chunks to copy them to the host."""
        if not offloads:
            return []
        if self.pump is not None:
            self.pump.wait_for_gathered_bytes(MAX_GATHERED_BYTES)
        blocks = self._index([block for block, _ in offloads])
        gathered = [tensor.index_select(0, blocks) for tensor in self.cache_tensors]
        after = None
        if self.on_cuda:
            after = torch.cuda.Event()
            after.record()
        return [CopyChunk(True, [slot for _, slot in offloads[start : start + self.blocks_per_chunk]],
                          gathered=[g[start : start + self.blocks_per_chunk] for g in gathered], after=after)
                for start in range(0, len(offloads), self.blocks_per_chunk)]

    def _index(self, values: list[int]) -> torch.Tensor:
        """Block indices on the device, queued on the current stream without synchronizing it (a
        plain copy from pageable memory would wait for the work in flight)."""
        index = torch.tensor(values, dtype=torch.int64)
        if not self.on_cuda:
            return index
        return index.pin_memory().to(self.device, non_blocking=True)

    # ----- issuing a chunk (the pump thread on CUDA, the caller on CPU) -----

    def issue(self, chunk: CopyChunk) -> None:
        """Queue one chunk's copies on its copy stream (on CPU: copy it)."""
        stream = self.streams.get(chunk.offload)
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if stream is not None:
                if chunk.after is not None:
                    stream.wait_event(chunk.after)
                if not chunk.offload and self.last_offload_done is not None:
                    stream.wait_event(self.last_offload_done)
                if chunk.starts_load:
                    chunk.started = torch.cuda.Event(enable_timing=True)
                    chunk.started.record(stream)
            began = time.perf_counter()
            if chunk.offload:
                self._copy_out(chunk)
            else:
                self._copy_in(chunk)
            chunk.copy_seconds = (began, time.perf_counter())
            if stream is not None:
                done = torch.cuda.Event(enable_timing=chunk.ends is not None)
                done.record(stream)
                chunk.done = done
                if chunk.offload:
                    self.last_offload_done = done
        chunk.issued.set()

    def _copy_out(self, chunk: CopyChunk) -> None:
        staging = chunk.gathered
        if staging is None:
            count = len(chunk.blocks)
            staging = [torch.index_select(tensor, 0, chunk.index, out=stage[:count])
                       for tensor, stage in zip(self.cache_tensors, self._staging(True))]
        for first, slot, length in slot_runs(chunk.slots):
            for stage, host in zip(staging, self.host):
                host[slot : slot + length].copy_(stage[first : first + length], non_blocking=self.on_cuda)

    def _copy_in(self, chunk: CopyChunk) -> None:
        count = len(chunk.slots)
        if not count:
            return
        staging = [stage[:count] for stage in self._staging(False)]
        for first, slot, length in slot_runs(chunk.slots):
            for stage, host in zip(staging, self.host):
                stage[first : first + length].copy_(host[slot : slot + length], non_blocking=self.on_cuda)
        for tensor, stage in zip(self.cache_tensors, staging):
            tensor.index_copy_(0, chunk.index, stage)

    def _staging(self, offload: bool) -> list[torch.Tensor]:
        """A chunk's worth of every cache tensor on the device, one per direction (made by the
        first chunk that needs it, on its stream): chunks on one stream use it in stream order."""
        if offload not in self.staging:
            self.staging[offload] = [torch.empty((self.blocks_per_chunk, *t.shape[1:]), dtype=t.dtype,
                                                 device=self.device) for t in self.cache_tensors]
        return self.staging[offload]

