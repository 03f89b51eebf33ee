"""GPU kernel time against wall time in windows of a serving workload's engine steps.

  python benchmarks/profile_serving_steps.py --random-llama3-8b --windows 30:39,300:309,700:709   # GPU
  python benchmarks/profile_serving_steps.py --scenario short-8 --windows 2:4                      # CPU smoke

Runs a serving.py scenario through the engine as step_trace.py does (no HTTP) and, for each
window of steps A:B, profiles the CUDA kernels of steps A..B (torch.profiler, CUDA activity
only, so the host is not slowed; on CPU, CPU ops instead): per step, the wall time against the kernels' busy time (a
step whose kernels fill its wall is GPU-bound, one with gaps waits on the host), the prefill
tokens and decodes each step carried, and the kernels by total time.
"""

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving import SCENARIOS, scenario_requests  # noqa: E402
from step_trace import run_offline  # noqa: E402


def kernel_rows(prof: torch.profiler.profile, steps: int, cuda: bool) -> list[tuple[str, float, float]]:
    """(kernel name, launches per step, microseconds per step), longest first (CPU: top-level
    ops' own time)."""
    per_name = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            time_us = event.device_time
        elif not cuda and event.device_type == torch.autograd.DeviceType.CPU and event.cpu_parent is None:
            time_us = event.self_cpu_time_total
        else:
            continue
        entry = per_name[event.name[:80]]
        entry[0] += 1
        entry[1] += time_us
    return sorted(((name, calls / steps, total / steps) for name, (calls, total) in per_name.items()),
                  key=lambda row: -row[2])


class WindowProfiler:
    """Wraps engine.step; profiles steps first..last of each (first, last) window."""

    def __init__(self, engine, windows: list[tuple[int, int]]):
        self.engine, self.results = engine, []
        self.last_of = dict(windows)  # first step -> last step
        self.index, self.prof, self.started, self.plans = 0, None, 0.0, []
        self.cuda = torch.cuda.is_available() and engine.runner.device.type == "cuda"
        self.activity = torch.profiler.ProfilerActivity.CUDA if self.cuda else torch.profiler.ProfilerActivity.CPU
        self.inner = engine.step
        engine.step = self.step

    def step(self):
        if self.index in self.last_of:
            self.synchronize()
            self.prof = torch.profiler.profile(activities=[self.activity])
            self.prof.__enter__()
            self.started, self.plans, self.first = time.perf_counter(), [], self.index
        outputs = self.inner()
        plan = self.engine.scheduler.last_plan
        if self.prof is not None and plan is not None:
            self.plans.append((sum(i.num_new_tokens for i in plan.scheduled if i.num_new_tokens > 1),
                               sum(1 for i in plan.scheduled if i.num_new_tokens == 1)))
        if self.prof is not None and self.index == self.last_of[self.first]:
            self.synchronize()
            steps = self.index - self.first + 1
            wall_ms = (time.perf_counter() - self.started) * 1e3 / steps
            self.prof.__exit__(None, None, None)
            rows = kernel_rows(self.prof, steps, self.cuda)
            self.prof = None
            busy_ms = sum(row[2] for row in rows) / 1e3
            print(f"== steps {self.first}-{self.index}: wall {wall_ms:.2f} ms/step, kernels {busy_ms:.2f} ms/step; "
                  f"(prefill tokens, decodes) first {self.plans[0]}, last {self.plans[-1]}", flush=True)
            for name, calls, us in rows[:20]:
                print(f"  {us:9.1f} us x {calls:5.1f}  {name}")
            self.results.append({"steps": [self.first, self.index], "wall_ms": wall_ms, "kernel_ms": busy_ms,
                                 "plans": self.plans, "kernels": rows[:40]})
        self.index += 1
        return outputs

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def main() -> None:
    from random_model import build_engine

    from ropeway import EngineConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: the built-in model)")
    parser.add_argument("--random-llama3-8b", action="store_true", help="Llama-3-8B shape with random weights")
    parser.add_argument("--scenario", default="random-256", choices=sorted(SCENARIOS))
    parser.add_argument("--windows", default="30:39,300:309,700:709", help="comma-separated FIRST:LAST step windows")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="as `ropeway serve`'s default")
    parser.add_argument("--out", default="results/serving_step_profile.json")
    args = parser.parse_args()
    windows = [tuple(int(n) for n in window.split(":")) for window in args.windows.split(",")]

    scenario = SCENARIOS[args.scenario]
    config = EngineConfig(model=args.model, max_num_seqs=max(scenario.concurrency, 1),
                          max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    engine = build_engine(config, args.random_llama3_8b)
    engine.capture_decode_graphs()
    vocab = min(128000, engine.model_config.vocab_size)
    run_offline(engine, scenario_requests(SCENARIOS["short-8"], vocab, 1), 8)  # warm-up, as step_trace's
    profiler = WindowProfiler(engine, windows)
    result = run_offline(engine, scenario_requests(scenario, vocab, 0), scenario.concurrency)
    print(f"{scenario.name}: {result['output_tok_s']:.0f} output tok/s over {result['wall_s']:.1f} s "
          "(with the windows profiled)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "windows": profiler.results,
                               "run": {k: v for k, v in result.items() if k != "steps"}}))


if __name__ == "__main__":
    main()
