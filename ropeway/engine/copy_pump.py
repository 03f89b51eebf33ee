"""The thread that feeds the host tier's copy streams a chunk at a time.

Queued all at once, a 32k-token chat's copies (GiBs) would sit in the copy engines ahead of the
step's own small host copies, which then wait for all of them: the step stalls for as long as
the chat takes to move. Queued a chunk at a time, a step's copy waits for one chunk at most; but
then something must queue the next chunk as soon as one ends, whatever the step loop is doing
(building a batch, or waiting for the GPU). This thread does: it issues the chunks in order,
each on its direction's stream, keeping at most `depth` in flight on each stream, and sleeps on
the oldest chunk's event (the GIL released) while the streams are full. It makes no CUDA call
while the step loop holds `gate` (paused()): a CUDA graph capture must see none from another thread.

The thread shares the GIL with the step loop: every moment it spends awake is one the step loop
may wait for the GIL. So it does as little Python as a chunk needs, and it counts the time it
spends awake (awake_seconds) for benchmarks to set against the step loop's stalls.
"""

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class CopyPump:
    def __init__(self, transfers, depth: int):
        self.transfers = transfers  # a BlockTransfers: issue(chunk) queues one chunk's copies
        self.depth = max(1, depth)
        # In order: CopyChunks, and iterators of CopyChunks (cut as they come up: a long load's chunks).
        self.queue: deque = deque()
        self.next_chunk = None  # taken from the queue, not issued yet
        self.in_flight = {True: deque(), False: deque()}  # issued chunks, by direction (offload?)
        self.gathered_bytes = 0  # of chunks holding blocks the step's stream gathered, not yet on the host
        self.error: BaseException | None = None
        self.changed = threading.Condition()
        self.gate = threading.Lock()  # held by the thread around its CUDA calls
        self.thread: threading.Thread | None = None
        self.awake_seconds = 0.0  # the thread's time outside its waits (it may hold the GIL then)
        self.chunks_issued = 0

    def submit(self, chunks) -> None:
        """Queue chunks: a list (its chunks may hold gathered blocks) or an iterator (cut lazily)."""
        self.raise_if_failed()
        with self.changed:
            if isinstance(chunks, list):
                self.queue.extend(chunks)
                self.gathered_bytes += sum(chunk.gathered_bytes for chunk in chunks)
            else:
                self.queue.append(chunks)
            self.changed.notify_all()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="kv-host-copies", daemon=True)
            self.thread.start()

    @property
    def busy(self) -> bool:
        """Chunks queued or in flight (read without the lock: a hint for reports)."""
        return bool(self.queue) or self.next_chunk is not None or any(self.in_flight.values())

    def wait_for_gathered_bytes(self, limit: int) -> None:
        self.wait_until(lambda: self.gathered_bytes <= limit)

    def wait_until(self, condition) -> None:
        """Wait until condition() holds (checked whenever a chunk is issued or retired)."""
        with self.changed:
            while not condition() and self.error is None:
                self.changed.wait(0.1)
        self.raise_if_failed()

    @contextmanager
    def paused(self):
        """No CUDA call from the thread meanwhile (its chunks in flight go on)."""
        with self.gate:
            yield

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise RuntimeError("copying KV blocks between the pool and host memory failed") from self.error

    def _run(self) -> None:
        try:
            if self.transfers.on_cuda:
                with self.gate:
                    torch.cuda.set_device(self.transfers.streams[True].device)
            woke = time.perf_counter()
            while True:
                chunk = self._take_next()
                if chunk is None and not any(self.in_flight.values()):
                    self.awake_seconds += time.perf_counter() - woke
                    with self.changed:
                        while not self.queue and not any(self.in_flight.values()):
                            self.changed.wait()
                    woke = time.perf_counter()
                    continue
                with self.gate:
                    self._retire_done()
                    # Sleep until the chunk's stream has room or, with nothing queued, until the oldest
                    # chunk is done and its memory can go.
                    waiting = (self.in_flight[chunk.offload] if chunk is not None
                               else next((chunks for chunks in self.in_flight.values() if chunks), None))
                    if chunk is None or len(waiting) >= self.depth:
                        if waiting:
                            if waiting[0].done is not None:
                                self.awake_seconds += time.perf_counter() - woke
                                waiting[0].done.synchronize()
                                woke = time.perf_counter()
                            self._retire(waiting)
                        continue
                    self.transfers.issue(chunk)
                    self.in_flight[chunk.offload].append(chunk)
                    self.next_chunk = None
                    self.chunks_issued += 1
                    if chunk.ends_load:
                        with self.changed:
                            self.changed.notify_all()
                    chunk = waiting = None  # (what a chunk holds is let go of inside the gate)
        except BaseException as error:  # reported to the step loop by raise_if_failed
            self.error = error
            with self.changed:
                self.changed.notify_all()

    def _take_next(self):
        """The next chunk to issue (kept in next_chunk until issued), or None if none is queued."""
        while self.next_chunk is None:
            with self.changed:
                if not self.queue:
                    return None
                head = self.queue[0]
                if not isinstance(head, Iterator):
                    self.queue.popleft()
                    self.next_chunk = head
                    return head
            chunk = next(head, None)  # an iterator: cut its next chunk outside the lock
            if chunk is None:
                with self.changed:
                    self.queue.popleft()
            else:
                self.next_chunk = chunk
        return self.next_chunk

    def _retire_done(self) -> None:
        for chunks in self.in_flight.values():
            while chunks and (chunks[0].done is None or chunks[0].done.query()):
                self._retire(chunks)

    def _retire(self, chunks: deque) -> None:
        """The oldest chunk of a stream is done: the blocks it gathered on the step's stream can go."""
        chunk = chunks.popleft()
        if chunk.gathered is not None:
            with self.changed:
                self.gathered_bytes -= chunk.gathered_bytes
                chunk.gathered = None
                self.changed.notify_all()
