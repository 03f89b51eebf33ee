"""Where each engine step's time went, for benchmarks that hunt stalls.

Wraps an LLMEngine's step loop (instance attributes only; nothing in ropeway changes) and keeps
one record per step:
- host time by phase: scheduling, the host tier's calls (BlockTransfers.step_loop_seconds, by
  call: move, gathered_wait, finished, wait_for_a_load), reading the previous step's results
  (resolve: with asynchronous scheduling the wait for the previous step's GPU work), and the rest;
- the copy pump thread's time awake during the step (it shares the GIL with the step loop);
- the garbage collector's passes during the step (gc.callbacks; any thread's);
- on CUDA, GPU time read from events once the run is over: the step's forward (execute), its
  input uploads (host-to-device copies: they queue behind the host tier's on a busy copy
  engine) and its sampled tokens' copy back.
Counters a tree lacks (the host tier's, before they existed) are reported as None, so the same
benchmark runs on older code.
"""

import gc
import time

import torch


class StepAttribution:
    def __init__(self, engine):
        core = engine.core
        self.core = core
        self.cuda = core.device.type == "cuda"
        self.transfers = core.runner.block_transfers
        self.records: list[dict] = []
        self._current: dict | None = None
        self._wrap(core, "_resolve", "resolve_s")
        self._wrap(core.scheduler, "schedule", "schedule_s")
        self._wrap(core.runner, "execute", "execute_s", gpu_key="execute")
        self._wrap(core.runner, "upload_arrays", None, gpu_key="h2d")
        self._wrap_token_copies()
        self._gc_began: float | None = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_began = time.perf_counter()
        elif self._gc_began is not None:
            record = self._current
            if record is not None:
                record["gc_s"] += time.perf_counter() - self._gc_began
                record["gc_passes"].append(info.get("generation"))
            self._gc_began = None

    def _wrap(self, owner, name: str, host_key: str | None, gpu_key: str | None = None) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            record = self._current
            if record is None:
                return inner(*args, **kwargs)
            start = self._event() if gpu_key else None
            began = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if host_key:
                    record[host_key] += time.perf_counter() - began
                if start is not None:
                    record["events"].setdefault(gpu_key, []).append((start, self._event()))

        setattr(owner, name, timed)

    def _wrap_token_copies(self) -> None:
        """The sampled tokens' copy to the host (SampledTokens.queue_host_copy, for every engine)."""
        from ropeway.engine.sampler import SampledTokens

        if getattr(SampledTokens.queue_host_copy, "attributed", False):
            inner = SampledTokens.queue_host_copy.inner
        else:
            inner = SampledTokens.queue_host_copy
        attribution = self

        def queue_host_copy(tokens):
            record = attribution._current
            start = attribution._event() if record is not None else None
            inner(tokens)
            if start is not None:
                record["events"].setdefault("d2h", []).append((start, attribution._event()))

        queue_host_copy.attributed, queue_host_copy.inner = True, inner
        SampledTokens.queue_host_copy = queue_host_copy

    def _event(self):
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _tier_counters(self) -> tuple[dict | None, float | None]:
        transfers = self.transfers
        seconds = getattr(transfers, "step_loop_seconds", None) if transfers is not None else None
        pump = getattr(transfers, "pump", None) if transfers is not None else None
        awake = getattr(pump, "awake_seconds", None) if pump is not None else None
        return (dict(seconds) if seconds is not None else None), awake

    def begin(self) -> None:
        tier, awake = self._tier_counters()
        self._current = {"resolve_s": 0.0, "schedule_s": 0.0, "execute_s": 0.0, "gc_s": 0.0, "gc_passes": [],
                         "events": {},
                         "_tier": tier, "_awake": awake, "_began": time.perf_counter()}

    def end(self, **fields) -> dict:
        """Close the step's record (fields: the caller's own, e.g. whether blocks moved)."""
        record, self._current = self._current, None
        record["wall_s"] = time.perf_counter() - record.pop("_began")
        tier_before, awake_before = record.pop("_tier"), record.pop("_awake")
        tier_after, awake_after = self._tier_counters()
        if tier_before is not None and tier_after is not None:
            record["tier_s"] = {name: tier_after[name] - tier_before.get(name, 0.0) for name in tier_after}
        else:
            record["tier_s"] = None
        record["pump_awake_s"] = (awake_after - (awake_before or 0.0)) if awake_after is not None else None
        tier_total = sum(record["tier_s"].values()) if record["tier_s"] else 0.0
        record["other_host_s"] = record["wall_s"] - record["resolve_s"] - record["schedule_s"] - tier_total
        record.update(fields)
        self.records.append(record)
        return record

    def resolve_gpu_times(self) -> None:
        """Turn every record's events into milliseconds (call once the run is over)."""
        if self.cuda:
            torch.cuda.synchronize()
        for record in self.records:
            events = record.pop("events")
            for key in ("execute", "h2d", "d2h"):
                pairs = events.get(key, [])
                record[f"gpu_{key}_ms"] = (sum(start.elapsed_time(end) for start, end in pairs)
                                          if self.cuda and pairs else None)


def ms(value: float | None) -> float | None:
    return None if value is None else 1000 * value


def attribution_row(record: dict, baseline_s: float, previous: dict | None) -> dict:
    """One step's figures in milliseconds: its excess over the baseline and where it went."""
    tier = record["tier_s"]
    return {
        "step": record["index"], "wall_ms": ms(record["wall_s"]), "excess_ms": ms(record["wall_s"] - baseline_s),
        "schedule_ms": ms(record["schedule_s"]), "resolve_ms": ms(record["resolve_s"]),
        "tier_ms": {name: ms(seconds) for name, seconds in tier.items()} if tier is not None else None,
        "pump_awake_ms": ms(record["pump_awake_s"]), "other_host_ms": ms(record["other_host_s"]),
        "gc_ms": ms(record["gc_s"]), "gc_generations": record["gc_passes"] or None,
        "execute_host_ms": ms(record["execute_s"]),
        "gpu_execute_ms": record["gpu_execute_ms"], "gpu_h2d_ms": record["gpu_h2d_ms"],
        "gpu_d2h_ms": record["gpu_d2h_ms"],
        # With asynchronous scheduling, resolve waits for the previous step's GPU work.
        "previous_gpu_execute_ms": previous["gpu_execute_ms"] if previous is not None else None,
        "offloads": record.get("offloads"), "loads": record.get("loads"), "batch": record.get("batch"),
    }


def copy_stream_summary(chunk_events: list, first: int, last: int) -> dict | None:
    """The host tier's copy streams over chunks [first, last) of BlockTransfers.chunk_events:
    per direction, bytes, time copying, span from first copy to last, idle time within it (the
    stream waited for the other direction or for the pump to issue) and GB/s while copying."""
    chunks = chunk_events[first:last]
    if not chunks:
        return None
    summary = {}
    for offload, label in ((True, "offload"), (False, "load")):
        mine = [(size, start, end) for is_offload, size, start, end in chunks if is_offload == offload]
        if not mine:
            continue
        busy = sum(start.elapsed_time(end) for _, start, end in mine)
        span = mine[0][1].elapsed_time(mine[-1][2])
        size = sum(s for s, _, _ in mine)
        summary[label] = {"chunks": len(mine), "bytes": size, "copying_ms": busy, "span_ms": span,
                          "idle_ms": span - busy, "gb_per_s_copying": size / busy / 1e6 if busy > 0 else None,
                          "gb_per_s_span": size / span / 1e6 if span > 0 else None}
    return summary
