"""Where retrieval's time to first token goes (issue 19): one long prompt under sink_window,
under the retrieving landmark policy, and under that policy with archive and recall switched
off (the same chunks and evictions), timed, and counted per prefill step and per phase of it:
device operations (aten ops), host<->device copies (count and bytes), and host synchronizations
(on CUDA every one the sync debug mode reports; on CPU, reads of a tensor's values into Python:
.item()/.tolist() and data-dependent shapes such as nonzero).

Phases: archive (evicted blocks to host memory, scoring keys), evict (kept keys moved and
re-rotated), score (the archive scored, blocks chosen), bring_back (chosen blocks copied in and
re-rotated), capture (queries kept for the next chunk's recall), forward (the model itself, the
capture's copies excluded), other (scheduling, batch building, sampling).

  # H200 (the lead's): the default model, 32k at window 1024, and 64k:
  PYTHONPATH=. python3 benchmarks/retrieval_cost.py --lengths 32768,65536 \
      --out benchmarks/results/retrieval_cost_h200.json
  # CPU, a tiny random 30-layer Llama (counts are what matter there; its times are overhead only):
  PYTHONPATH=. python benchmarks/retrieval_cost.py --model /tmp/tiny30 --lengths 8192 --runs 1

--phase-rounds times each phase by plain clocks (the counted run's dispatch mode roughly doubles
every op's host time). Timed runs go in interleaved rounds (--runs); reported: the median of the
rounds' ratios (retrieval on over archive and recall off) and the median host time retrieval adds
per step, which, unlike the ratio, does not rise when the forward pass itself gets faster.

Also times, on CUDA, the decode steps of a short stream that does not retrieve beside a
neighbour prefilling the same prompt (needle.decode_step_seconds) unless --no-decode.
"""

import argparse
import collections
import json
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))
import needle  # noqa: E402

from ropeway import LLM, ContextParams, SamplingParams  # noqa: E402
from ropeway.engine.recall import RecallArchive  # noqa: E402
from ropeway.models import QueryCapture  # noqa: E402

# Operations whose output shape depends on the data: the host must wait for the device.
DATA_DEPENDENT = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "_local_scalar_dense",
                  "repeat_interleave"}
MODES = ("sink_window", "retrieve", "retrieve, archive and recall off")


class Counter(TorchDispatchMode):
    """Counts aten ops, copies between host and device (and their bytes) and data-dependent
    ops, per phase (the innermost phase entered)."""

    def __init__(self):
        super().__init__()
        self.phases = ["other"]
        self.nested: list[float] = []  # seconds spent in phases nested in each open phase
        self.counts = collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        counts = self.counts[self.phases[-1]]
        counts["ops"] += 1
        name = func._schema.name.split("::")[-1]
        if name in DATA_DEPENDENT:
            counts["syncs"] += 1
        if name in ("copy_", "_to_copy", "index_copy_", "index_select"):
            tensors = [a for a in (*args, *kwargs.values(), out) if isinstance(a, torch.Tensor)]
            devices = {t.device.type for t in tensors}
            if len(devices) > 1 or (name == "_to_copy" and kwargs.get("device") is not None
                                    and torch.device(kwargs["device"]).type != args[0].device.type):
                counts["host_device_copies"] += 1
                counts["host_device_bytes"] += max(t.nbytes for t in tensors)
                counts["pageable_copies"] += any(t.device.type == "cpu" and not t.is_pinned() for t in tensors)
        return out

    @contextmanager
    def phase(self, name: str):
        """Ops in the phase are counted to it, and its host time (waits for the device
        included, nested phases' excluded, counting's own overhead included) as host_ms."""
        self.phases.append(name)
        self.nested.append(0.0)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self.counts[name]["host_ms"] += 1000 * (elapsed - self.nested.pop())
            self.phases.pop()
            if self.nested:
                self.nested[-1] += elapsed


def instrument(llm: LLM, counter: Counter) -> None:
    """Enter counter's phases around the cache operations, the capture and the forward pass;
    count Python-side reads of tensor values (.tolist(), .item()) as host synchronizations."""
    ops = llm.engine.runner.cache_ops

    def wrap(owner, name: str, phase: str):
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            with counter.phase(phase):
                return original(*args, **kwargs)
        setattr(owner, name, wrapped)

    for name, phase in (("archive_evicted", "archive"), ("apply_eviction", "evict"), ("bring_back", "bring_back"),
                        ("query_capture", "capture"), ("keep_queries", "capture")):
        wrap(ops, name, phase)
    # Scoring and the choice (RecallArchive.choose on older code, which this script may be run on for an A/B).
    wrap(RecallArchive, "choose" if hasattr(RecallArchive, "choose") else "select", "score")
    wrap(llm.engine.runner.model, "forward", "forward")
    wrap(QueryCapture, "queries", "capture")
    for name in ("tolist", "item"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counter.counts[counter.phases[-1]]["syncs"] += self.device.type == "cpu"  # CUDA: the debug mode counts
            return _original(self, *args, **kwargs)
        setattr(torch.Tensor, name, counted)


@contextmanager
def cuda_syncs(counter: Counter):
    """On CUDA, count every synchronization the sync debug mode warns of, in its phase."""
    if not torch.cuda.is_available():
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if "synchroniz" in str(message):
            counter.counts[counter.phases[-1]]["syncs"] += 1
        else:
            shown(message, category, *args, **kwargs)
    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            yield
    finally:
        warnings.showwarning = shown
        torch.cuda.set_sync_debug_mode(0)


def run_prompt(llm: LLM, prompt: list[int], policy: dict, switched_off: bool) -> tuple[float, int]:
    """Seconds to first token, and engine steps taken."""
    engine = llm.engine
    steps_before = engine.stats_totals.steps
    with needle.retrieval_switched_off(llm) if switched_off else nullcontext():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1),
                     context=ContextParams(context_policy=policy), use_tqdm=False)
        seconds = time.perf_counter() - started
    steps_after = engine.stats_totals.steps
    return seconds, steps_after - steps_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory or GGUF (default: the built-in model)")
    parser.add_argument("--lengths", default="32768")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--retrieve", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5,
                        help="rounds of one timed run per mode, interleaved (medians; the overhead is the median of "
                             "the rounds' ratios), after one warm-up on CUDA; 0: count only")
    parser.add_argument("--no-counts", action="store_true", help="time only (no counted run)")
    parser.add_argument("--phase-rounds", type=int, default=0,
                        help="rounds of one run per mode timed per phase by plain clocks (no op counting, whose "
                             "dispatch overhead inflates host times); medians per step")
    parser.add_argument("--no-decode", action="store_true", help="skip the decode steps beside a prefill")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    lengths = [int(n) for n in args.lengths.split(",")]
    llm = LLM(args.model, dtype="bfloat16" if cuda else "float32", max_model_len=max(lengths) + 64,
              kv_cache_memory_bytes=(8 << 30) if cuda else (1 << 30), max_num_seqs=2,
              max_num_batched_tokens=8192 if cuda else 1024, prefill_chunk_size=2048 if cuda else 512,
              retrieval_archive_bytes=(16 << 30) if cuda else (2 << 30))
    texts = needle.fillers(llm.tokenizer, max(lengths))
    named = needle.policies(args.window, args.retrieve)
    policies = {"sink_window": (named["sink_window"], False), "retrieve": (named["retrieve"], False),
                "retrieve, archive and recall off": (named["retrieve"], True)}
    device = torch.cuda.get_device_name() if cuda else "cpu"
    result = {"meta": {"model": llm.engine.model_config.name, "device": device, "window": args.window,
                       "retrieve": args.retrieve, "command": " ".join(sys.argv)}, "lengths": {}}
    for length in lengths:
        prompt = next(iter(texts.values()))[:length]
        per_length = result["lengths"][str(length)] = {}
        if cuda and args.runs:
            for mode in MODES:  # compiles what this length needs
                run_prompt(llm, prompt, *policies[mode])
        # Rounds of one run per mode, interleaved: a host whose speed drifts between calls (measured: the
        # same steps at 11.6 and 25.6 ms in one lease) drifts alike for the modes of a round.
        rounds = [{mode: run_prompt(llm, prompt, *policies[mode]) for mode in MODES} for _ in range(args.runs)]
        for mode in MODES if rounds else ():
            timed = [r[mode] for r in rounds]
            seconds = sorted(t for t, _ in timed)[len(timed) // 2]
            steps = timed[0][1]
            entry = per_length[mode] = {"seconds": seconds, "steps": steps, "ms_per_step": 1000 * seconds / steps,
                                        "runs": [t for t, _ in timed]}
            print(f"{length} {mode}: {seconds:.3f} s, {steps} steps, {entry['ms_per_step']:.2f} ms/step", flush=True)
        if rounds:
            # Each round's ratio, then the median: what the rounds' shared drift cancels out of.
            off = "retrieve, archive and recall off"
            ratios = sorted(r["retrieve"][0] / r[off][0] - 1 for r in rounds)
            per_length["retrieval_overhead_per_round"] = ratios
            per_length["retrieval_overhead"] = ratios[len(ratios) // 2]
            # The same in host time per step: what retrieval itself costs, whatever the forward pass's speed
            # (a faster forward pass raises the ratio at the same cost).
            added = sorted(1000 * (r["retrieve"][0] - r[off][0]) / r["retrieve"][1] for r in rounds)
            per_length["retrieval_added_ms_per_step"] = added[len(added) // 2]
            print(f"{length}: retrieval adds {per_length['retrieval_overhead']:.0%} (median of {len(ratios)} "
                  f"rounds: {', '.join(f'{r:.0%}' for r in ratios)}), {added[len(added) // 2]:.2f} ms a step",
                  flush=True)
        if args.phase_rounds:
            timed_phases = {mode: [] for mode in MODES}
            for _ in range(args.phase_rounds):
                for mode in MODES:
                    counter = Counter()
                    instrument_once(llm, counter)  # phases clocked; the dispatch mode is not entered
                    seconds, steps = run_prompt(llm, prompt, *policies[mode])
                    nested = sum(c["host_ms"] for phase, c in counter.counts.items() if phase != "other")
                    counter.counts["other"]["host_ms"] = 1000 * seconds - nested
                    timed_phases[mode].append({phase: c["host_ms"] / steps for phase, c in counter.counts.items()})
            for mode, runs in timed_phases.items():
                phases = sorted({phase for run in runs for phase in run})
                medians = {phase: round(sorted(run.get(phase, 0.0) for run in runs)[len(runs) // 2], 3)
                           for phase in phases}
                per_length.setdefault(mode, {})["phase_ms_per_step"] = medians
                print(f"{length} {mode} host ms per step by phase (median of {len(runs)}): {json.dumps(medians)}",
                      flush=True)
        if not args.no_counts:
            for mode in MODES:
                policy, switched_off = policies[mode]
                counter = Counter()
                instrument_once(llm, counter)
                with cuda_syncs(counter), counter:
                    seconds, steps = run_prompt(llm, prompt, policy, switched_off)
                in_phases = sum(c["host_ms"] for phase, c in counter.counts.items() if phase != "other")
                counter.counts["other"]["host_ms"] = 1000 * seconds - in_phases
                per_step = {phase: {k: round(v / steps, 2) for k, v in sorted(counts.items())}
                            for phase, counts in sorted(counter.counts.items())}
                per_length.setdefault(mode, {"steps": steps})["per_step"] = per_step
                print(f"{length} {mode} per step: {json.dumps(per_step)}", flush=True)
    if cuda and not args.no_decode:
        result["decode_step_seconds"] = needle.decode_step_seconds(llm, texts, lengths[0], args.window, args.retrieve)
        print("decode steps", json.dumps(result["decode_step_seconds"]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


_instrumented: dict[int, Counter] = {}


def instrument_once(llm: LLM, counter: Counter) -> None:
    """Phases are entered on whichever counter is current: wrap once, then swap the counter."""
    if id(llm) not in _instrumented:
        proxy = _ProxyCounter()
        instrument(llm, proxy)
        _instrumented[id(llm)] = proxy
    _instrumented[id(llm)].target = counter


class _ProxyCounter:
    """Forwards phases and counts to the current Counter."""
    target: Counter

    @contextmanager
    def phase(self, name: str):
        with self.target.phase(name):
            yield

    @property
    def phases(self):
        return self.target.phases

    @property
    def counts(self):
        return self.target.counts

    @property
    def nested(self):
        return self.target.nested


if __name__ == "__main__":
    main()
