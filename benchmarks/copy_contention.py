"""How the GPU's copy engines treat a step's small copies while the host tier streams GiBs (issue 20).

The host tier keeps at most QUEUE_DEPTH chunks of CHUNK_BYTES in flight per direction on the
belief that a copy engine serves copies in the order they reach it, so that a step's own small
copy (its inputs, its sampled tokens) waits behind what is queued. This measures it, on CUDA only:

  bandwidth  pinned host <-> device copies one way, and both ways at once, by copy size.
  probes     a 64 KiB copy on another stream every 0.5 ms while a copy stream keeps `depth`
             chunks of `chunk` MiB in flight in the same direction (or one 1 GiB copy, or
             nothing): the probe's time from its stream reaching it to its end (GPU clock), so
             the time it queued behind the bulk copies; with the probe's stream at the default
             and at the highest priority.

  python benchmarks/copy_contention.py --output benchmarks/results/issue20/copy_contention_h200.json

If probes wait about as long as the chunks in flight take, copies are served in order and the
chunk and depth bound a step's wait; if they wait about their own time whatever the bulk does, the
engines interleave streams and the chunking costs bandwidth for nothing.
"""

import argparse
import json
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ropeway.engine.pinned_memory import pinned_empty  # noqa: E402

MIB = 1 << 20
BUFFER_BYTES = 1 << 30
PROBE_BYTES = 64 << 10


class Buffers:
    def __init__(self, device: torch.device):
        self.host = pinned_empty((BUFFER_BYTES,), torch.uint8)
        self.device = torch.empty(BUFFER_BYTES, dtype=torch.uint8, device=device)
        self.host_back = pinned_empty((BUFFER_BYTES,), torch.uint8)  # D2H lands here (both ways at once)
        self.device_out = torch.empty(BUFFER_BYTES, dtype=torch.uint8, device=device)
        self.probe_host = pinned_empty((PROBE_BYTES,), torch.uint8)
        self.probe_device = torch.empty(PROBE_BYTES, dtype=torch.uint8, device=device)

    def copy(self, h2d: bool, offset: int, size: int) -> None:
        if h2d:
            self.device[offset : offset + size].copy_(self.host[offset : offset + size], non_blocking=True)
        else:
            self.host_back[offset : offset + size].copy_(self.device_out[offset : offset + size], non_blocking=True)

    def probe(self, h2d: bool) -> None:
        if h2d:
            self.probe_device.copy_(self.probe_host, non_blocking=True)
        else:
            self.probe_host.copy_(self.probe_device, non_blocking=True)


def timed_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def bandwidth(buffers: Buffers, sizes_mib: list[int]) -> dict:
    """GB/s of back-to-back copies of each size over the whole buffer, one way and both ways."""
    streams = {True: torch.cuda.Stream(), False: torch.cuda.Stream()}
    rows = {}
    for size_mib in sizes_mib:
        size = size_mib * MIB
        row = {}
        for label, directions in (("h2d", (True,)), ("d2h", (False,)), ("both", (True, False))):
            torch.cuda.synchronize()
            marks = {}
            for h2d in directions:
                with torch.cuda.stream(streams[h2d]):
                    start = timed_event(streams[h2d])
                    for offset in range(0, BUFFER_BYTES - size + 1, size):
                        buffers.copy(h2d, offset, size)
                    marks[h2d] = (start, timed_event(streams[h2d]))
            torch.cuda.synchronize()
            copied = (BUFFER_BYTES // size) * size
            row[label] = {("h2d" if h2d else "d2h"): copied / start.elapsed_time(end) / 1e6
                          for h2d, (start, end) in marks.items()}
        rows[f"{size_mib} MiB"] = row
    return rows


def probes(buffers: Buffers, h2d: bool, chunk_mib: int, depth: int, priority: int, seconds: float) -> dict:
    """Probe copies on their own stream while the bulk stream keeps `depth` chunks in flight."""
    bulk_stream = torch.cuda.Stream()
    probe_stream = torch.cuda.Stream(priority=priority)
    chunk = chunk_mib * MIB
    in_flight: deque = deque()
    marks, bulk_bytes, offset = [], 0, 0
    torch.cuda.synchronize()
    bulk_start = timed_event(bulk_stream)
    ends = time.perf_counter() + seconds
    next_probe = time.perf_counter()
    while time.perf_counter() < ends:
        while chunk and len(in_flight) < depth:
            with torch.cuda.stream(bulk_stream):
                buffers.copy(h2d, offset, chunk)
                in_flight.append(timed_event(bulk_stream))
            bulk_bytes += chunk
            offset = (offset + chunk) % (BUFFER_BYTES - chunk + 1)
        while in_flight and in_flight[0].query():
            in_flight.popleft()
        if time.perf_counter() >= next_probe:
            with torch.cuda.stream(probe_stream):
                start = timed_event(probe_stream)
                buffers.probe(h2d)
                marks.append((start, timed_event(probe_stream)))
            next_probe += 0.0005
    bulk_end = timed_event(bulk_stream)
    torch.cuda.synchronize()
    waits = sorted(start.elapsed_time(end) for start, end in marks)
    bulk_ms = bulk_start.elapsed_time(bulk_end)
    return {"probes": len(waits), "p50_ms": statistics.median(waits),
            "p99_ms": waits[min(len(waits) - 1, int(0.99 * len(waits)))], "max_ms": waits[-1],
            "bulk_gb_per_s": bulk_bytes / bulk_ms / 1e6 if chunk and bulk_ms > 0 else None}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="per probe setting")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("copy_contention.py measures the GPU's copy engines: it needs CUDA")
    device = torch.device("cuda")
    buffers = Buffers(device)
    low, high = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (0, -1)
    result = {"device": torch.cuda.get_device_name(device), "bandwidth_gb_per_s": bandwidth(buffers, [2, 8, 32, 128]),
              "probes": {}}
    for label, gb in result["bandwidth_gb_per_s"].items():
        print(f"{label:>8}: " + "; ".join(f"{way} " + ", ".join(f"{k} {v:.1f}" for k, v in row.items())
                                           for way, row in gb.items()) + " GB/s")
    # (chunk MiB, depth): nothing, the pump's default, smaller and larger chunks, deeper, one 1 GiB copy.
    settings = [(0, 0), (8, 2), (32, 2), (128, 2), (32, 8), (1024, 1)]
    for h2d in (True, False):
        for chunk_mib, depth in settings:
            for priority in sorted({low, high}, reverse=True):
                row = probes(buffers, h2d, chunk_mib, depth, priority, args.seconds)
                key = f"{'h2d' if h2d else 'd2h'} chunk {chunk_mib} MiB depth {depth} priority {priority}"
                result["probes"][key] = row
                rate = f", bulk {row['bulk_gb_per_s']:.1f} GB/s" if row["bulk_gb_per_s"] else ""
                print(f"{key}: probe p50 {row['p50_ms']:.3f} ms, p99 {row['p99_ms']:.3f} ms, "
                      f"max {row['max_ms']:.3f} ms{rate}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
