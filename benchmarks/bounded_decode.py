"""Decode step time with a bounded cache against the full cache (issue 16).

B requests with `--context`-token random prompts decode greedily, once with the full cache
(`none`) and once with `sink_window` (4 sinks, `--window` recent tokens): the prompts outgrow
the window, so the bounded requests decode over sinks + window keys instead of the whole
prompt. Steps are timed as in benchmarks/sampling.py (synchronized median and pipelined mean),
and the engine's counters say how many of the policy's engine steps (prefill included)
replayed a decode CUDA graph and how many evictions ran. Target (issue 16): the sink_window
step at most 0.8x the full-cache step at B=32, 4k prompts, window 2048.

GPU (the issue's shape, random weights):
    python benchmarks/bounded_decode.py --random-llama3-8b --out bounded_decode_h200.json
CPU smoke run (a tiny random model):
    python benchmarks/bounded_decode.py --tiny
"""

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from random_model import LLAMA3_8B, build_engine, full_vocab_tokenizer, load_random_model  # noqa: E402
from sampling import TINY, decode_step_ms  # noqa: E402

from ropeway import ContextParams, EngineConfig, LLMEngine  # noqa: E402


def count_graph_replays(engine: LLMEngine) -> list[int]:
    """A counter of the steps that replay a decode graph (the runner's own decision, wrapped)."""
    graphs = engine.runner.decode_graphs
    replays = [0]
    if graphs is None:
        return replays
    run = graphs.run

    def counted(batch):
        replays[0] += 1
        return run(batch)

    graphs.run = counted
    return replays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--random-llama3-8b", action="store_true")
    shape.add_argument("--tiny", action="store_true", help="a tiny random model on CPU (a smoke run)")
    parser.add_argument("--batch", type=int, default=None, help="default 32; tiny: 4")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens (default 4096; tiny: 256)")
    parser.add_argument("--window", type=int, default=None, help="sink_window's window (default 2048; tiny: 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default 50; tiny: 5)")
    parser.add_argument("--kv-gib", type=float, default=24)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    batch = args.batch or (4 if args.tiny else 32)
    context = args.context or (256 if args.tiny else 4096)
    window = args.window or (64 if args.tiny else 2048)
    steps = args.steps or (5 if args.tiny else 50)
    if args.tiny:
        config = EngineConfig(dtype="float32", device="cpu", max_num_seqs=batch, kv_cache_memory_bytes=64 * 2**20)
        engine = LLMEngine(config, loaded=load_random_model(TINY, torch.float32, torch.device("cpu"),
                                                            full_vocab_tokenizer(TINY.vocab_size)))
    else:
        config = EngineConfig(dtype="bfloat16", max_num_seqs=batch, kv_cache_memory_bytes=int(args.kv_gib * 2**30))
        engine = build_engine(config, random_llama3_8b=True, tokenizer=full_vocab_tokenizer(LLAMA3_8B.vocab_size))
        engine.capture_decode_graphs()
    replays = count_graph_replays(engine)
    policies = {"none": None,
                "sink_window": ContextParams(context_policy={"type": "sink_window", "sinks": 4, "window": window})}
    results = {"device": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
               "model": engine.model_config.name, "batch": batch, "context": context, "window": window,
               "async_scheduling": engine.async_scheduling, "policies": {}}
    for name, context_params in policies.items():
        replays[0], evictions, steps_before = 0, engine.scheduler.num_evictions, engine.stats_totals.steps
        # Prompts of their own per policy: none reuses the other's blocks from the prefix cache.
        step, pipelined = decode_step_ms(engine, batch, context, {"temperature": 0.0}, steps, context_params,
                                         prompt_seed=len(results["policies"]))
        results["policies"][name] = {
            "decode_step_ms": round(step, 3), "decode_step_pipelined_ms": round(pipelined, 3),
            "engine_steps": engine.stats_totals.steps - steps_before, "graph_replays": replays[0],
            "evictions": engine.scheduler.num_evictions - evictions}
    full, bounded = results["policies"]["none"], results["policies"]["sink_window"]
    for key in ("decode_step_ms", "decode_step_pipelined_ms"):
        results[f"sink_window_over_full_{key}"] = round(bounded[key] / full[key], 3)
    print(json.dumps(results, indent=1))
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
