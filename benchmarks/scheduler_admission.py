"""The scheduler's CPU time per step while a 32k-token host-tier hit is admitted (issue 20).

No model, no GPU: the real Scheduler, BlockManager and HostTier, sized like the H200 run of
long_memory_sessions.py (Llama-3-8B shape: 128 KiB of KV per token, 16-token blocks, a 12 GiB pool
and a 32 GiB host tier), with 8 streams decoding all along. A simulated engine drives the steps:
each step it reports the loads whose copies would be done by then (at LOAD_GB_PER_S), calls
loads_finished() and schedule(), and books the step. The engine pipelines steps, so every
millisecond of these calls in one step delays the decodes of that step.

Scenarios, each timed from the hit's arrival until it samples its first token:
  prefix   a 32k chat whose blocks the pool reused comes back (its prefix-cache blocks are in the
           host tier); the blocks its load takes are another finished 32k chat's, which leave for
           the host tier in the same steps
  session  a 32k chat under a bounded policy whose retained session the store moved to the host
           tier comes back
The steps that push the chats to the host tier (offloads of 2,048 blocks) are timed too
("offload" rows). The times include the garbage collector's; gc_ms gives its share of each step.

  python benchmarks/scheduler_admission.py --output benchmarks/results/scheduler_admission.json
  python benchmarks/scheduler_admission.py --profile prefix   # cProfile of the hit's steps
"""

import argparse
import cProfile
import gc
import json
import platform
import pstats
import random
import statistics
import time
from pathlib import Path

import ropeway
from ropeway.scheduler import (BlockManager, ContextPolicy, HostTier, RopePlan, Scheduler, SchedulerConfig, Sequence)

BLOCK_SIZE = 16
BYTES_PER_TOKEN = 128 << 10  # Llama-3-8B in bf16: 32 layers x 2 (K, V) x 8 KV heads x 128 dims x 2 bytes
POOL_BYTES = 12 << 30
HOST_BYTES = 32 << 30
HISTORY_TOKENS = 32768
NEW_TURN_TOKENS = 32
DECODERS = 8
DECODE_STEP_S = 0.008       # a decode step at B=8 on the H200: how many steps a load's copies span
LOAD_GB_PER_S = 30.0        # a hit's loads on the H200 (BENCHMARKS.md, issue 20)
PLAN = RopePlan("default", 500000.0, 128, 8192)
SESSION_POLICY = ContextPolicy(type="sink_window", sinks=4, window=HISTORY_TOKENS + 1024)
FULL_CACHE = ContextPolicy()


class GarbageCollectorClock:
    """Time the cyclic garbage collector spends, so that a step's collection shows apart from its own work."""

    def __init__(self):
        self.seconds = 0.0
        self._began = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._began


GC_CLOCK = GarbageCollectorClock()


class SimulatedEngine:
    """Steps the scheduler as the engine core does, timing its calls; loads finish after their copy time."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.block_bytes = BLOCK_SIZE * BYTES_PER_TOKEN
        self.in_flight: list[tuple[int, object]] = []  # (step it is done at, load), in issue order
        self.copy_free_at = 0.0  # the copy stream's clock, in steps: loads copy one after another
        self.step_index = 0
        self.steps: list[dict] = []
        self.next_id = 0

    def sequence(self, tokens: list[int], max_new: int, policy: ContextPolicy = FULL_CACHE) -> Sequence:
        self.next_id += 1
        return Sequence(seq_id=self.next_id, request_id=str(self.next_id), choice_index=0,
                        prompt_token_ids=tokens, rope_plan=PLAN, arrival=self.next_id,
                        max_total_tokens=len(tokens) + max_new, context_policy=policy)

    def step(self) -> dict:
        scheduler = self.scheduler
        done_loads = []
        while self.in_flight and self.in_flight[0][0] <= self.step_index:
            done_loads.append(self.in_flight.pop(0)[1])
        gc_before = GC_CLOCK.seconds
        began = time.perf_counter()
        scheduler.loads_finished(done_loads)
        finished_at = time.perf_counter()
        plan = scheduler.schedule()
        scheduled_at = time.perf_counter()
        for load in plan.loads:
            copy_steps = len(load.copies) * self.block_bytes / (LOAD_GB_PER_S * 1e9) / DECODE_STEP_S
            self.copy_free_at = max(self.copy_free_at, self.step_index) + copy_steps
            self.in_flight.append((int(self.copy_free_at) + 1, load))
        scheduler.update_after_step(plan)
        for item in plan.scheduled:
            if item.samples:
                seq = item.seq
                seq.token_ids.append(random.randrange(1000, 120000))
                if seq.num_tokens >= seq.max_total_tokens:
                    scheduler.finish(seq, retain=seq.context_policy.bounded)
        record = {"step": self.step_index,
                  "loads_finished_ms": (finished_at - began) * 1e3,
                  "schedule_ms": (scheduled_at - finished_at) * 1e3,
                  "loads_done": sum(len(load.copies) for load in done_loads),
                  "loads_issued": sum(len(load.copies) for load in plan.loads),
                  "offloads": len(plan.offloads),
                  "scheduled_tokens": plan.num_batched_tokens,
                  "gc_ms": (GC_CLOCK.seconds - gc_before) * 1e3}
        record["total_ms"] = record["loads_finished_ms"] + record["schedule_ms"]
        self.steps.append(record)
        self.step_index += 1
        return record

    def run_until_finished(self, seq: Sequence, limit: int = 1000) -> list[dict]:
        records = []
        while not seq.is_finished:
            records.append(self.step())
            if len(records) > limit:
                raise RuntimeError(f"sequence {seq.seq_id} did not finish in {limit} steps")
        return records


def build(session_store_blocks: int) -> SimulatedEngine:
    block_bytes = BLOCK_SIZE * BYTES_PER_TOKEN
    host = HostTier(HOST_BYTES // block_bytes)
    bm = BlockManager(POOL_BYTES // block_bytes, BLOCK_SIZE, host_tier=host)
    config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048, prefill_chunk_size=2048)
    engine = SimulatedEngine(Scheduler(config, bm, session_store_blocks=session_store_blocks))
    decoders = [engine.sequence(random_tokens(512), max_new=1 << 30) for _ in range(DECODERS)]
    for seq in decoders:
        engine.scheduler.add([seq])
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in decoders):
        engine.step()
    return engine


def random_tokens(n: int) -> list[int]:
    return [random.randrange(1000, 120000) for _ in range(n)]


def summary(records: list[dict]) -> dict:
    totals = [r["total_ms"] for r in records]
    worst = max(records, key=lambda r: r["total_ms"])
    return {"steps": len(records),
            "total_ms_p50": statistics.median(totals), "total_ms_max": worst["total_ms"],
            "schedule_ms_max": max(r["schedule_ms"] for r in records),
            "loads_finished_ms_max": max(r["loads_finished_ms"] for r in records),
            "gc_ms_max": max(r["gc_ms"] for r in records),
            "total_ms_max_without_gc": max(r["total_ms"] - r["gc_ms"] for r in records),
            "steps_over_1ms": sum(1 for t in totals if t > 1.0),
            "blocks_loaded": sum(r["loads_issued"] for r in records),
            "blocks_offloaded": sum(r["offloads"] for r in records),
            "worst_step": worst}


def prefix_scenario(profiler: cProfile.Profile | None) -> dict:
    """Chats A..D of 32k tokens fill the pool one after another, so A's blocks go to the host tier;
    then A's next turn comes back from there, taking blocks that B and C left in the pool."""
    engine = build(session_store_blocks=0)
    chats = [random_tokens(HISTORY_TOKENS) for _ in range(4)]
    offload_steps = []
    for tokens in chats:
        seq = engine.sequence(tokens, max_new=1)
        engine.scheduler.add([seq])
        offload_steps += [r for r in engine.run_until_finished(seq) if r["offloads"]]
    again = engine.sequence(chats[0] + random_tokens(NEW_TURN_TOKENS), max_new=1)
    return hit(engine, again, offload_steps, profiler)


def session_scenario(profiler: cProfile.Profile | None) -> dict:
    """A 32k chat under a bounded policy is retained; a 64k chat needs the pool, so the store moves the
    session to the host tier; then the chat's next turn brings the session back."""
    engine = build(session_store_blocks=HISTORY_TOKENS // BLOCK_SIZE + 64)
    chat = engine.sequence(random_tokens(HISTORY_TOKENS), max_new=1, policy=SESSION_POLICY)
    engine.scheduler.add([chat])
    engine.run_until_finished(chat)
    # Longer than the free blocks: the store gives the session's blocks back, to the host tier.
    filler = engine.sequence(random_tokens(2 * HISTORY_TOKENS), max_new=1)
    engine.scheduler.add([filler])
    offload_steps = [r for r in engine.run_until_finished(filler) if r["offloads"]]
    host = engine.scheduler.block_manager.host_tier
    assert host.session_lengths(), "the session did not move to the host tier"
    again = engine.sequence(chat.token_ids + random_tokens(NEW_TURN_TOKENS), max_new=1, policy=SESSION_POLICY)
    result = hit(engine, again, offload_steps, profiler)
    assert engine.scheduler.sessions.hits == 1, "the next turn did not continue from the session"
    return result


def hit(engine: SimulatedEngine, seq: Sequence, offload_steps: list[dict], profiler) -> dict:
    host = engine.scheduler.block_manager.host_tier
    hits_before = host.hits
    began = time.perf_counter()
    engine.scheduler.add([seq])
    add_ms = (time.perf_counter() - began) * 1e3
    if profiler is not None:
        profiler.enable()
    records = []
    while not seq.is_finished:  # (it asks for one token: finished once it has sampled it)
        records.append(engine.step())
        if len(records) > 1000:
            raise RuntimeError("the hit was not admitted in 1000 steps")
    if profiler is not None:
        profiler.disable()
    assert host.hits > hits_before, "the turn was not a host-tier hit"
    assert seq.num_cached_prompt_tokens >= HISTORY_TOKENS - BLOCK_SIZE, "the hit did not cover the history"
    return {"add_ms": add_ms, "hit": summary(records), "offload": summary(offload_steps) if offload_steps else None,
            "cached_prompt_tokens": seq.num_cached_prompt_tokens, "hit_steps": records}


SCENARIOS = {"prefix": prefix_scenario, "session": session_scenario}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="prefix,session")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each scenario; the table shows the worst")
    parser.add_argument("--profile", choices=list(SCENARIOS), default=None,
                        help="cProfile the hit's steps of this scenario (one run) and print the top functions")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    random.seed(0)
    print(f"ropeway from {Path(ropeway.__file__).parent}")
    if args.profile:
        profiler = cProfile.Profile()
        SCENARIOS[args.profile](profiler)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        return
    results = {}
    print(f"{'scenario':<10}{'phase':<9}{'steps':>6}{'p50 ms':>9}{'max ms':>9}{'sched max':>10}"
          f"{'loads_fin max':>14}{'>1 ms':>7}{'gc max':>8}{'max w/o gc':>11}{'add ms':>8}")
    for name in args.scenarios.split(","):
        runs = [SCENARIOS[name](None) for _ in range(args.repeats)]
        results[name] = runs
        worst = max(runs, key=lambda run: run["hit"]["total_ms_max"])
        for phase in ("hit", "offload"):
            s = worst[phase]
            if s is None:
                continue
            add = f"{max(run['add_ms'] for run in runs):8.2f}" if phase == "hit" else ""
            print(f"{name:<10}{phase:<9}{s['steps']:>6}{s['total_ms_p50']:>9.3f}{s['total_ms_max']:>9.3f}"
                  f"{s['schedule_ms_max']:>10.3f}{s['loads_finished_ms_max']:>14.3f}{s['steps_over_1ms']:>7}"
                  f"{s['gc_ms_max']:>8.3f}{s['total_ms_max_without_gc']:>11.3f}{add}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        meta = {"ropeway": str(Path(ropeway.__file__).parent), "python": platform.python_version(),
                "machine": platform.processor() or platform.machine(),
                "pool_blocks": POOL_BYTES // (BLOCK_SIZE * BYTES_PER_TOKEN),
                "host_slots": HOST_BYTES // (BLOCK_SIZE * BYTES_PER_TOKEN), "history_tokens": HISTORY_TOKENS,
                "decoders": DECODERS, "repeats": args.repeats}
        args.output.write_text(json.dumps({"config": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
