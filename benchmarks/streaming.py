"""Unbounded streams in bounded memory: the StreamingLLM experiment on the default model.

  (a) perplexity over one long stream (Python's documentation, then more of it), scored in
      windows along the stream, for `none` (full cache: breaks past the trained 8k),
      `window` (sliding window without sinks), `sink_window` (4 sinks + window) and
      `landmark` (sink_window plus up to 64 summaries of evicted chunks);
  (b) passkey retrieval (the prompt style of long_context.py) with the passkey placed
      outside the window: sink_window, landmark, and landmark with retrieval of evicted
      blocks from host memory, plus a control with the passkey inside the window;
  (c) per-token decode latency and KV blocks in use after streams of growing length.

  python benchmarks/streaming.py                           # CPU: a 12k stream, window 1024
  python3 benchmarks/streaming.py --stream 65536 --window 4096   # GPU machine
  python3 benchmarks/streaming.py --parts b,c                     # some of the experiments

Prints tables, writes JSON and PNG plots.
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from long_context import FILLER
from ropeway import LLM, ContextParams, SamplingParams

LANDMARKS = 64
RETRIEVE = 256  # tokens of evicted context a retrieving landmark cache brings back per prompt


def policies(window: int) -> dict:
    return {
        "none": None,
        "window": {"type": "sink_window", "sinks": 0, "window": window},
        "sink_window": {"type": "sink_window", "sinks": 4, "window": window},
        "landmark": {"type": "landmark", "sinks": 4, "window": window, "landmarks": LANDMARKS},
    }


def corpus(tokenizer, count: int) -> list[int]:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    ids = tokenizer.encode(text)
    while len(ids) < count:  # the documentation is ~113k tokens; longer streams repeat it
        ids = ids + ids
    return ids[:count]


def stream_perplexity(llm: LLM, ids: list[int], policy: dict | None, segment: int) -> list[float]:
    """Perplexity of each consecutive segment of the stream, fed as one request."""
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=True, detokenize=False),
                       context=ContextParams(context_policy=policy))[0]
    logprobs = out.prompt_logprobs[1:]
    return [math.exp(-sum(logprobs[s : s + segment]) / len(logprobs[s : s + segment]))
            for s in range(0, len(logprobs), segment)]


def passkey_prompt_at(tokenizer, length: int, needle_from: float, needle_to: float,
                      rng: random.Random) -> tuple[list[int], str]:
    """long_context.py's passkey prompt, with the needle placed between the given fractions
    of the filler (so it can be put before or inside the window)."""
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is"
    filler_ids = tokenizer.encode(FILLER)
    repeats = max(1, (length - len(tokenizer.encode(needle + question)) - 8) // len(filler_ids))
    depth = rng.randint(int(needle_from * repeats), int(needle_to * repeats))
    return tokenizer.encode(FILLER * depth + needle + FILLER * (repeats - depth) + question), key


def passkey_accuracy(llm: LLM, length: int, policy: dict, placement: tuple[float, float],
                     trials: int, seed: int) -> float:
    rng = random.Random(seed + length)
    prompts, keys = zip(*(passkey_prompt_at(llm.tokenizer, length, *placement, rng) for _ in range(trials)))
    outputs = llm.generate(list(prompts), SamplingParams(temperature=0, max_tokens=8),
                           context=ContextParams(context_policy=policy))
    return sum(key in o.outputs[0].text for o, key in zip(outputs, keys)) / trials


def passkey_runs(window: int, length: int) -> dict:
    """(policy, needle placement) per run: outside is the first half of what has left the
    window by the question (sinks, window and one eviction chunk stay); inside is the
    window's last quarter."""
    named = policies(window)
    outside = (0.05, 0.5 * (1 - 1.25 * window / length))  # from 0.05: clear of the sinks
    inside = (1 - 0.25 * window / length, 1.0)
    return {"sink_window, passkey inside the window": (named["sink_window"], inside),
            "sink_window, passkey outside": (named["sink_window"], outside),
            "landmark, passkey outside": (named["landmark"], outside),
            "landmark + retrieval, passkey outside": ({**named["landmark"], "retrieve": RETRIEVE}, outside)}


def decode_profile(llm: LLM, ids: list[int], policy: dict | None, lengths: list[int], new_tokens: int):
    """After a stream of each length: ms per decoded token and KV blocks in use."""
    engine = llm.engine
    rows = []
    for length in lengths:
        engine.add_request(f"decode-{length}", ids[:length], SamplingParams(temperature=0, max_tokens=new_tokens,
                                                                            ignore_eos=True, detokenize=False),
                           ContextParams(context_policy=policy))
        step_times, blocks = [], 0
        while engine.has_unfinished_requests():
            started = time.perf_counter()
            engine.step()
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            last = engine.scheduler.last_plan
            if last is not None and last.scheduled and all(i.num_new_tokens == 1 for i in last.scheduled):
                step_times.append(elapsed)
                blocks = max(blocks, engine.block_manager.num_used_blocks - engine.scheduler.sessions.num_blocks)
        while engine.scheduler.sessions.release_oldest():
            pass
        step_times.sort()
        rows.append({"length": length, "ms_per_token": 1000 * step_times[len(step_times) // 2],
                     "kv_blocks": blocks, "kv_mib": blocks * engine.pool.bytes_per_block / 2**20})
    return rows


def plot_lines(series: dict, x_label: str, y_label: str, title: str, path: Path, log_y=False, vline=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    if vline:
        ax.axvline(vline, color="grey", linestyle=":", label="trained context (8k)")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--stream", type=int, default=65536 if cuda else 12288, help="stream length in tokens")
    parser.add_argument("--window", type=int, default=4096 if cuda else 1024)
    parser.add_argument("--segment", type=int, default=1024, help="tokens per perplexity point")
    parser.add_argument("--decode-lengths", default=None, help="comma-separated stream lengths for (c)")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--passkey-lengths", default=None, help="comma-separated prompt lengths for (b)")
    parser.add_argument("--trials", type=int, default=10 if cuda else 3, help="passkeys per length and run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="a,b,c", help="which experiments to run, e.g. b,c")
    parser.add_argument("--out-dir", default="results/streaming")
    args = parser.parse_args()

    # `none` needs a pool and a context limit that hold the whole stream.
    llm = LLM(dtype="bfloat16" if cuda else "float32", max_model_len=args.stream + 64,
              kv_cache_memory_bytes=(16 << 30) if cuda else (3 << 30),
              max_num_batched_tokens=4096 if cuda else 1024,
              # Ten retrieving 32k streams at once archive ~7.4 GB of evicted KV (bf16).
              retrieval_archive_bytes=(16 << 30) if cuda else (4 << 30))
    ids = corpus(llm.tokenizer, args.stream)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    named = policies(args.window)
    parts = set(args.parts.split(","))
    started = time.perf_counter()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    results = {"meta": {"model": llm.engine.model_config.name, "device": device, "dtype": str(llm.engine.dtype),
                        "stream": args.stream, "window": args.window, "sinks": 4, "landmarks": LANDMARKS,
                        "retrieve": RETRIEVE, "segment": args.segment, "passkey_trials": args.trials,
                        "command": " ".join(sys.argv)}}

    if "a" in parts:
        perplexity = {}
        for name in tqdm(named, desc="(a) stream perplexity"):
            perplexity[name] = stream_perplexity(llm, ids, named[name], args.segment)
            tqdm.write(f"(a) {name}: {[round(p, 2) for p in perplexity[name]]}")  # partial results survive a timeout
        ends = [min(args.stream, (i + 1) * args.segment) for i in range(len(perplexity["none"]))]
        results.update(perplexity=perplexity, segment_ends=ends)
        print(f"\n(a) perplexity per {args.segment}-token segment, window {args.window} ({device})")
        marks = [i for i, end in enumerate(ends) if end in (args.segment, 4096, 8192, 16384, 32768, 65536)
                 or i == len(ends) - 1]
        print(f"{'policy':>12}" + "".join(f"{ends[i]:>9}" for i in marks) + f"{'mean':>9}")
        for name, values in perplexity.items():
            print(f"{name:>12}" + "".join(f"{values[i]:>9.2f}" for i in marks) + f"{sum(values) / len(values):>9.2f}")
        plot_lines({k: (ends, v) for k, v in perplexity.items()}, "position in the stream (tokens)",
                   f"perplexity of the {args.segment}-token segment", "StreamingLLM experiment, SmolLM2-135M",
                   out_dir / "stream_perplexity.png", log_y=True, vline=8192)

    if "b" in parts:
        passkey_lengths = ([int(n) for n in args.passkey_lengths.split(",")] if args.passkey_lengths
                           else [2 * args.window, 4 * args.window, 8 * args.window])
        passkey = {}
        work = [(run, n) for run in passkey_runs(args.window, passkey_lengths[0]) for n in passkey_lengths]
        for run, n in tqdm(work, desc="(b) passkey outside the window"):
            policy, placement = passkey_runs(args.window, n)[run]
            passkey.setdefault(run, {})[str(n)] = passkey_accuracy(llm, n, policy, placement, args.trials, args.seed)
            tqdm.write(f"(b) {run}, {n} tokens: {passkey[run][str(n)]:.2f}")
        results["passkey"] = passkey
        print(f"\n(b) passkey accuracy over {args.trials} prompts, window {args.window}")
        print(f"{'run':>40}" + "".join(f"{n:>9}" for n in passkey_lengths))
        for run, values in passkey.items():
            print(f"{run:>40}" + "".join(f"{values[str(n)]:>9.2f}" for n in passkey_lengths))
        plot_lines({k: (passkey_lengths, [v[str(n)] for n in passkey_lengths]) for k, v in passkey.items()},
                   "prompt length (tokens)", "passkey accuracy", f"Passkey retrieval, window {args.window}",
                   out_dir / "passkey.png")

    if "c" in parts:
        lengths = [int(n) for n in args.decode_lengths.split(",")] if args.decode_lengths else [
            n for n in (1024, 2048, 4096, 8192, 16384, 32768, 65536) if n <= args.stream]
        decode = {}
        for name in tqdm(named, desc="(c) decode latency"):
            decode[name] = decode_profile(llm, ids, named[name], lengths, args.decode_tokens)
            tqdm.write(f"(c) {name}: {decode[name]}")
        results["decode"] = decode
        print("\n(c) decode after a stream: ms per token / KV MiB")
        print(f"{'policy':>12}" + "".join(f"{n:>14}" for n in lengths))
        for name, rows in decode.items():
            print(f"{name:>12}" + "".join(f"{r['ms_per_token']:>7.1f}/{r['kv_mib']:<6.0f}" for r in rows))
        plot_lines({k: (lengths, [r["ms_per_token"] for r in v]) for k, v in decode.items()},
                   "stream length (tokens)", "ms per decoded token", "Decode latency after a stream",
                   out_dir / "decode_latency.png")
        plot_lines({k: (lengths, [r["kv_mib"] for r in v]) for k, v in decode.items()}, "stream length (tokens)",
                   "KV cache in use (MiB)", "KV memory after a stream", out_dir / "kv_memory.png")

    results["meta"]["seconds"] = time.perf_counter() - started
    name = "streaming.json" if parts == {"a", "b", "c"} else f"streaming_{'_'.join(sorted(parts))}.json"
    (out_dir / name).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out_dir}/{name} and PNG plots ({results['meta']['seconds']:.0f} s)")

if __name__ == "__main__":
    main()
