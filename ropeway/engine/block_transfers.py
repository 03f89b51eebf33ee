"""The host tier's memory and the copies between it and the KV pool.

A block is whatever the pool holds for it in every cache tensor (keys and values, and any other
per-block tensor: the landmark slot bias, a quantized cache's scales), copied as raw elements of
each tensor's own dtype. The host side holds one buffer per cache tensor, one row per slot: a
block's bytes for all layers are one run there (pinned on CUDA at exactly its size, so copies are
asynchronous), and consecutive slots are one run too. A tensor that holds zeros until its owner
first writes one (the landmark slot bias: only landmark caches write it) is not copied before
then: its host rows start as zeros too, so every copy skipped would have copied zeros.

A step's copies become a FIFO of chunks (CopyChunk) of at most CHUNK_BYTES. On CUDA a pump thread
(copy_pump.py) issues them, offloads on one copy stream and loads on another (PCIe moves both
ways at once), never more than QUEUE_DEPTH chunks ahead on either: if a copy engine serves copies
in the order they reach it (benchmarks/copy_contention.py measures whether it does), a step's own
small host copies (its inputs, its sampled tokens) wait behind at most that much, never behind a
whole 32k-token chat. Nothing here waits for a
copy on the step's stream, and the step loop never waits for one either: the scheduler keeps a
loading sequence out of every batch until finished() sees its last chunk done.

The step loop's share of a move is kept to a few array operations, whatever its size: the
chunks of a load are cut by the pump thread as it issues them (a 32k-token chat is hundreds of
chunks: made up front, they took milliseconds of the step that started the load).

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

import time
from collections import deque
from collections.abc import Iterator
from contextlib import nullcontext
from itertools import chain
from dataclasses import dataclass, field

import numpy as np
import torch

from ropeway.scheduler import BlockLoad

from .copy_pump import CopyPump
from .pinned_memory import pinned_empty

# One chunk of copying: ~0.6 ms at the ~50 GB/s of pinned PCIe copies on the H200.
CHUNK_BYTES = 32 << 20
# Chunks queued on each copy stream at most: one copying, one ready to start when it ends.
QUEUE_DEPTH = 2
# Blocks gathered on the step's stream and not yet on the host, at most: past it the next such
# offload waits (a safety valve on device memory; a step reuses far fewer blocks than this).
MAX_GATHERED_BYTES = 1 << 30

_NO_SLOTS = np.zeros(0, dtype=np.int64)


@dataclass(eq=False)
class LoadProgress:
    """Where one load's copies are: its last chunk issued yet, and the events around them."""
    load: BlockLoad
    issued: bool = False                   # its last chunk is queued (on CPU: copied)
    started: torch.cuda.Event | None = None  # timing event before its first chunk's copies
    done: torch.cuda.Event | None = None     # after its last chunk's (None on CPU)
    copy_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])  # on CPU: first copy began, last ended


@dataclass(eq=False, slots=True)
class CopyChunk:
    """A chunk of copies on one copy stream: host `slots` paired with the pool blocks `index` (to
    gather from or scatter into) or with rows of `gathered` (blocks the step's stream gathered)."""
    offload: bool
    slots: list[int] | np.ndarray
    index: torch.Tensor | None = None  # the blocks on the device (uploaded with the step's, on its stream)
    gathered: list[torch.Tensor] | None = None
    tensors: int | None = None         # how many of the cache tensors it copies (None: all)
    after: torch.cuda.Event | None = None  # the step's stream, when the chunk was made
    load: LoadProgress | None = None   # the load it copies for
    starts_load: bool = False
    ends_load: bool = False
    done: torch.cuda.Event | None = None  # set once issued (None on CPU)

    @property
    def gathered_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.gathered) if self.gathered else 0


def slot_runs(slots) -> list[tuple[int, int, int]]:
    """(first index, first slot, length) of each run of consecutive slots. (Plain Python: for a
    chunk's few dozen slots numpy's calls cost the pump several times more of the GIL.)"""
    slots = slots.tolist() if isinstance(slots, np.ndarray) else list(slots)
    if slots and slots == list(range(slots[0], slots[0] + len(slots))):  # the usual case: one run
        return [(0, slots[0], len(slots))]
    runs: list[tuple[int, int, int]] = []
    for index, slot in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == slot:
            first, start, length = runs[-1]
            runs[-1] = (first, start, length + 1)
        else:
            runs.append((index, slot, 1))
    return runs


def _pairs_array(pairs: list[tuple[int, int]]) -> np.ndarray:
    """[n, 2] int64 (np.fromiter over the flattened pairs: about twice as fast as np.asarray of tuples)."""
    return np.fromiter(chain.from_iterable(pairs), dtype=np.int64, count=2 * len(pairs)).reshape(-1, 2)


def positions_in(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each value, its index in targets (whose entries are distinct), or -1."""
    if not len(targets) or not len(values):
        return np.full(len(values), -1, dtype=np.int64)
    order = np.argsort(targets, kind="stable")
    at = np.minimum(np.searchsorted(targets[order], values), len(targets) - 1)
    return np.where(targets[order][at] == values, order[at], -1)


class BlockTransfers:
    def __init__(self, cache_tensors: list[torch.Tensor], num_slots: int, chunk_bytes: int | None = None,
                 queue_depth: int | None = None, threaded: bool | None = None,
                 zero_until_written: list[torch.Tensor] = ()):
        """cache_tensors: every per-block tensor of the pool, as views with the block axis first.
        zero_until_written: more such tensors, all zeros until mark_written(); copied from then on.
        threaded: issue chunks from the pump thread (default and required on CUDA; on CPU for tests
        only, since nothing orders a CPU copy after the step's writes but the caller)."""
        self.cache_tensors = list(cache_tensors) + list(zero_until_written)
        self.always_copied = len(cache_tensors)
        self.copied = self.always_copied  # how many of cache_tensors a move copies now
        self.device = self.cache_tensors[0].device
        self.on_cuda = self.device.type == "cuda"
        self.host = [self._host_buffer((num_slots, *t.shape[1:]), t.dtype, zeroed=index >= self.always_copied)
                     for index, t in enumerate(self.cache_tensors)]
        self.bytes_per_slot = sum(t[0].numel() * t.element_size() for t in self.cache_tensors)
        chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        self.blocks_per_chunk = max(1, min(chunk_bytes // self.bytes_per_slot, num_slots))
        # A chunk's worth of every cache tensor on the device, one per direction, made now (not by
        # the pump mid-serving): chunks on one stream use it in stream order.
        self.staging = {offload: [torch.empty((self.blocks_per_chunk, *t.shape[1:]), dtype=t.dtype, device=self.device)
                                  for t in self.cache_tensors] for offload in (True, False)}
        self.streams = {offload: torch.cuda.Stream(self.device) for offload in (True, False)} if self.on_cuda else {}
        self.last_offload_done: torch.cuda.Event | None = None  # of the last offload chunk issued
        # The step-stream event each copy stream last waited for, and the offload chunk the load
        # stream last waited for: the chunks after the first of a move need not wait again.
        self._waited_step: dict[bool, torch.cuda.Event | None] = {True: None, False: None}
        self._waited_offload: torch.cuda.Event | None = None
        self._current_stream: torch.cuda.Stream | None = None  # the pump thread's, as it last set it
        threaded = self.on_cuda if threaded is None else threaded
        if self.on_cuda and not threaded:
            raise ValueError("on CUDA the host tier's copies are issued by its pump thread")
        self.pump = CopyPump(self, QUEUE_DEPTH if queue_depth is None else queue_depth) if threaded else None
        self.loads: deque[LoadProgress] = deque()  # in flight, in order
        self.offloaded_bytes = 0  # totals since start-up
        self.loaded_bytes = 0
        # (bytes, seconds from the load's first copy to its last) of each load finished, for benchmarks.
        self.load_timings: list[tuple[int, float]] = []
        # Seconds the step loop spent in this class's calls, by call (waits included), for benchmarks.
        self.step_loop_seconds = {"move": 0.0, "gathered_wait": 0.0, "finished": 0.0, "wait_for_a_load": 0.0}
        # When a list (benchmarks set one): (offload?, bytes, start event, end event) of every chunk issued.
        self.chunk_events: list[tuple[bool, int, torch.cuda.Event, torch.cuda.Event]] | None = None

    def _host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype, zeroed: bool) -> torch.Tensor:
        if self.on_cuda:
            return pinned_empty(shape, dtype, zeroed)
        return torch.zeros(shape, dtype=dtype) if zeroed else torch.empty(shape, dtype=dtype)

    # ----- the step loop's side -----

    def mark_written(self) -> None:
        """The zero-until-written tensors may hold other values from now on: moves copy them too.
        (Call it before the move of the step that would copy a written value, not after.)"""
        self.copied = len(self.cache_tensors)

    def move(self, offloads: list[tuple[int, int]], loads: list[BlockLoad]) -> None:
        """Queue a step's copies: offloads are (pool block, host slot) pairs the pool lets go of
        before anything in the step writes to them; loads bring host slots back into pool blocks,
        and finished() reports each once done."""
        if not offloads and not loads:
            return
        began = time.perf_counter()
        waited = self.step_loop_seconds["gathered_wait"]
        pairs = _pairs_array(offloads)  # (block, slot)
        copies = [_pairs_array(load.copies) for load in loads]  # (slot, block)
        self.offloaded_bytes += len(pairs) * self.bytes_per_slot
        self.loaded_bytes += sum(len(c) for c in copies) * self.bytes_per_slot
        loaded_blocks = np.concatenate([c[:, 1] for c in copies]) if copies else _NO_SLOTS
        position = positions_in(pairs[:, 0], loaded_blocks)  # in the loads' order; -1: a block no load writes
        chunks = self._gather_now(pairs[position < 0])
        if loads:
            # The blocks a load writes leave first, in the load's order, so chunk k of the load
            # follows the offload chunk that gathers its blocks.
            paired_mask = position >= 0
            order = np.argsort(position[paired_mask], kind="stable")
            paired, paired_position = pairs[paired_mask][order], position[paired_mask][order]
            # Every chunk's blocks in one upload on the step's stream (an upload on a copy stream
            # would queue behind the other direction's chunks).
            index = self._index(np.concatenate([paired[:, 0], loaded_blocks]))
            after = self._record_step_stream()
            progress = [LoadProgress(load) for load in loads]
            self.loads.extend(progress)
            self._queue(chunks)
            self._queue(self._load_chunks(copies, progress, paired, paired_position, index, after, self.copied))
        else:
            self._queue(chunks)
        self.step_loop_seconds["move"] += (time.perf_counter() - began
                                           - (self.step_loop_seconds["gathered_wait"] - waited))

    def offload(self, copies: list[tuple[int, int]]) -> None:
        self.move(copies, [])

    def load(self, loads: list[BlockLoad]) -> None:
        self.move([], loads)

    def finished(self) -> list[BlockLoad]:
        """The loads whose blocks are in the pool now (polled, never waited for; loads end in order)."""
        began = time.perf_counter()
        if self.pump is not None:
            self.pump.raise_if_failed()
        done = []
        while self.loads and self._is_done(self.loads[0]):
            progress = self.loads.popleft()
            seconds = (progress.started.elapsed_time(progress.done) / 1000 if progress.started is not None
                       else progress.copy_seconds[1] - progress.copy_seconds[0])
            self.load_timings.append((len(progress.load.copies) * self.bytes_per_slot, seconds))
            done.append(progress.load)
        self.step_loop_seconds["finished"] += time.perf_counter() - began
        return done

    def wait_for_a_load(self) -> list[BlockLoad]:
        """Wait until the oldest load in flight is done (when nothing else can run meanwhile)."""
        began = time.perf_counter()
        if self.loads:
            progress = self.loads[0]
            if self.pump is not None:
                self.pump.wait_until(lambda: progress.issued)
            if progress.done is not None:
                progress.done.synchronize()
        self.step_loop_seconds["wait_for_a_load"] += time.perf_counter() - began
        return self.finished()

    def paused(self):
        """A context in which no copy is issued from another thread (see CopyPump.paused)."""
        return self.pump.paused() if self.pump is not None else nullcontext()

    @property
    def busy(self) -> bool:
        """Whether copies are queued or in flight."""
        return bool(self.loads) or (self.pump is not None and self.pump.busy)

    @staticmethod
    def _is_done(progress: LoadProgress) -> bool:
        return progress.issued and (progress.done is None or progress.done.query())

    def _queue(self, chunks) -> None:
        if self.pump is not None:
            self.pump.submit(chunks)
        else:
            for chunk in chunks:
                self.issue(chunk)

    def _record_step_stream(self) -> torch.cuda.Event | None:
        if not self.on_cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def _gather_now(self, offloads: np.ndarray) -> list[CopyChunk]:
        """Gather blocks on the step's stream (before the step writes to them); chunks to copy them to the host."""
        if not len(offloads):
            return []
        if self.pump is not None:
            began = time.perf_counter()
            self.pump.wait_for_gathered_bytes(MAX_GATHERED_BYTES)
            self.step_loop_seconds["gathered_wait"] += time.perf_counter() - began
        blocks = self._index(offloads[:, 0])
        gathered = [self._gather(tensor, blocks) for tensor in self.cache_tensors[: self.copied]]
        after = self._record_step_stream()
        size = self.blocks_per_chunk
        return [CopyChunk(True, offloads[start : start + size, 1], gathered=[g[start : start + size] for g in gathered],
                          tensors=self.copied, after=after)
                for start in range(0, len(offloads), size)]

    def _load_chunks(self, copies: list[np.ndarray], progress: list[LoadProgress], paired: np.ndarray,
                     paired_position: np.ndarray, index: torch.Tensor, after, tensors: int) -> Iterator[CopyChunk]:
        """The chunks of the step's loads, each after the offload chunk(s) of the blocks it writes
        (cut lazily, by whoever issues them). index: the paired blocks, then the loaded ones."""
        size = self.blocks_per_chunk
        first_loaded = len(paired)  # row of index where the loaded blocks begin
        start = 0  # position of the load's first copy among all loads'
        for load_copies, load in zip(copies, progress):
            end = start + len(load_copies)
            if start == end:  # nothing to copy: done once what came before is
                yield CopyChunk(False, _NO_SLOTS, tensors=tensors, after=after, load=load, starts_load=True,
                                ends_load=True)
            firsts = list(range(start, end, size))
            # Rows of `paired` before each chunk of the load and after its last (one numpy call a load).
            cuts = np.searchsorted(paired_position, firsts + [end]).tolist()
            for chunk_index, first in enumerate(firsts):
                last = min(first + size, end)
                low, high = cuts[chunk_index], cuts[chunk_index + 1]
                for row in range(low, high, size):
                    stop = min(row + size, high)
                    yield CopyChunk(True, paired[row:stop, 1], index=index[row:stop], tensors=tensors, after=after)
                yield CopyChunk(False, load_copies[first - start : last - start, 0],
                                index=index[first_loaded + first : first_loaded + last], tensors=tensors,
                                after=after, load=load, starts_load=first == start, ends_load=last == end)
            start = end

    def _gather(self, tensor: torch.Tensor, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """tensor's rows `index` (into out if given). On CPU by copies of runs of rows: torch's
        index_select walks a strided pool view element by element there (a 25 MB gather took
        400 ms on the 2-core test box, its run copies 12 ms)."""
        if self.on_cuda:
            return torch.index_select(tensor, 0, index, out=out) if out is not None else tensor.index_select(0, index)
        if out is None:
            out = torch.empty((len(index), *tensor.shape[1:]), dtype=tensor.dtype)
        for first, row, length in slot_runs(index.tolist()):
            out[first : first + length].copy_(tensor[row : row + length])
        return out

    def _index(self, values: np.ndarray) -> torch.Tensor:
        """Block indices on the device, queued on the current stream without synchronizing it (a
        plain copy from pageable memory would wait for the work in flight)."""
        index = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
        if not self.on_cuda:
            return index
        return index.pin_memory().to(self.device, non_blocking=True)

    # ----- issuing a chunk (the pump thread on CUDA, the caller on CPU) -----

    def issue(self, chunk: CopyChunk) -> None:
        """Queue one chunk's copies on its copy stream (on CPU: copy it)."""
        stream = self.streams.get(chunk.offload)
        if stream is None:
            self._issue_on_cpu(chunk)
            return
        if stream is not self._current_stream:  # the pump thread's current stream: set once per switch
            torch.cuda.set_stream(stream)
            self._current_stream = stream
        if chunk.after is not None and chunk.after is not self._waited_step[chunk.offload]:
            stream.wait_event(chunk.after)
            self._waited_step[chunk.offload] = chunk.after
        if not chunk.offload and self.last_offload_done is not self._waited_offload:
            stream.wait_event(self.last_offload_done)
            self._waited_offload = self.last_offload_done
        timed = self.chunk_events is not None
        started = None
        if chunk.starts_load or timed:
            started = torch.cuda.Event(enable_timing=True)
            started.record(stream)
            if chunk.starts_load:
                chunk.load.started = started
        if chunk.offload:
            self._copy_out(chunk)
        else:
            self._copy_in(chunk)
        done = torch.cuda.Event(enable_timing=chunk.ends_load or timed)
        done.record(stream)
        chunk.done = done
        if chunk.offload:
            self.last_offload_done = done
        if timed:
            self.chunk_events.append((chunk.offload, len(chunk.slots) * self.bytes_per_slot, started, done))
        if chunk.ends_load:
            chunk.load.done = done
            chunk.load.issued = True

    def _issue_on_cpu(self, chunk: CopyChunk) -> None:
        began = time.perf_counter()
        if chunk.offload:
            self._copy_out(chunk)
        else:
            self._copy_in(chunk)
        if chunk.starts_load:
            chunk.load.copy_seconds[0] = began
        if chunk.ends_load:
            chunk.load.copy_seconds[1] = time.perf_counter()
            chunk.load.issued = True

    def _copy_out(self, chunk: CopyChunk) -> None:
        count = len(chunk.slots)
        tensors = len(self.cache_tensors) if chunk.tensors is None else chunk.tensors
        staging = chunk.gathered
        if staging is None:
            staging = [self._gather(tensor, chunk.index, _rows(stage, count))
                       for tensor, stage in zip(self.cache_tensors[:tensors], self.staging[True])]
        for first, slot, length in slot_runs(chunk.slots):
            for stage, host in zip(staging[:tensors], self.host):
                host[slot : slot + length].copy_(_rows(stage, length, first), non_blocking=self.on_cuda)

    def _copy_in(self, chunk: CopyChunk) -> None:
        count = len(chunk.slots)
        if not count:
            return
        tensors = len(self.cache_tensors) if chunk.tensors is None else chunk.tensors
        staging = [_rows(stage, count) for stage in self.staging[False][:tensors]]
        for first, slot, length in slot_runs(chunk.slots):
            for stage, host in zip(staging, self.host):
                _rows(stage, length, first).copy_(host[slot : slot + length], non_blocking=self.on_cuda)
        for tensor, stage in zip(self.cache_tensors, staging):
            tensor.index_copy_(0, chunk.index, stage)


def _rows(tensor: torch.Tensor, count: int, first: int = 0) -> torch.Tensor:
    """tensor[first : first + count], without a slicing call when that is all of it."""
    return tensor if first == 0 and count == tensor.shape[0] else tensor[first : first + count]
