"""The host tier's memory and the copies between it and the KV pool.

A block is whatever the pool holds for it in every cache tensor (keys and values, and any other
per-block tensor: the landmark slot bias, a quantized cache's scales), copied as raw elements of
each tensor's own dtype. The host side holds one buffer per cache tensor, one row per slot
(pinned on CUDA, so copies are asynchronous).

On CUDA nothing here waits for PCIe on the step's stream:
- offload (pool -> host): the blocks are gathered into a staging tensor on the step's own
  stream, before anything in the step writes to the pool (a gather is a device copy, tens of
  microseconds for hundreds of MiB), then a side stream copies the staging tensor to the host.
- load (host -> pool): the side stream copies host rows into a staging tensor, waits for what
  the step's stream queued before (the destination blocks' previous contents), and scatters
  them into the pool. The scheduler keeps the sequence out of every batch until the engine
  sees the load's event done.
Offloads and loads share the side stream, so a load from a slot comes after the offload that
filled it. On CPU every copy is done when the call returns.
"""

from collections import deque
from dataclasses import dataclass

import torch

from ropeway.scheduler import BlockLoad

# Staging tensors of offloads still copying to the host, at most: past it an offload waits for
# the oldest (PCIe moves ~50 GB/s, so this bounds a wait to ~10 ms and is not reached at
# serving rates).
MAX_STAGING_BYTES = 512 << 20
# A load goes through staging tensors of at most this size on the side stream.
LOAD_STAGING_BYTES = 256 << 20


@dataclass
class Transfer:
    done: torch.cuda.Event | None
    staging: list[torch.Tensor]
    loads: list[BlockLoad]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.staging)


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


class BlockTransfers:
    def __init__(self, cache_tensors: list[torch.Tensor], num_slots: int):
        """cache_tensors: every per-block tensor of the pool, as views with the block axis first."""
        self.cache_tensors = cache_tensors
        self.device = cache_tensors[0].device
        on_cuda = self.device.type == "cuda"
        self.host = [torch.empty((num_slots, *t.shape[1:]), dtype=t.dtype, pin_memory=on_cuda)
                     for t in cache_tensors]
        self.bytes_per_slot = sum(t[0].numel() * t.element_size() for t in cache_tensors)
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None
        self.in_flight: deque[Transfer] = deque()
        self.offloaded_bytes = 0  # totals since start-up
        self.loaded_bytes = 0

    def offload(self, copies: list[tuple[int, int]]) -> None:
        """Copy pool blocks to host slots: (block, slot) pairs."""
        if not copies:
            return
        blocks = self._index([block for block, _ in copies])
        slots = [slot for _, slot in copies]
        self.offloaded_bytes += len(copies) * self.bytes_per_slot
        staging = [tensor.index_select(0, blocks) for tensor in self.cache_tensors]
        if self.stream is None:
            self._to_host(staging, slots)
            return
        self._bound_staging()
        gathered = torch.cuda.Event()
        gathered.record()
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(gathered)
            self._to_host(staging, slots)
            done = torch.cuda.Event()
            done.record()
        self.in_flight.append(Transfer(done, staging, []))

    def load(self, loads: list[BlockLoad]) -> None:
        """Start copying host slots back into pool blocks; finished() reports each load once done."""
        copies = [copy for load in loads for copy in load.copies]
        if not copies:
            return
        slots = [slot for slot, _ in copies]
        self.loaded_bytes += len(copies) * self.bytes_per_slot
        blocks = self._index([block for _, block in copies])
        if self.stream is None:
            for tensor, host in zip(self.cache_tensors, self.host):
                tensor.index_copy_(0, blocks, host.index_select(0, torch.tensor(slots, dtype=torch.int64)))
            self.in_flight.append(Transfer(None, [], loads))
            return
        # The destination blocks' old contents may still be read or written by the step queued before.
        ready = torch.cuda.Event()
        ready.record()
        blocks.record_stream(self.stream)  # made on the step's stream, read on the side stream
        # Through a bounded staging tensor, a chunk at a time (a 32k-token chat is GiBs).
        per_chunk = max(1, LOAD_STAGING_BYTES // self.bytes_per_slot)
        with torch.cuda.stream(self.stream):
            for start in range(0, len(copies), per_chunk):
                chunk_slots = slots[start : start + per_chunk]
                staging = [torch.empty((len(chunk_slots), *t.shape[1:]), dtype=t.dtype, device=self.device)
                           for t in self.cache_tensors]
                for first, slot, length in slot_runs(chunk_slots):
                    for stage, host in zip(staging, self.host):
                        stage[first : first + length].copy_(host[slot : slot + length], non_blocking=True)
                if start == 0:
                    self.stream.wait_event(ready)
                for tensor, stage in zip(self.cache_tensors, staging):
                    tensor.index_copy_(0, blocks[start : start + len(chunk_slots)], stage)
            done = torch.cuda.Event()
            done.record()
        # (Staging made and used on the side stream alone: the allocator reuses it in stream order.)
        self.in_flight.append(Transfer(done, [], loads))

    def finished(self) -> list[BlockLoad]:
        """The loads whose blocks are in the pool now (one stream: transfers end in order)."""
        loads = []
        while self.in_flight and (self.in_flight[0].done is None or self.in_flight[0].done.query()):
            loads += self.in_flight.popleft().loads
        return loads

    def wait_for_a_load(self) -> list[BlockLoad]:
        """Wait until the oldest load in flight is done (when nothing else can run meanwhile)."""
        for transfer in self.in_flight:
            if transfer.loads:
                if transfer.done is not None:
                    transfer.done.synchronize()
                break
        return self.finished()

    def _index(self, values: list[int]) -> torch.Tensor:
        """Block indices on the device, without synchronizing the step's stream (a plain copy from
        pageable memory would wait for the step in flight)."""
        index = torch.tensor(values, dtype=torch.int64)
        if self.stream is None:
            return index
        return index.pin_memory().to(self.device, non_blocking=True)

    def _to_host(self, staging: list[torch.Tensor], slots: list[int]) -> None:
        for first, slot, length in slot_runs(slots):
            for stage, host in zip(staging, self.host):
                host[slot : slot + length].copy_(stage[first : first + length], non_blocking=self.stream is not None)

    def _bound_staging(self) -> None:
        staged = sum(t.num_bytes for t in self.in_flight)
        for transfer in self.in_flight:
            if staged <= MAX_STAGING_BYTES:
                return
            transfer.done.synchronize()
            staged -= transfer.num_bytes
            transfer.staging = []  # its loads stay for finished(); only the memory goes now
