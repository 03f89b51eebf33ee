"""Host time of pure-decode engine steps: a whole `LLMEngine.step()` minus its device work.

A tiny random Llama keeps the model's own time small, so what is left is the engine's
Python: scheduling, batch metadata, sampling, stop checks, detokenization, outputs.
Device work is the model forward and the sampler's filtered draw (`kernels.filtered_draw`:
Triton on a GPU, where the host only launches it; its torch reference on CPU, whose
bisection would otherwise count as host time). Each sampling setting of
`benchmarks/sampling.py` can be compared with greedy (issue 16: sampled host time should
match greedy's).

  python benchmarks/host_overhead.py                    # greedy, batches 1, 16, 64, 256
  python benchmarks/host_overhead.py --batches 64 --settings greedy,top_p,top_k,logprobs --async-scheduling
  python benchmarks/host_overhead.py --batches 64 --profile
  python benchmarks/host_overhead.py --batches 32 --window 128 --async-scheduling   # bounded caches
  python benchmarks/host_overhead.py --batches 64,256 --settings greedy,top_p,top_k,logprobs --count-ops

--count-ops also counts, over a few more steps, the torch ops (aten dispatches) and Triton
launches per step outside the model's forward (`op_counter.py`): on CUDA each costs the host
~5-30 us, so their number is the portable measure of a step's host time. On CPU the sampler's
draw then runs its Triton kernels in the interpreter, so the launches counted are the GPU's.

On CPU the clock is the thread's CPU time (the shared development box's load inflates wall
time); on CUDA it is wall time and the device work is timed between two synchronizations,
so "device" also holds the wait for the step's input copies.
"""

import argparse
import cProfile
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from op_counter import OpCounter  # noqa: E402
from random_model import full_vocab_tokenizer, load_random_model  # noqa: E402

from ropeway import ContextParams, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from ropeway import kernels  # noqa: E402
from ropeway.engine import sampler  # noqa: E402
from ropeway.models import ModelConfig  # noqa: E402

# The settings of benchmarks/sampling.py, by short name.
SETTINGS = {
    "greedy": {"temperature": 0.0},
    "top_p": {"temperature": 0.8, "top_p": 0.95},
    "top_k": {"temperature": 0.8, "top_k": 50},
    "logprobs": {"temperature": 0.0, "logprobs": 5},
}

TINY = ModelConfig(
    architecture="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, intermediate_size=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=8192, tie_word_embeddings=False, name="tiny-random-llama",
)
RESULTS = Path(__file__).resolve().parent / "results"


class DeviceClock:
    """Wraps the step's device work (model calls, the sampler's filtered draw) and adds up its
    time (synchronized on CUDA)."""

    def __init__(self, engine: LLMEngine):
        self.seconds = 0.0
        self._depth = 0  # a graph capture calls forward inside run: count the outer call only
        self._cuda = engine.device.type == "cuda"
        self.now = time.perf_counter if self._cuda else time.thread_time
        engine.model.forward = self._timed(engine.model.forward)
        graphs = engine.runner.decode_graphs
        if graphs is not None:
            graphs.run = self._timed(graphs.run)
        sampler.filtered_draw = self._timed(kernels.filtered_draw)  # (the unwrapped op: one clock at a time)
        self._engine = engine

    def restore(self) -> None:
        """Unwrap what __init__ wrapped."""
        engine = self._engine
        del engine.model.forward  # the instance attribute: the class's method again
        if engine.runner.decode_graphs is not None:
            del engine.runner.decode_graphs.run
        sampler.filtered_draw = kernels.filtered_draw

    def _timed(self, call):
        def timed(*args, **kwargs):
            self._depth += 1
            if self._cuda:
                torch.cuda.synchronize()
            started = self.now()
            try:
                result = call(*args, **kwargs)
                if self._cuda:
                    torch.cuda.synchronize()
                return result
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += self.now() - started
        return timed


def count_ops(engine: LLMEngine, steps: int) -> dict:
    """Torch ops and Triton launches per step (means over `steps` steps), outside the forward."""
    counter = OpCounter()
    model_forward = engine.model.forward
    engine.model.forward = counter.pausing(model_forward)
    graphs = engine.runner.decode_graphs
    if graphs is not None:
        graphs_run = graphs.run
        graphs.run = counter.pausing(graphs_run)
    draw = sampler.filtered_draw
    if engine.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        from ropeway.kernels.triton_sampling import filtered_draw_triton
        sampler.filtered_draw = filtered_draw_triton  # the GPU's launches, interpreted
    try:
        with counter.counting_triton_launches(), counter:
            for _ in range(steps):
                engine.step()
    finally:
        engine.model.forward = model_forward
        if graphs is not None:
            graphs.run = graphs_run
        sampler.filtered_draw = draw
    return {"torch_ops_per_step": sum(counter.ops.values()) / steps,
            "triton_launches_per_step": sum(counter.launches.values()) / steps,
            "torch_ops": {name: n / steps for name, n in counter.ops.most_common()},
            "triton_launches": {name: n / steps for name, n in counter.launches.most_common()}}


def measure(batch: int, prompt_len: int, warm_steps: int, steps: int, device: str, setting: str,
            async_scheduling: bool | None, window: int | None, profile: bool, count_steps: int = 0,
            sampler_graphs: bool = False) -> dict:
    config = EngineConfig(device=device, max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * prompt_len),
                          enable_prefix_caching=False, kv_cache_memory_bytes=256 * 2**20,
                          async_scheduling=async_scheduling, sampler_cuda_graphs=sampler_graphs)
    torch_device = config.torch_device()
    loaded = load_random_model(TINY, config.torch_dtype(torch_device), torch_device,
                               full_vocab_tokenizer(TINY.vocab_size))
    engine = LLMEngine(config, loaded=loaded)
    # Detokenized, as the server does; a seed per request, as chat clients send.
    max_tokens = warm_steps + steps + count_steps + 8
    params = [SamplingParams(seed=i, max_tokens=max_tokens, ignore_eos=True, **SETTINGS[setting]) for i in range(batch)]
    prompts = torch.randint(0, TINY.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    context = (ContextParams(context_policy={"type": "sink_window", "sinks": 4, "window": window}) if window
               else None)
    for i, prompt in enumerate(prompts.tolist()):
        engine.add_request(f"host-{i}", prompt, params[i], context)
    for _ in range(warm_steps + 1):  # the prefill, then decodes: outputs grow as in a long completion
        engine.step()
    clock = DeviceClock(engine)
    profiler = cProfile.Profile(clock.now) if profile else None
    step_ms, device_ms = [], []
    for _ in range(steps):
        before = clock.seconds
        if profiler:
            profiler.enable()
        started = clock.now()
        engine.step()
        elapsed = clock.now() - started
        if profiler:
            profiler.disable()
        assert all(item.num_new_tokens == 1 for item in engine.scheduler.last_plan.scheduled)
        step_ms.append(elapsed * 1e3)
        device_ms.append((clock.seconds - before) * 1e3)
    if profiler:
        print(f"--- batch {batch}, {setting}")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(r"ropeway/(engine|scheduler|models)", 25)
    host_ms = [s - m for s, m in zip(step_ms, device_ms)]
    row = {
        "batch": batch, "setting": setting, "sink_window": window, "output_tokens_before": warm_steps, "steps": steps,
        "step_ms": statistics.median(step_ms), "device_ms": statistics.median(device_ms),
        "host_ms": statistics.median(host_ms),
        # The machine is shared: the fastest steps are the least disturbed.
        "host_ms_p10": statistics.quantiles(host_ms, n=10)[0] if len(host_ms) > 1 else host_ms[0],
        "host_us_per_seq": statistics.median(host_ms) * 1e3 / batch,
    }
    if count_steps:
        clock.restore()
        row.update(count_ops(engine, count_steps))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--warm-steps", type=int, default=500, help="decode steps before measuring")
    parser.add_argument("--steps", type=int, default=30, help="decode steps measured (medians reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--settings", default="greedy",
                        help=f"comma-separated sampling settings, of {','.join(SETTINGS)}")
    parser.add_argument("--async-scheduling", action="store_true", default=None,
                        help="schedule asynchronously, as on CUDA by default (placeholders, outputs a step later)")
    parser.add_argument("--window", type=int, default=None,
                        help="bound every cache by sink_window (4 sinks, this window): evictions every window/8 steps")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions per batch")
    parser.add_argument("--count-ops", type=int, default=0, metavar="STEPS", nargs="?", const=3,
                        help="also count torch ops and Triton launches per step over STEPS more steps (default 3)")
    parser.add_argument("--sampler-graphs", action="store_true",
                        help="replay decode steps' sampling as CUDA graphs (engine option sampler_cuda_graphs; CUDA)")
    parser.add_argument("--label", default="", help="saved in the JSON (e.g. before/after)")
    parser.add_argument("--out", type=Path, default=RESULTS / "host_overhead.json")
    args = parser.parse_args()
    if (args.count_ops and EngineConfig(device=args.device).torch_device().type == "cpu"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        # Counting on CPU runs the draw's kernels in Triton's interpreter, which must be chosen
        # before triton is first imported (torch imports it): start again with it chosen.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    torch.set_num_threads(1)  # the model's time is not the point; keep it steady
    rows = [measure(int(b), args.prompt_len, args.warm_steps, args.steps, args.device, setting,
                    args.async_scheduling, args.window, args.profile, args.count_ops, args.sampler_graphs)
            for b in args.batches.split(",") for setting in args.settings.split(",")]
    print(f"{'batch':>6} {'setting':>9} {'step ms':>9} {'device ms':>10} {'host ms':>9} {'p10':>7} {'host us/seq':>12}"
          + (f" {'torch ops':>10} {'launches':>9}" if args.count_ops else ""))
    for r in rows:
        print(f"{r['batch']:>6} {r['setting']:>9} {r['step_ms']:>9.3f} {r['device_ms']:>10.3f} {r['host_ms']:>9.3f} "
              f"{r['host_ms_p10']:>7.3f} {r['host_us_per_seq']:>12.1f}"
              + (f" {r['torch_ops_per_step']:>10.1f} {r['triton_launches_per_step']:>9.1f}" if args.count_ops else ""))
    device = EngineConfig(device=args.device).torch_device()
    report = {"label": args.label, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(),
              "model": TINY.name, "prompt_len": args.prompt_len, "sampler_graphs": args.sampler_graphs,
              "async_scheduling": bool(args.async_scheduling), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
