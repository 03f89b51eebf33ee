"""Long chats whose KV outgrows the pool: time to first token from the pool, the host tier, or cold.

N chats each send a long first turn (cold: the whole history is prefilled), then a second turn
at once (its history is still in the pool: a pool hit). Their histories together exceed the KV
pool, so by the time each chat sends its third turn the pool has reused its blocks: with a host
tier (--kv-host-memory) they come back from host memory, without one they are prefilled again.
Each turn adds a short user message and asks for one token, one chat at a time, so time to first
token is the turn's prefill (or load). Random token ids: the model's answers do not matter, only
the cache's. With --decoders K, K background streams decode all along, and the decode-only steps
are timed apart while blocks move (an offload or load issued, or a load in flight) and otherwise:
the issue's bound is no decode step stalled by more than 2 ms.

  python benchmarks/long_memory_sessions.py            # CPU, tiny: 3 chats of 512 tokens
  python benchmarks/long_memory_sessions.py --random-llama3-8b --chats 4 \\
      --history-tokens 32768 --kv-cache-memory 12GiB --kv-host-memory 32GiB --decoders 8 \\
      --output benchmarks/results/long_memory_sessions_h200.json   # GPU: 32k turns (issue 20)

Prints each turn's time to first token by kind and writes JSON (the issue's target: a 32k turn
from the host tier in at most 15% of the cold one): for host hits also the bytes moved each way
and the loads' achieved GB/s (from the first copy of a load to its last, on the GPU's clock).
--copy-chunk-mib and --copy-queue-depth set the copy pump's chunk and queue depth (a huge chunk
and depth queue each step's copies all at once, as before the pump, for comparison).

Stalls: before the chats, --baseline-steps decode-only steps with nothing moving give the normal
step time. Each later decode-only step that follows a decode-only step ("steady": with
asynchronous scheduling a step also waits for the previous step's GPU work, so one after a
prefill chunk is long for that reason alone) is set against it: decode_step_excess reports the
excess while blocks move (p50, p99, max, steps over 2 ms) and the worst steps with where their
time went (step_attribution.py: scheduling, the host tier's calls, the wait for the previous
step, the copy pump's time awake, garbage collection, and on CUDA the GPU time of the forward,
of the step's input uploads and of its tokens' copy back). Start-up objects are frozen out of the
collector's reach, as the server's engine core process does. copy_streams gives, per host hit,
each copy stream's time copying against its span (idle time: the stream waited for the other
direction or for the pump). The same file runs on trees before the host tier's counters: those
fields are None.
"""

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

from ropeway import EngineConfig, LLMEngine, SamplingParams
from ropeway.server.cli import memory_size

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_attribution import StepAttribution, attribution_row, copy_stream_summary  # noqa: E402

NEW_TURN_TOKENS = 32
STALL_MS = 2.0  # the bound on a decode step's excess while blocks move
WORST_STEPS = 10


class Bench:
    """The engine, a few background streams that decode all along, and every step's time."""

    def __init__(self, engine: LLMEngine, decoders: int, rng: random.Random):
        self.engine = engine
        self.rng = rng
        self.steps: list[dict] = []
        self.attribution = StepAttribution(engine)
        self.decoders: set[str] = set()
        self._next_decoder = 0
        for _ in range(decoders):
            self._add_decoder()

    def tokens(self, count: int) -> list[int]:
        return [self.rng.randrange(100, self.engine.model_config.vocab_size) for _ in range(count)]

    def _add_decoder(self) -> None:
        request_id = f"decoder{self._next_decoder}"
        self._next_decoder += 1
        max_tokens = min(512, self.engine.max_model_len // 4)  # the decoders' KV stays small next to the chats'
        self.engine.add_request(request_id, self.tokens(16), SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                            ignore_eos=True))
        self.decoders.add(request_id)

    def step(self, phase: str = "chats") -> list:
        scheduler, transfers = self.engine.scheduler, self.engine.runner.block_transfers
        loading = bool(scheduler.loading) or (transfers is not None and transfers.busy)
        scheduler.last_plan = None
        self.attribution.begin()
        started = time.perf_counter()
        outputs = self.engine.step()
        seconds = time.perf_counter() - started
        plan = scheduler.last_plan
        scheduled = plan is not None and bool(plan.scheduled)
        record = self.attribution.end(
            index=len(self.attribution.records), phase=phase, scheduled=scheduled,
            decode_only=scheduled and all(i.num_new_tokens == 1 for i in plan.scheduled),
            moves_blocks=loading or (plan is not None and bool(plan.offloads or plan.loads)),
            batch=len(plan.scheduled) if scheduled else 0, offloads=len(plan.offloads) if plan else 0,
            loads=sum(len(load.copies) for load in plan.loads) if plan else 0)
        if scheduled:
            self.steps.append({"seconds": seconds, "decode_only": record["decode_only"],
                               "moves_blocks": record["moves_blocks"]})
        for output in outputs:
            if output.request_id in self.decoders and output.finished:
                self.decoders.discard(output.request_id)
                self._add_decoder()
        return outputs

    def turn(self, request_id: str, prompt: list[int]) -> tuple[float, list[int]]:
        """Time to first token of one chat turn (one token asked for)."""
        started = time.perf_counter()
        self.engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        while True:
            for output in self.step():
                if output.request_id == request_id and output.finished:
                    return time.perf_counter() - started, output.outputs[0].token_ids

    def decode_step_excess(self) -> dict:
        """Steady decode-only steps (after a decode-only step) while blocks move, against the median
        of the baseline phase's: the excess, and where the worst steps' time went."""
        records = [r for r in self.attribution.records if r["scheduled"]]
        previous = {}
        for before, record in zip(records, records[1:]):
            previous[record["index"]] = before
        steady = [r for r in records if r["decode_only"] and previous.get(r["index"], {}).get("decode_only")]
        baseline = [r["wall_s"] for r in steady if r["phase"] == "baseline" and not r["moves_blocks"]]
        if not baseline:  # (--baseline-steps 0) any steady step with nothing moving
            baseline = [r["wall_s"] for r in steady if not r["moves_blocks"]]
        if not baseline:
            return {}
        baseline_s = statistics.median(baseline)
        result = {"baseline_ms": 1000 * baseline_s, "baseline_steps": len(baseline), "bound_ms": STALL_MS}
        groups = {"steady_moving": [r for r in steady if r["moves_blocks"]],
                  "steady_not_moving": [r for r in steady if not r["moves_blocks"] and r["phase"] != "baseline"],
                  # A decode-only step after a prefill chunk waits for that chunk's GPU work (async scheduling).
                  "after_prefill_moving": [r for r in records if r["decode_only"] and r["moves_blocks"]
                                           and r["index"] in previous and not previous[r["index"]]["decode_only"]]}
        for label, group in groups.items():
            excess = sorted(1000 * (r["wall_s"] - baseline_s) for r in group)
            if excess:
                result[label] = {"steps": len(excess), "excess_p50_ms": statistics.median(excess),
                                 "excess_p99_ms": excess[min(len(excess) - 1, int(0.99 * len(excess)))],
                                 "excess_max_ms": excess[-1], "over_bound": sum(e > STALL_MS for e in excess)}
        worst = sorted(groups["steady_moving"], key=lambda r: r["wall_s"], reverse=True)[:WORST_STEPS]
        result["worst_steady_moving"] = [attribution_row(r, baseline_s, previous.get(r["index"])) for r in worst]
        # The steps that started each host load (their bookkeeping is the tier's too), whatever their kind.
        result["load_starts"] = [attribution_row(r, baseline_s, previous.get(r["index"]))
                                 for r in records if r["loads"]]
        return result

    def decode_steps(self) -> dict:
        """Decode-only steps (the background streams' tokens), while blocks moved and otherwise."""
        summary = {}
        for label, moving in (("blocks_moving", True), ("no_blocks_moving", False)):
            times = sorted(r["seconds"] for r in self.steps if r["decode_only"] and r["moves_blocks"] == moving)
            if times:
                summary[label] = {"steps": len(times), "p50_ms": 1000 * statistics.median(times),
                                  "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))],
                                  "max_ms": 1000 * times[-1]}
        return summary


def run(args) -> dict:
    from random_model import build_engine

    from ropeway.engine import block_transfers

    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    if args.copy_chunk_mib:
        block_transfers.CHUNK_BYTES = int(args.copy_chunk_mib * (1 << 20))
    if args.copy_queue_depth:
        block_transfers.QUEUE_DEPTH = args.copy_queue_depth

    config = EngineConfig(model=args.model, dtype=args.dtype, kv_cache_memory_bytes=args.kv_cache_memory,
                          kv_host_memory_bytes=args.kv_host_memory, kv_host_blocks_per_step=args.host_blocks_per_step,
                          max_model_len=args.history_tokens + 4 * NEW_TURN_TOKENS,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    engine = build_engine(config, args.random_llama3_8b)
    engine.capture_decode_graphs()
    # As the server's engine core process does: start-up objects frozen, so the collector's full
    # passes do not walk them (they stalled steps there; here they would count as the tier's stalls).
    gc.collect()
    gc.freeze()
    pool_tokens = engine.pool.num_tokens
    if args.chats * args.history_tokens <= pool_tokens:
        print(f"warning: {args.chats} chats of {args.history_tokens} tokens fit in the pool ({pool_tokens} tokens): "
              "third turns will hit the pool", file=sys.stderr)
    bench = Bench(engine, args.decoders, random.Random(0))
    bench.turn("warm-up", bench.tokens(64))
    if args.decoders:
        for _ in range(args.baseline_steps):  # the background streams alone: the normal decode step
            bench.step("baseline")
    chats = [bench.tokens(args.history_tokens) for _ in range(args.chats)]
    turns = {"cold": [], "pool": [], "host": [], "recomputed": []}
    host_moves = []  # each host hit: bytes offloaded and loaded during the turn, the loads' GB/s
    transfers = engine.runner.block_transfers
    chunk_events = None
    if transfers is not None and hasattr(transfers, "chunk_events"):
        chunk_events = transfers.chunk_events = []
    for index, history in enumerate(chats):
        seconds, answer = bench.turn(f"chat{index}-turn1", history)
        turns["cold"].append(seconds)
        chats[index] = history + answer + bench.tokens(NEW_TURN_TOKENS)
        seconds, answer = bench.turn(f"chat{index}-turn2", chats[index])
        turns["pool"].append(seconds)
        chats[index] += answer + bench.tokens(NEW_TURN_TOKENS)
    for index, history in enumerate(chats):
        before = engine.stats()
        timings_before = len(transfers.load_timings) if transfers else 0
        chunks_before = len(chunk_events) if chunk_events is not None else 0
        seconds, _ = bench.turn(f"chat{index}-turn3", history)
        after = engine.stats()
        if after.kv_host_tier_hits > before.kv_host_tier_hits:
            kind = "host"
            loads = transfers.load_timings[timings_before:]
            host_moves.append({
                "chunk_range": (chunks_before, len(chunk_events) if chunk_events is not None else 0),
                "seconds": seconds,
                "offloaded_bytes": after.kv_host_offloaded_bytes - before.kv_host_offloaded_bytes,
                "loaded_bytes": after.kv_host_loaded_bytes - before.kv_host_loaded_bytes,
                "load_seconds": sum(t for _, t in loads),
                "load_gb_per_s": sum(b for b, _ in loads) / sum(t for _, t in loads) / 1e9 if loads else None})
        elif after.prefix_cache_hits - before.prefix_cache_hits >= args.history_tokens // 2:
            kind = "pool"
        else:
            kind = "recomputed"
        turns[kind].append(seconds)
    while transfers is not None and transfers.busy:  # every chunk's events done before they are read
        bench.step()
    bench.attribution.resolve_gpu_times()
    for move in host_moves:
        first, last = move.pop("chunk_range")
        move["copy_streams"] = copy_stream_summary(chunk_events, first, last) if chunk_events else None
    stats = engine.stats()
    result = {
        "config": {"model": args.model or "default", "dtype": str(engine.dtype), "device": str(engine.device),
                   "chats": args.chats, "history_tokens": args.history_tokens, "pool_tokens": pool_tokens,
                   "kv_host_memory": args.kv_host_memory, "host_blocks_per_step": args.host_blocks_per_step,
                   "decoders": args.decoders,
                   "copy_chunk_bytes": block_transfers.CHUNK_BYTES, "copy_queue_depth": block_transfers.QUEUE_DEPTH,
                   "baseline_steps": args.baseline_steps, "switch_interval_s": sys.getswitchinterval()},
        "time_to_first_token_seconds": turns,
        "median": {kind: statistics.median(times) for kind, times in turns.items() if times},
        "decode_steps": bench.decode_steps(),
        "decode_step_excess": bench.decode_step_excess(),
        "host_tier": {"hits": stats.kv_host_tier_hits, "offloaded_bytes": stats.kv_host_offloaded_bytes,
                      "loaded_bytes": stats.kv_host_loaded_bytes},
        "host_hits": host_moves,
    }
    median = result["median"]
    if "host" in median and "cold" in median:
        result["host_over_cold"] = median["host"] / median["cold"]
        rates = [move["load_gb_per_s"] for move in host_moves if move["load_gb_per_s"]]
        result["host_hit"] = {
            "ttft_seconds": median["host"], "cold_ttft_seconds": median["cold"],
            "pool_ttft_seconds": median.get("pool"), "host_over_cold": result["host_over_cold"], "target": 0.15,
            "bytes_moved": statistics.median(m["offloaded_bytes"] + m["loaded_bytes"] for m in host_moves),
            "loaded_bytes": statistics.median(m["loaded_bytes"] for m in host_moves),
            "load_gb_per_s": statistics.median(rates) if rates else None}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: the built-in model)")
    parser.add_argument("--random-llama3-8b", action="store_true", help="Llama-3-8B shape with random weights")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--chats", type=int, default=3)
    parser.add_argument("--history-tokens", type=int, default=512, help="tokens of each chat's first turn")
    parser.add_argument("--kv-cache-memory", type=memory_size, default=memory_size("40MiB"),
                        help="the pool: smaller than all chats' KV together (default 40MiB: ~900 fp32 tokens of "
                             "the default model)")
    parser.add_argument("--kv-host-memory", type=memory_size, default=memory_size("256MiB"))
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--host-blocks-per-step", type=int, default=EngineConfig.kv_host_blocks_per_step,
                        help="blocks a host-tier hit brings back per step while others decode (engine option)")
    parser.add_argument("--decoders", type=int, default=0,
                        help="background streams decoding all along: their decode-only steps while blocks move "
                             "show what the copies cost other requests")
    parser.add_argument("--copy-chunk-mib", type=float, default=None,
                        help="the host tier's copy chunk (default: block_transfers.CHUNK_BYTES)")
    parser.add_argument("--copy-queue-depth", type=int, default=None,
                        help="chunks in flight per copy stream (default: block_transfers.QUEUE_DEPTH)")
    parser.add_argument("--baseline-steps", type=int, default=32,
                        help="decode-only steps of the background streams before the chats, nothing moving: the "
                             "normal step time that stalls are measured against")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="CPython's GIL hand-over interval for this run (default: CPython's 5 ms); the copy pump "
                             "thread and the step loop share the GIL")
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = run(args)
    gc.unfreeze()  # (what run() froze may go at exit)
    for kind, seconds in result["median"].items():
        print(f"{kind:>10}: median time to first token {seconds * 1000:9.1f} ms over "
              f"{len(result['time_to_first_token_seconds'][kind])} turns")
    if "host_hit" in result:
        hit = result["host_hit"]
        rate = f", loads at {hit['load_gb_per_s']:.1f} GB/s" if hit["load_gb_per_s"] else ""
        print(f"host tier / cold: {hit['host_over_cold']:.1%} (target 15%); {hit['bytes_moved'] / 2**30:.2f} GiB "
              f"moved per host hit{rate}")
    for label, steps in result["decode_steps"].items():
        print(f"decode-only steps, {label.replace('_', ' ')}: {steps['steps']}, p50 {steps['p50_ms']:.2f} ms, "
              f"p99 {steps['p99_ms']:.2f} ms, max {steps['max_ms']:.2f} ms")
    excess = result["decode_step_excess"]
    if excess:
        print(f"normal decode-only step (baseline, {excess['baseline_steps']} steps): {excess['baseline_ms']:.2f} ms")
        for label in ("steady_moving", "steady_not_moving", "after_prefill_moving"):
            if label in excess:
                row = excess[label]
                print(f"  excess, {label.replace('_', ' ')}: {row['steps']} steps, p50 {row['excess_p50_ms']:.2f} ms, "
                      f"p99 {row['excess_p99_ms']:.2f} ms, max {row['excess_max_ms']:.2f} ms, "
                      f"{row['over_bound']} over {excess['bound_ms']:.0f} ms")
        for row in excess["worst_steady_moving"][:5]:
            print("  worst: " + ", ".join(f"{key} {_fmt(value)}" for key, value in row.items() if value is not None))
    for index, move in enumerate(result["host_hits"]):
        for label, stream in (move.get("copy_streams") or {}).items():
            print(f"host hit {index} {label}: {stream['bytes'] / 1e9:.2f} GB, copying {stream['copying_ms']:.1f} ms "
                  f"of {stream['span_ms']:.1f} ms ({stream['gb_per_s_copying'] or 0:.1f} GB/s copying, "
                  f"{stream['gb_per_s_span'] or 0:.1f} GB/s over the span)")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items() if v) + "}"
    return str(value)


if __name__ == "__main__":
    main()
