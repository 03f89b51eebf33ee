"""What the copy pump's calls per chunk cost a busy step loop through the GIL, on CPU (issue 20).

The host tier's pump thread (ropeway/engine/copy_pump.py, run here as it is) issues chunks to a
stand-in copy engine that finishes each chunk --chunk-ms after it starts (one engine per
direction, chunks in order), making `calls` small torch calls per chunk as issuing a real chunk
does (each releases and re-takes the GIL, as CUDA calls do). Meanwhile this thread runs
step-like work (Python, then small torch calls) over and over. Reported per setting: the step's
p50 and p99 time, the chunks the pump got issued (what bandwidth it could sustain at 32 MiB a
chunk) and its time awake. On the GPU a chunk costs the pump about 7 calls (a stream switch, a
wait, a gather or scatter, a copy, an event); before this change about 17.

  python benchmarks/pump_gil_cpu.py [--switch-interval-ms 0.2] [--output results.json]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ropeway.engine.block_transfers import CopyChunk  # noqa: E402
from ropeway.engine.copy_pump import CopyPump  # noqa: E402


class FinishesAt:
    """A chunk's event: done at a set time on the stand-in engine's clock."""

    def __init__(self, at: float):
        self.at = at

    def query(self) -> bool:
        return time.perf_counter() >= self.at

    def synchronize(self) -> None:
        left = self.at - time.perf_counter()
        if left > 0:
            time.sleep(left)  # (releases the GIL, as a CUDA event's synchronize does)


class StandInTransfers:
    on_cuda = False

    def __init__(self, calls: int, chunk_seconds: float):
        self.calls, self.chunk_seconds = calls, chunk_seconds
        self.scratch = torch.zeros(16)
        self.engine_free_at = {True: 0.0, False: 0.0}

    def issue(self, chunk: CopyChunk) -> None:
        for _ in range(self.calls):
            self.scratch.add_(1)
        start = max(time.perf_counter(), self.engine_free_at[chunk.offload])
        self.engine_free_at[chunk.offload] = start + self.chunk_seconds
        chunk.done = FinishesAt(start + self.chunk_seconds)


def step_like(x: torch.Tensor) -> int:
    total = 0
    for i in range(300):  # scheduling-like Python
        total += i * i
    for _ in range(60):  # launch-like torch calls
        x.mul_(1.0)
    return total


def chunks_until(stop: list[bool]):
    """Chunks both ways, alternately, until stop[0] is set."""
    k = 0
    while not stop[0]:
        yield CopyChunk(k % 2 == 0, [k])
        k += 1


def run(calls: int | None, seconds: float, chunk_seconds: float) -> dict:
    x = torch.zeros(64)
    pump, stop = None, [False]
    if calls is not None:
        pump = CopyPump(StandInTransfers(calls, chunk_seconds), depth=2)
        pump.submit(chunks_until(stop))
    times = []
    ends = time.perf_counter() + seconds
    while time.perf_counter() < ends:
        began = time.perf_counter()
        step_like(x)
        times.append(time.perf_counter() - began)
    stop[0] = True
    if pump is not None:
        pump.wait_until(lambda: not pump.busy)
    times.sort()
    issued = pump.chunks_issued if pump else 0
    return {"calls_per_chunk": calls, "step_p50_ms": 1000 * statistics.median(times),
            "step_p99_ms": 1000 * times[int(0.99 * len(times))], "chunks_issued": issued,
            "gib_per_s_at_32_mib": issued * 32 / 1024 / seconds, "pump_awake_s": pump.awake_seconds if pump else 0.0,
            "most_chunks": int(2 * seconds / chunk_seconds)}


def main() -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="per setting")
    parser.add_argument("--chunk-ms", type=float, default=0.6, help="the stand-in engine's time per chunk")
    parser.add_argument("--switch-interval-ms", type=float, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    rows = [run(calls, args.seconds, args.chunk_ms / 1000) for calls in (None, 7, 17, 40)]
    for row in rows:
        print(f"pump calls per chunk {row['calls_per_chunk']}: step p50 {row['step_p50_ms']:.3f} ms, "
              f"p99 {row['step_p99_ms']:.3f} ms; {row['chunks_issued']} of at most {row['most_chunks']} chunks "
              f"issued ({row['gib_per_s_at_32_mib']:.1f} GiB/s at 32 MiB); pump awake {row['pump_awake_s']:.2f} s")
    if args.output:
        result = {"switch_interval_s": sys.getswitchinterval(), "rows": rows}
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
