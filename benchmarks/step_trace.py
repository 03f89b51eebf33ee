"""Where a serving workload's engine time goes: every engine step timed and classified.

  python benchmarks/step_trace.py --random-llama3-8b --scenario random-256     # GPU
  python benchmarks/step_trace.py --scenario short-8                            # CPU, built-in model

Runs a serving.py scenario's requests (same seeded lengths) straight through LLMEngine,
without HTTP: at most `concurrency` requests in flight, the next admitted when one
finishes. Reports what a client would see (output tok/s, TTFT and inter-token latency from
step times) and a table of steps by kind (pure decode, decode mixed with prefill chunks,
prefill only): count, total and mean time. Comparing it with serving.py's figure for the
same scenario separates the engine from the HTTP path. `StepTrace` also serves
serve_random_model.py, which records a live server's steps (ROPEWAY_STEP_TRACE=path).
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import SCENARIOS, percentile, sampling_fields, scenario_requests  # noqa: E402


class StepTrace:
    """Wraps engine.step: one record per step (start, seconds, sequences, prefill tokens,
    decodes). Without a device sync: the step's own read of the sampled tokens waits for
    its GPU work, as it does in the server."""

    def __init__(self, engine):
        self.engine = engine
        self.records: list[dict] = []
        self.origin = time.perf_counter()
        inner = engine.step

        def traced_step():
            started = time.perf_counter()
            outputs = inner()
            elapsed = time.perf_counter() - started
            plan = engine.scheduler.last_plan
            if plan is not None and plan.scheduled:
                prefill = sum(i.num_new_tokens for i in plan.scheduled if i.num_new_tokens > 1)
                self.records.append({"t": started - self.origin, "s": elapsed, "seqs": len(plan.scheduled),
                                     "prefill_tokens": prefill,
                                     "decodes": sum(1 for i in plan.scheduled if i.num_new_tokens == 1)})
            return outputs

        engine.step = traced_step

    @staticmethod
    def kind(record: dict) -> str:
        if record["prefill_tokens"] == 0:
            return "decode"
        return "mixed" if record["decodes"] else "prefill"

    def summary(self) -> dict:
        by_kind = defaultdict(lambda: {"steps": 0, "seconds": 0.0, "prefill_tokens": 0, "decodes": 0})
        for record in self.records:
            row = by_kind[self.kind(record)]
            row["steps"] += 1
            row["seconds"] += record["s"]
            row["prefill_tokens"] += record["prefill_tokens"]
            row["decodes"] += record["decodes"]
        for row in by_kind.values():
            row["mean_ms"] = 1000 * row["seconds"] / row["steps"]
        return dict(by_kind)


def print_summary(summary: dict) -> None:
    print(f"{'steps':<8} {'count':>6} {'total s':>8} {'mean ms':>8} {'prefill tok':>12} {'decodes':>8}")
    for kind, row in sorted(summary.items()):
        print(f"{kind:<8} {row['steps']:>6} {row['seconds']:>8.2f} {row['mean_ms']:>8.2f} "
              f"{row['prefill_tokens']:>12} {row['decodes']:>8}")


def run_offline(engine, requests: list[tuple[list[int], int]], concurrency: int, sampling: str = "greedy") -> dict:
    from ropeway import SamplingParams

    trace = StepTrace(engine)
    pending = list(enumerate(requests))[::-1]
    sent, token_times = {}, defaultdict(list)
    started = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and len(engine.requests) < concurrency:
            index, (prompt, max_tokens) = pending.pop()
            engine.add_request(f"trace-{index}", prompt, SamplingParams(
                max_tokens=max_tokens, ignore_eos=True, detokenize=False, **sampling_fields(sampling, index)))
            sent[f"trace-{index}"] = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            token_times[output.request_id].append(now)
    wall = time.perf_counter() - started
    ttfts = [times[0] - sent[rid] for rid, times in token_times.items()]
    itls = [b - a for times in token_times.values() for a, b in zip(times, times[1:])]
    output_tokens = sum(len(times) for times in token_times.values())
    return {
        "wall_s": wall, "output_tokens": output_tokens, "output_tok_s": output_tokens / wall,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50), "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "itl_p50_ms": 1000 * percentile(itls, 50), "itl_p99_ms": 1000 * percentile(itls, 99),
        "steps_by_kind": trace.summary(), "steps": trace.records,
    }


def main() -> None:
    from random_model import build_engine

    from ropeway import EngineConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: the built-in model)")
    parser.add_argument("--random-llama3-8b", action="store_true", help="Llama-3-8B shape with random weights")
    parser.add_argument("--scenario", default="random-256", choices=sorted(SCENARIOS))
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="as `ropeway serve`'s default")
    parser.add_argument("--kv-gib", type=float, default=None, help="KV pool size in GiB (default: as the server)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=128000)
    parser.add_argument("--sampling", choices=["greedy", "chat", "both"], default="greedy",
                        help="the requests' sampling, as serving.py's (both: greedy, then chat, on one engine)")
    parser.add_argument("--out", default="results/step_trace.json")
    args = parser.parse_args()

    scenario = SCENARIOS[args.scenario]
    config = EngineConfig(model=args.model, max_num_seqs=max(scenario.concurrency, 1),
                          max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
                          kv_cache_memory_bytes=int(args.kv_gib * 2**30) if args.kv_gib else None)
    engine = build_engine(config, args.random_llama3_8b)
    engine.capture_decode_graphs()
    vocab = min(args.vocab, engine.model_config.vocab_size)
    # Warm-up, as serving.py's: kernels compiled for the shapes of short mixed steps.
    run_offline(engine, scenario_requests(SCENARIOS["short-8"], vocab, args.seed + 1), 8)
    results = {}
    for sampling in ["greedy", "chat"] if args.sampling == "both" else [args.sampling]:
        result = run_offline(engine, scenario_requests(scenario, vocab, args.seed), scenario.concurrency, sampling)
        results[sampling] = result = {"command": " ".join(sys.argv), "scenario": scenario.name,
                                      "sampling": sampling, **result}
        print(f"{scenario.name}, {sampling}: {result['output_tok_s']:.0f} output tok/s over {result['wall_s']:.1f} s; "
              f"TTFT p50 {result['ttft_p50_ms']:.0f} ms p99 {result['ttft_p99_ms']:.0f} ms; "
              f"ITL p50 {result['itl_p50_ms']:.1f} ms p99 {result['itl_p99_ms']:.1f} ms")
        print_summary(result["steps_by_kind"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results[args.sampling] if args.sampling != "both" else results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
