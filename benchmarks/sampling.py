"""Decode step time with sampling against greedy, and the sampler alone (issue 16).

For each sampling setting (greedy; temperature 0.8 + top_p 0.95; temperature 0.8 + top_k 50;
greedy with top-5 logprobs; serving.py's chat mix, with every tenth row asking for logprobs) and
each batch size, B requests with `--context`-token random prompts are prefilled, then decode
steps are timed two ways: `--steps` steps one by one, the GPU synchronized around each (median;
the host's work adds to the GPU's), and `--steps` steps in a row, synchronized only at the ends
(mean; with asynchronous scheduling the host prepares a step while the GPU runs the one before,
as when serving). The sampler alone is timed on random [B, vocab] logits, with the host's share
of it: the time until sample() returns (launches and parameter copies; on CUDA the kernels run
behind it). Writes a table
to stdout and JSON to `--out`.

`--sampler-graphs both` runs every setting twice in the same engine, the sampler launched op by
op ("eager") and replayed as a CUDA graph ("graphs", sampler_graphs.py), so one call compares
them. "read wait" is the time the pipelined loop spent in reading a step's tokens: near zero, the
host is the bottleneck; near the step, the GPU is.

GPU (the issue's shape, random weights):
    python benchmarks/sampling.py --random-llama3-8b --out benchmarks/results/sampling_h200.json
    python benchmarks/sampling.py --random-llama3-8b --sampler-graphs both --out sampling_graphs_h200.json
CPU smoke run (a tiny random model):
    python benchmarks/sampling.py --tiny
"""

import argparse
import json
import pathlib
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from random_model import LLAMA3_8B, build_engine, full_vocab_tokenizer, load_random_model  # noqa: E402
from serving import sampling_fields  # noqa: E402

from ropeway import ContextParams, EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from ropeway.arith import cdiv  # noqa: E402
from ropeway.engine import sampler  # noqa: E402
from ropeway.engine.sampler import SamplingRow, sample  # noqa: E402
from ropeway.engine.sampler_graphs import SamplerGraphs  # noqa: E402
from ropeway.engine.sampling_state import PenaltyState  # noqa: E402
from ropeway.models import ModelConfig  # noqa: E402

SETTINGS = {
    "greedy": {"temperature": 0.0},
    "temperature 0.8, top_p 0.95": {"temperature": 0.8, "top_p": 0.95},
    "temperature 0.8, top_k 50": {"temperature": 0.8, "top_k": 50},
    "greedy, top-5 logprobs": {"temperature": 0.0, "logprobs": 5},
    # serving.py's --sampling chat, row by row: temperature 0.8, top_p 0.95, every tenth row with
    # 5 top logprobs.
    "chat mix": "chat",
}


def row_setting(setting: dict | str, index: int) -> dict:
    """Row `index`'s sampling fields under a SETTINGS entry (a mix names serving.py's sampling)."""
    return {"seed": index, **(sampling_fields(setting, index) if isinstance(setting, str) else setting)}

TINY = ModelConfig(
    architecture="llama", vocab_size=8192, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=128, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
    tie_word_embeddings=False, name="tiny-random",
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class ReadClock:
    """Adds up the time spent in SampledTokens.read (mostly waiting for the GPU's tokens)."""

    def __init__(self):
        self.seconds = 0.0
        self._read = sampler.SampledTokens.read

    def __enter__(self):
        def timed(tokens):
            started = time.perf_counter()
            try:
                return self._read(tokens)
            finally:
                self.seconds += time.perf_counter() - started
        sampler.SampledTokens.read = timed
        return self

    def __exit__(self, *exc):
        sampler.SampledTokens.read = self._read


def runtime_calls(engine: LLMEngine, steps: int, trace: pathlib.Path | None) -> dict:
    """CUDA runtime and driver calls per pipelined step (launches, copies, synchronizations, host
    allocations), from torch.profiler over `steps` steps; the Chrome trace to `trace` if given."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(engine.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(steps):
            engine.step()
        synchronize(engine.device)
    if trace is not None:
        profiler.export_chrome_trace(str(trace))
    calls = {}
    for event in profiler.key_averages():
        if event.key.startswith(("cuda", "cu")) and not event.key.startswith("cudnn"):
            calls[event.key] = {"per_step": round(event.count / steps, 2),
                                "host_us_per_step": round(event.cpu_time_total / steps, 1)}
    return dict(sorted(calls.items(), key=lambda item: -item[1]["host_us_per_step"]))


def decode_step_ms(engine: LLMEngine, batch: int, context: int, setting: dict | str, steps: int,
                   context_params: ContextParams | None = None, prompt_seed: int | None = None,
                   waits: list | None = None, calls: dict | None = None,
                   trace: pathlib.Path | None = None) -> tuple[float, float]:
    """(median synchronized step, mean pipelined step) in ms; waits: gets the mean read wait of a
    pipelined step; calls: filled with runtime_calls over 5 more pipelined steps.

    Every timed step runs all `batch` sequences: prompts go in over several chunked steps, and the
    first ones admitted decode meanwhile, so max_tokens leaves room for those steps too (else the
    early sequences finish mid-measurement and the batch shrinks); what is left is aborted."""
    vocab = engine.model_config.vocab_size
    generator = torch.Generator().manual_seed(batch if prompt_seed is None else prompt_seed)
    # Once some sequences decode, a step takes at most the scheduler's cap of prompt tokens.
    per_step = engine.core.scheduler.config.max_prefill_tokens_with_decodes
    prefill_steps = cdiv(batch * context, per_step) + batch
    request_ids = [f"b{batch}-{i}" for i in range(batch)]
    for i, request_id in enumerate(request_ids):
        prompt = torch.randint(0, vocab, (context,), generator=generator).tolist()
        params = SamplingParams(max_tokens=prefill_steps + 2 * steps + 32, ignore_eos=True, detokenize=False,
                                **row_setting(setting, i))
        engine.add_request(request_id, prompt, params, context_params)
    while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running) \
            or engine.scheduler.num_waiting:
        engine.step()
    for _ in range(3):  # warm-up decodes (and, with asynchronous scheduling, fill the pipeline)
        engine.step()
    times = []
    for _ in range(steps):
        synchronize(engine.device)
        started = time.perf_counter()
        engine.step()
        synchronize(engine.device)
        times.append((time.perf_counter() - started) * 1e3)
    synchronize(engine.device)
    started = time.perf_counter()
    with ReadClock() as reads:
        for _ in range(steps):
            engine.step()
        synchronize(engine.device)
    pipelined = (time.perf_counter() - started) * 1e3 / steps
    if waits is not None:
        waits.append(reads.seconds * 1e3 / steps)
    if calls is not None:
        calls.update(runtime_calls(engine, 5, trace))
    if len(engine.scheduler.running) != batch:
        raise RuntimeError(f"{len(engine.scheduler.running)} of {batch} sequences ran to the end of the timing")
    for request_id in request_ids:
        engine.abort_request(request_id)
    return statistics.median(times), pipelined


def sampler_alone_us(batch: int, vocab: int, setting: dict | str, device: torch.device, repeats: int,
                     graphed: bool = False) -> tuple[float, float]:
    """(median us of sample() and reading its tokens, median us until sample() returns): on CUDA
    the second is the host's own time, launching the sampler's kernels and copying its parameters.
    graphed: the logits stand as a decode graph's, and the sampler replays its CUDA graph."""
    logits = torch.randn(batch, vocab, device=device) * 4
    rows = [SamplingRow(SamplingParams(**row_setting(setting, i)), seed=i, step=0) for i in range(batch)]
    state = PenaltyState(vocab, device)
    graphs = SamplerGraphs(SimpleNamespace(last_logits=logits)) if graphed else None
    for _ in range(3):
        sample(logits, rows, state, graphs=graphs).read()
    times, launches = [], []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        sampled = sample(logits, rows, state, graphs=graphs)
        launched = time.perf_counter()
        sampled.read()
        times.append((time.perf_counter() - started) * 1e6)
        launches.append((launched - started) * 1e6)
    return statistics.median(times), statistics.median(launches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = parser.add_mutually_exclusive_group(required=True)
    shape.add_argument("--random-llama3-8b", action="store_true")
    shape.add_argument("--tiny", action="store_true", help="a tiny random model on CPU (a smoke run)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64; tiny: 1,8)")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens (default 1024; tiny: 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default 50; tiny: 5)")
    parser.add_argument("--kv-gib", type=float, default=20)
    parser.add_argument("--sampler-graphs", choices=["off", "on", "both"], default="off",
                        help="sample eagerly, through the sampler's CUDA graphs, or both in turn (CUDA only)")
    parser.add_argument("--profile", type=pathlib.Path, default=None, metavar="DIR",
                        help="also count CUDA runtime calls per pipelined step (torch.profiler, 5 steps) at the "
                             "largest batch, into the JSON, and write each setting's Chrome trace to DIR")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    batches = [int(b) for b in (args.batches or ("1,8" if args.tiny else "1,64")).split(",")]
    context = args.context or (64 if args.tiny else 1024)
    steps = args.steps or (5 if args.tiny else 50)
    if args.tiny:
        config = EngineConfig(dtype="float32", device="cpu", max_num_seqs=max(batches),
                              kv_cache_memory_bytes=64 * 2**20)
        engine = LLMEngine(config, loaded=load_random_model(TINY, torch.float32, torch.device("cpu"),
                                                            full_vocab_tokenizer(TINY.vocab_size)))
    else:
        config = EngineConfig(dtype="bfloat16", max_num_seqs=max(batches),
                              kv_cache_memory_bytes=int(args.kv_gib * 2**30))
        engine = build_engine(config, random_llama3_8b=True, tokenizer=full_vocab_tokenizer(LLAMA3_8B.vocab_size))
        engine.capture_decode_graphs()
    vocab = engine.model_config.vocab_size
    results = {"device": torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu",
               "model": engine.model_config.name, "vocab": vocab, "context": context, "decode_step_ms": {},
               "decode_step_pipelined_ms": {}, "pipelined_read_wait_ms": {}, "sampler_alone_us": {},
               "sampler_launch_us": {}}
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.sampler_graphs]
    if True in modes and engine.runner.decode_graphs is None:
        parser.error("--sampler-graphs needs CUDA (the decode graphs)")
    names = []  # (row name, setting, graphed, the greedy row it compares with)
    for graphed in modes:
        suffix = " [sampler graphs]" if graphed and len(modes) > 1 else ""
        names += [(name + suffix, setting, graphed, "greedy" + suffix) for name, setting in SETTINGS.items()]
    for batch in batches:
        for name, setting, graphed, _ in names:
            engine.core.sampler_graphs = SamplerGraphs(engine.runner.decode_graphs) if graphed else None
            waits, calls = [], None
            trace = None
            if args.profile is not None and batch == max(batches):
                args.profile.mkdir(parents=True, exist_ok=True)
                calls = results.setdefault("runtime_calls_per_step", {}).setdefault(name, {})
                trace = args.profile / f"b{batch}_{name.replace(' ', '_').replace(',', '')}.json"
            step, pipelined = decode_step_ms(engine, batch, context, setting, steps, waits=waits, calls=calls,
                                             trace=trace)
            alone, launch = sampler_alone_us(batch, vocab, setting, engine.device, repeats=max(steps, 20),
                                             graphed=graphed)
            results["decode_step_ms"].setdefault(name, {})[batch] = round(step, 3)
            results["decode_step_pipelined_ms"].setdefault(name, {})[batch] = round(pipelined, 3)
            results["pipelined_read_wait_ms"].setdefault(name, {})[batch] = round(waits[0], 3)
            results["sampler_alone_us"].setdefault(name, {})[batch] = round(alone, 1)
            results["sampler_launch_us"].setdefault(name, {})[batch] = round(launch, 1)
    header = " | ".join(f"B={b} step ms (x greedy) | B={b} pipelined ms (x greedy) | B={b} read wait ms "
                        f"| B={b} sampler us (launch)" for b in batches)
    print(f"| setting | {header} |")
    print("| --- |" + " ---: |" * (4 * len(batches)))
    for name, _, _, greedy in names:
        cells = []
        for batch in batches:
            for key in ("decode_step_ms", "decode_step_pipelined_ms"):
                step = results[key][name][batch]
                cells.append(f"{step:.2f} ({step / results[key][greedy][batch]:.2f}x)")
            cells.append(f"{results['pipelined_read_wait_ms'][name][batch]:.2f}")
            cells.append(f"{results['sampler_alone_us'][name][batch]:.0f} "
                         f"({results['sampler_launch_us'][name][batch]:.0f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
