"""Host time of pure-decode engine steps: a whole `LLMEngine.step()` minus its model forward.

A tiny random Llama keeps the model's own time small, so what is left is the engine's
Python: scheduling, batch metadata, sampling, stop checks, detokenization, outputs.

  python benchmarks/host_overhead.py                    # batches 1, 16, 64, 256
  python benchmarks/host_overhead.py --batches 64 --profile

On CUDA the model forward (graph replay or eager) is timed between two synchronizations,
so "model" also holds the wait for the step's input copies.
"""

import argparse
import cProfile
import json
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_model import full_vocab_tokenizer, load_random_model  # noqa: E402

from ropeway import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from ropeway.models import ModelConfig  # noqa: E402

TINY = ModelConfig(
    architecture="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=16, intermediate_size=128, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=8192, tie_word_embeddings=False, name="tiny-random-llama",
)
RESULTS = Path(__file__).resolve().parent / "results"


class ModelClock:
    """Wraps the runner's model calls and adds up their wall time (synchronized on CUDA)."""

    def __init__(self, engine: LLMEngine):
        self.seconds = 0.0
        self._depth = 0  # a graph capture calls forward inside run: count the outer call only
        self._cuda = engine.device.type == "cuda"
        engine.model.forward = self._timed(engine.model.forward)
        graphs = engine.runner.decode_graphs
        if graphs is not None:
            graphs.run = self._timed(graphs.run)

    def _timed(self, call):
        def timed(*args, **kwargs):
            self._depth += 1
            if self._cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            try:
                result = call(*args, **kwargs)
                if self._cuda:
                    torch.cuda.synchronize()
                return result
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - started
        return timed


def measure(batch: int, prompt_len: int, warm_steps: int, steps: int, device: str, sampled: bool,
            profile: bool) -> dict:
    config = EngineConfig(device=device, max_num_seqs=batch, max_num_batched_tokens=max(2048, batch * prompt_len),
                          enable_prefix_caching=False, kv_cache_memory_bytes=256 * 2**20)
    torch_device = config.torch_device()
    loaded = load_random_model(TINY, config.torch_dtype(torch_device), torch_device,
                               full_vocab_tokenizer(TINY.vocab_size))
    engine = LLMEngine(config, loaded=loaded)
    # Detokenized, as the server does; greedy unless asked (on CPU, sampling's tensor work
    # would count as host time, where on a GPU it is queued kernels).
    params = SamplingParams(temperature=0.8 if sampled else 0.0, top_p=0.95, seed=1,
                            max_tokens=warm_steps + steps + 8, ignore_eos=True)
    prompts = torch.randint(0, TINY.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    for i, prompt in enumerate(prompts.tolist()):
        engine.add_request(f"host-{i}", prompt, params)
    for _ in range(warm_steps + 1):  # the prefill, then decodes: outputs grow as in a long completion
        engine.step()
    clock = ModelClock(engine)
    profiler = cProfile.Profile() if profile else None
    step_ms, model_ms = [], []
    for _ in range(steps):
        before = clock.seconds
        if profiler:
            profiler.enable()
        started = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - started
        if profiler:
            profiler.disable()
        assert all(item.num_new_tokens == 1 for item in engine.scheduler.last_plan.scheduled)
        step_ms.append(elapsed * 1e3)
        model_ms.append((clock.seconds - before) * 1e3)
    if profiler:
        print(f"--- batch {batch}")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"ropeway/(engine|scheduler)", 25)
    host_ms = [s - m for s, m in zip(step_ms, model_ms)]
    return {
        "batch": batch, "output_tokens_before": warm_steps, "steps": steps,
        "step_ms": statistics.median(step_ms), "model_ms": statistics.median(model_ms),
        "host_ms": statistics.median(host_ms),
        "host_us_per_seq": statistics.median(host_ms) * 1e3 / batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--warm-steps", type=int, default=500, help="decode steps before measuring")
    parser.add_argument("--steps", type=int, default=30, help="decode steps measured (medians reported)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sampled", action="store_true", help="temperature 0.8, top-p 0.95 instead of greedy")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions per batch")
    parser.add_argument("--label", default="", help="saved in the JSON (e.g. before/after)")
    parser.add_argument("--out", type=Path, default=RESULTS / "host_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the model's time is not the point; keep it steady
    rows = [measure(int(b), args.prompt_len, args.warm_steps, args.steps, args.device, args.sampled,
                    args.profile)
            for b in args.batches.split(",")]
    print(f"{'batch':>6} {'step ms':>9} {'model ms':>9} {'host ms':>9} {'host us/seq':>12}")
    for r in rows:
        print(f"{r['batch']:>6} {r['step_ms']:>9.3f} {r['model_ms']:>9.3f} {r['host_ms']:>9.3f} "
              f"{r['host_us_per_seq']:>12.1f}")
    device = EngineConfig(device=args.device).torch_device()
    report = {"label": args.label, "device": torch.cuda.get_device_name(device) if device.type == "cuda"
              else platform.processor() or platform.machine(),
              "model": TINY.name, "prompt_len": args.prompt_len, "sampled": args.sampled, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
