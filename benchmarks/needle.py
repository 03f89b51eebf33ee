"""Needle in a haystack past the window: does `landmark` + `retrieve` bring the needle back,
and does the model then answer?

Grid: window x prompt length x needle depth (share of the evicted part, 10%-90%). Each cell
runs `--trials` prompts at once (concurrent streams), cycling over four fillers (Python's
documentation, the standard library's docstrings, licence texts, a repetitive one), five
needles (a number, a name, a date, a sentence, a passkey) and three questions per needle
(short, one repeating the needle's own words, a long one), each ending with the answer's
first words. Per cell and policy:
  - needle-block recall (retrieving policies): the share of the needle's blocks among those
    the prompt's last recall brought back, independent of the answer;
  - answer accuracy: the answer in the first 16 generated tokens;
  - the oracle's accuracy: the sinks, the needle's region (`retrieve` tokens around it) and
    the last `window` tokens with the question, as one short prompt without a policy: what
    perfect retrieval would show the model.

  python3 benchmarks/needle.py --quick           # GPU: 16k-128k, windows 1024/4096, 3 depths
  python3 benchmarks/needle.py                   # GPU: the full grid (5 depths, 16 trials)
  python benchmarks/needle.py --lengths 2048 --windows 256 --depths 0.5 --trials 2 --retrieve 64  # CPU check

Writes benchmarks/results/needle/needle.json and one heatmap PNG per policy.
"""

import argparse
import glob
import inspect
import json
import random
import sys
import time
from pathlib import Path

import torch

from ropeway import LLM, ContextParams, SamplingParams

SINKS = 4
LANDMARKS = 64
REPETITIVE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

# (needle, answer, {question kind: question and the answer's first words})
NEEDLES = [
    (" The access code for the north gate of the old depot is 73914. ", "73914", {
        "short": " What is the access code? The access code is",
        "repeat": " What is the access code for the north gate of the old depot? The access code for the north gate"
                  " of the old depot is",
        "long": " Somewhere in the long text above, between the technical passages, there was a single sentence"
                " about a depot and a gate that had nothing to do with the rest. I need the number it gave,"
                " because I have to open the gate tomorrow morning. What was the access code? The access code is"}),
    (" The lighthouse on the island was kept for thirty years by a woman named Ingrid Halvorsen. ", "Ingrid", {
        "short": " Who kept the lighthouse? The lighthouse was kept by a woman named",
        "repeat": " Who kept the lighthouse on the island for thirty years? The lighthouse on the island was kept"
                  " for thirty years by a woman named",
        "long": " The text above mentioned, in passing and quite out of place, a lighthouse on an island and the"
                " person who looked after it for many years. I am writing a short history of the island and need"
                " that person's name. Who kept the lighthouse? The lighthouse was kept by a woman named"}),
    (" The stone bridge over the river Arden was opened on the 14th of March 1887. ", "1887", {
        "short": " When was the bridge opened? The bridge was opened on the 14th of March",
        "repeat": " When was the stone bridge over the river Arden opened? The stone bridge over the river Arden"
                  " was opened on the 14th of March",
        "long": " One sentence in the text above was about a bridge over a river, not about programming at all."
                " For a local history leaflet I need the year in which that bridge was opened to traffic."
                " When was the bridge opened? The bridge was opened on the 14th of March"}),
    (" Grandma's secret ingredient for her famous tomato soup is smoked paprika. ", "paprika", {
        "short": " What is the secret ingredient? The secret ingredient is smoked",
        "repeat": " What is Grandma's secret ingredient for her famous tomato soup? Grandma's secret ingredient for"
                  " her famous tomato soup is smoked",
        "long": " Hidden in the text above was a remark about cooking: what a grandmother puts into her famous"
                " soup. I want to cook it for my family this weekend and do not want to get it wrong. What is"
                " the secret ingredient? The secret ingredient is smoked"}),
    (" The pass key is 58213. Remember it. 58213 is the pass key. ", "58213", {
        "short": " What is the pass key? The pass key is",
        "repeat": " The pass key is what? Remember it. What is the pass key? The pass key is",
        "long": " There is a pass key hidden somewhere in the text above, a five-digit number that the text asks"
                " the reader to remember. Please read carefully and tell me exactly which number it was."
                " What is the pass key? The pass key is"}),
]
QUESTION_KINDS = ("short", "repeat", "long")


def fillers(tokenizer, count: int) -> dict[str, list[int]]:
    """Token ids of each filler, at least count long (short texts repeat)."""
    import pydoc_data.topics

    docs = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    docstrings = []
    for name in ("collections", "argparse", "logging", "pathlib", "email.message", "http.client", "subprocess",
                 "threading", "asyncio", "json", "csv", "datetime", "decimal", "fractions", "statistics",
                 "random", "unittest", "typing", "functools", "itertools", "shutil", "tarfile", "zipfile"):
        module = __import__(name, fromlist=["_"])
        for _, member in sorted(vars(module).items()):
            doc = inspect.getdoc(member) if (inspect.isclass(member) or inspect.isfunction(member)) else None
            if doc and getattr(member, "__module__", "") == module.__name__:
                docstrings.append(doc)
    licence_files = sorted(glob.glob("/usr/share/common-licenses/*")) or sorted(
        glob.glob(f"{sys.base_prefix}/lib/python3*/LICENSE.txt"))
    licences = "\n\n".join(Path(f).read_text(errors="replace") for f in licence_files if Path(f).is_file())
    texts = {"python_docs": docs, "docstrings": "\n\n".join(docstrings), "licences": licences,
             "repetitive": REPETITIVE * 64}
    out = {}
    for name, text in texts.items():
        if not text.strip():
            print(f"filler {name}: no text on this machine, left out", file=sys.stderr)
            continue
        ids = tokenizer.encode(text)
        out[name] = (ids * (count // len(ids) + 2))[: count + len(ids)]
    return out


def make_prompt(filler: list[int], needle: list[int], question: list[int], length: int, window: int,
                depth: float, retrieve: int, rng: random.Random):
    """(prompt, needle token range, oracle prompt). The needle sits at depth of the part that
    leaves the window (after the sinks); the oracle sees sinks, the needle's region, window."""
    body = length - len(needle) - len(question)
    start = rng.randrange(0, len(filler) - body)
    text = filler[start : start + body]
    evicted = body - window
    at = SINKS + int(depth * (evicted - SINKS))
    prompt = text[:at] + needle + text[at:] + question
    region_start = max(SINKS, at - (retrieve - len(needle)) // 2)
    oracle = prompt[:SINKS] + prompt[region_start : region_start + retrieve] + prompt[-(window + len(question)):]
    return prompt, (at, at + len(needle)), oracle


def policies(window: int, retrieve: int) -> dict[str, dict]:
    landmark = {"type": "landmark", "sinks": SINKS, "window": window, "landmarks": LANDMARKS}
    return {
        "retrieve": {**landmark, "retrieve": retrieve},
        "retrieve, 1 landmark": {**landmark, "landmarks": 1, "retrieve": retrieve},
        "landmark": landmark,
        "sink_window": {"type": "sink_window", "sinks": SINKS, "window": window},
    }


def run_cell(llm: LLM, texts: dict, window: int, length: int, depth: float, trials: int, retrieve: int,
             policy_names: list[str], seed: int) -> dict:
    tokenizer = llm.tokenizer
    rng = random.Random(f"{seed}/{window}/{length}/{depth}")
    cases = []
    for t in range(trials):
        filler = list(texts)[t % len(texts)]
        needle, answer, questions = NEEDLES[(t // len(texts) + t) % len(NEEDLES)]
        kind = QUESTION_KINDS[t % len(QUESTION_KINDS)]
        prompt, span, oracle = make_prompt(texts[filler], tokenizer.encode(needle),
                                           tokenizer.encode(questions[kind]), length, window, depth, retrieve, rng)
        cases.append((prompt, span, oracle, answer))
    params = SamplingParams(temperature=0, max_tokens=16)
    block = llm.engine.config.block_size
    cell = {}
    ops = llm.engine.runner.cache_ops
    recall = ops.recall
    recalled: dict[str, list[int]] = {}

    def record(item):
        recall(item)
        if item.samples:
            recalled[item.seq.request_id] = list(item.seq.archive.recalled_tokens)

    def accuracy(outputs) -> float:
        return sum(answer.lower() in out.outputs[0].text.lower()
                   for out, (_, _, _, answer) in zip(outputs, cases)) / trials

    ops.recall = record
    try:
        for name in policy_names:
            recalled.clear()
            policy = policies(window, retrieve)[name]
            outputs = llm.generate([c[0] for c in cases], params, context=ContextParams(context_policy=policy))
            result = {"accuracy": accuracy(outputs)}
            if policy.get("retrieve"):
                shares = []
                for out, (_, (first, last), _, _) in zip(outputs, cases):
                    needle_blocks = set(range(first // block, (last - 1) // block + 1))
                    # Blocks are aligned with the stream after the sink blocks, which are whole blocks.
                    brought = {start // block for start in recalled.get(out.request_id, [])}
                    shares.append(len(needle_blocks & brought) / len(needle_blocks))
                result["needle_block_recall"] = sum(shares) / trials
            cell[name] = result
    finally:
        ops.recall = recall
    cell["oracle"] = {"accuracy": accuracy(llm.generate([c[2] for c in cases], params))}
    return cell


def time_to_first_token(llm: LLM, texts: dict, length: int, window: int, retrieve: int) -> dict[str, float]:
    """Median seconds (of 3) to prefill one prompt and sample a token, without and with retrieval."""
    prompt = next(iter(texts.values()))[:length]
    out = {}
    for name in ("landmark", "retrieve"):
        policy = policies(window, retrieve)[name]
        times = []
        for _ in range(3):
            started = time.perf_counter()
            llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1),
                         context=ContextParams(context_policy=policy))
            times.append(time.perf_counter() - started)
        out[name] = sorted(times)[1]
    return out


def plot(results: dict, windows: list[int], lengths: list[int], depths: list[float], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(results.values())))
    for name in names:
        measures = list(next(iter(results.values()))[name])
        fig, axes = plt.subplots(len(measures), len(windows), squeeze=False,
                                 figsize=(3.2 * len(windows) + 1, 2.6 * len(measures) + 0.6))
        for row, measure in enumerate(measures):
            for col, window in enumerate(windows):
                grid = [[results[f"{window}/{length}/{depth}"][name][measure] for length in lengths]
                        for depth in depths]
                ax = axes[row][col]
                ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
                ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths])
                ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
                for i, values in enumerate(grid):
                    for j, value in enumerate(values):
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
                ax.set_title(f"{measure}, window {window}", fontsize=9)
                ax.set_xlabel("prompt length")
                ax.set_ylabel("needle depth")
        fig.suptitle(f"needle: {name}")
        fig.tight_layout()
        fig.savefig(out_dir / f"needle_{name.replace(', ', '_').replace(' ', '_')}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="3 depths, 8 trials, retrieval with 64 and with 1 landmark, and the oracle")
    parser.add_argument("--lengths", default="16384,32768,65536,131072")
    parser.add_argument("--windows", default="1024,4096")
    parser.add_argument("--depths", default=None, help="comma-separated shares of the evicted part")
    parser.add_argument("--trials", type=int, default=None, help="prompts per cell, run as concurrent streams")
    parser.add_argument("--retrieve", type=int, default=256)
    parser.add_argument("--policies", default=None, help=f"comma-separated, of: {', '.join(policies(1024, 256))}")
    parser.add_argument("--ttft-length", type=int, default=0,
                        help="also time one prompt of this length without and with retrieval (window: the first)")
    parser.add_argument("--out-dir", default="benchmarks/results/needle")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    lengths = [int(n) for n in args.lengths.split(",")]
    windows = [int(n) for n in args.windows.split(",")]
    depths = [float(d) for d in (args.depths or ("0.1,0.5,0.9" if args.quick else "0.1,0.3,0.5,0.7,0.9")).split(",")]
    trials = args.trials or (8 if args.quick else 16)
    policy_names = (args.policies.split(",") if args.policies
                    else ["retrieve", "retrieve, 1 landmark"] if args.quick else list(policies(1024, 256)))
    llm = LLM(dtype="bfloat16" if cuda else "float32", max_model_len=max(lengths) + 64,
              kv_cache_memory_bytes=(8 << 30) if cuda else (2 << 30), max_num_seqs=8,
              max_num_batched_tokens=8192 if cuda else 1024, prefill_chunk_size=2048 if cuda else 512,
              # Eight retrieving 128k streams keep ~24 GB of evicted KV on the host and ~12 GB of
              # scoring keys on the GPU (bf16).
              retrieval_archive_bytes=(48 << 30) if cuda else (2 << 30))
    texts = fillers(llm.tokenizer, max(lengths))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    meta = {"model": llm.engine.model_config.name, "device": device, "dtype": str(llm.engine.dtype),
            "lengths": lengths, "windows": windows, "depths": depths, "trials": trials, "retrieve": args.retrieve,
            "sinks": SINKS, "landmarks": LANDMARKS, "command": " ".join(sys.argv)}
    if args.ttft_length:
        meta["ttft_seconds"] = time_to_first_token(llm, texts, args.ttft_length, windows[0], args.retrieve)
        print("time to first token", meta["ttft_seconds"], flush=True)
    results = {}
    for window in windows:
        for length in lengths:
            for depth in depths:
                key = f"{window}/{length}/{depth}"
                results[key] = run_cell(llm, texts, window, length, depth, trials, args.retrieve, policy_names,
                                        args.seed)
                meta["seconds"] = time.perf_counter() - started
                print(key, json.dumps(results[key]), f"{meta['seconds']:.0f} s", flush=True)
                # Written after every cell: a run cut short keeps what it measured.
                (out_dir / "needle.json").write_text(json.dumps({"meta": meta, "cells": results}, indent=1))
    plot(results, windows, lengths, depths, out_dir)
    for name in [*policy_names, "oracle"]:
        cells = [c[name] for c in results.values()]
        line = f"{name:>22}: accuracy {sum(c['accuracy'] for c in cells) / len(cells):.3f}"
        if "needle_block_recall" in cells[0]:
            line += f", needle-block recall {sum(c['needle_block_recall'] for c in cells) / len(cells):.3f}"
        print(line)
    print(f"wrote {out_dir}/needle.json and PNGs ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
