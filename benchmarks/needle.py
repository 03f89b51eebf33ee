"""Needle in a haystack past the window: does `landmark` + `retrieve` bring the needle back,
and does the model then answer? And what does retrieval cost in time to first token?

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
Policies: "retrieve" (no landmark summaries, the default with `retrieve`), "retrieve, 1
landmark", "retrieve, 64 landmarks", "landmark" (64 summaries, no retrieval), "sink_window".

--ttft-length N times one N-token prompt at the first window, median of 3, under sink_window,
under retrieve, and under retrieve with archiving and recall switched off (the same eviction
schedule: what retrieval itself adds); and decode steps of a stream that does not retrieve,
alone and beside a neighbour prefilling the same prompt with and without retrieval.

  # H200, two calls of an estimated 6-8 minutes each into one directory (results land cell by
  # cell; --resume keeps the cells already there, so a call cut short can be repeated):
  PYTHONPATH=. python3 benchmarks/needle.py --lengths 16384,32768,65536 --ttft-length 32768 \
      --extra-policies "retrieve, 1 landmark" --extra-lengths 16384 --out-dir benchmarks/results/needle_h200 --resume
  PYTHONPATH=. python3 benchmarks/needle.py --lengths 131072 --out-dir benchmarks/results/needle_h200 --resume
  # CPU check:
  PYTHONPATH=. python benchmarks/needle.py --lengths 2048 --windows 256 --depths 0.5 --trials 2 --retrieve 64

Defaults: lengths 16k-128k, depths 10/50/90%, 8 trials, policy "retrieve" and the oracle.
Writes OUT_DIR/needle.json after every cell and one heatmap PNG per policy at the end.
"""

import argparse
import glob
import inspect
import json
import math
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ropeway import LLM, ContextParams, SamplingParams
from ropeway.engine import cache_ops, recall

SINKS = 4
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
# "instructed": the long question's ask, then a format instruction and a generic "Answer:", as
# evaluation harnesses and users write them: its last 16 tokens name nothing the needle says.
ANSWER_INSTRUCTION = " Reply with the answer alone: no explanation, no full sentence, nothing else. Answer:"
for _, _, _questions in NEEDLES:
    _questions["instructed"] = _questions["long"][: _questions["long"].rindex("?") + 1] + ANSWER_INSTRUCTION
QUESTION_KINDS = ("short", "repeat", "long", "instructed")


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
    landmark = {"type": "landmark", "sinks": SINKS, "window": window}
    return {
        "retrieve": {**landmark, "retrieve": retrieve},
        "retrieve, 1 landmark": {**landmark, "landmarks": 1, "retrieve": retrieve},
        "retrieve, 64 landmarks": {**landmark, "landmarks": 64, "retrieve": retrieve},
        "landmark": {**landmark, "landmarks": 64},
        "sink_window": {"type": "sink_window", "sinks": SINKS, "window": window},
    }


def run_cell(llm: LLM, texts: dict, window: int, length: int, depth: float, trials: int, retrieve: int,
             policy_names: list[str], seed: int) -> dict:
    tokenizer = llm.tokenizer
    rng = random.Random(f"{seed}/{window}/{length}/{depth}")
    cases, labels = [], []
    for t in range(trials):
        filler = list(texts)[t % len(texts)]
        needle, answer, questions = NEEDLES[(t // len(texts) + t) % len(NEEDLES)]
        # Kinds rotate against fillers (a Latin square where their counts are equal): every
        # filler meets every kind of question.
        kind = QUESTION_KINDS[(t + t // len(texts)) % len(QUESTION_KINDS)]
        prompt, span, oracle = make_prompt(texts[filler], tokenizer.encode(needle),
                                           tokenizer.encode(questions[kind]), length, window, depth, retrieve, rng)
        cases.append((prompt, span, oracle, answer))
        labels.append(f"{filler}/{answer}/{kind}")
    params = SamplingParams(temperature=0, max_tokens=16)
    block = llm.engine.config.block_size
    cell = {}
    ops = llm.engine.runner.cache_ops

    def correct(outputs) -> list[bool]:
        return [answer.lower() in out.outputs[0].text.lower() for out, (_, _, _, answer) in zip(outputs, cases)]

    def accuracy(outputs) -> float:
        return sum(correct(outputs)) / trials

    def per_trial(outputs, shares=None) -> list[dict]:
        """Each prompt's case (filler/answer/question kind), answer text, and needle-block share."""
        return [{"case": label, "text": out.outputs[0].text, "correct": ok,
                 **({"needle_block_share": shares[i]} if shares else {})}
                for i, (label, out, ok) in enumerate(zip(labels, outputs, correct(outputs)))]

    with recording_recalls(llm) as recalled:
        for name in policy_names:
            recalled.clear()
            policy = policies(window, retrieve)[name]
            budget = ops.archive_budget
            forgotten, forgotten_in_use = budget.num_forgotten_blocks, budget.num_forgotten_in_use_blocks
            outputs = llm.generate([c[0] for c in cases], params, context=ContextParams(context_policy=policy))
            result = {"accuracy": accuracy(outputs)}
            if policy.get("retrieve"):
                shares = [needle_block_share(span, recalled.get(out.request_id, []), block)
                          for out, (_, span, _, _) in zip(outputs, cases)]
                result["needle_block_recall"] = sum(shares) / trials
                # Blocks the archive budget dropped: those of the earlier cells' finished streams
                # (idle), and of this cell's streams (in use: a needle among them was never recallable).
                result["archive_forgotten_blocks"] = budget.num_forgotten_blocks - forgotten
                result["archive_forgotten_in_use_blocks"] = budget.num_forgotten_in_use_blocks - forgotten_in_use
                if result["archive_forgotten_in_use_blocks"]:
                    print(f"warning: {window}/{length}/{depth} {name}: the archive budget forgot "
                          f"{result['archive_forgotten_in_use_blocks']} blocks of the cell's streams "
                          "(raise retrieval_archive_bytes)", flush=True)
            result["trials"] = per_trial(outputs, shares if policy.get("retrieve") else None)
            cell[name] = result
    oracle = llm.generate([c[2] for c in cases], params)
    cell["oracle"] = {"accuracy": accuracy(oracle), "trials": per_trial(oracle)}
    return cell


@contextmanager
def recording_recalls(llm: LLM):
    """Yields {request id: token index of the first token of each block its last recall (the
    question's) brought back}, filled while the block runs."""
    ops = llm.engine.runner.cache_ops
    original, recalled = ops.recall, {}

    def record(item):
        original(item)
        if item.samples:
            recalled[item.seq.request_id] = list(item.seq.archive.recalled_tokens)

    ops.recall = record
    try:
        yield recalled
    finally:
        ops.recall = original


def needle_block_share(span: tuple[int, int], recalled_tokens: list[int], block_size: int) -> float:
    """The share of the needle's blocks (token span [first, last) of the stream) among the blocks
    a recall brought back (their first tokens). Blocks are aligned with the stream after the sink
    blocks, which are whole blocks."""
    first, last = span
    needle_blocks = set(range(first // block_size, (last - 1) // block_size + 1))
    brought = {start // block_size for start in recalled_tokens}
    return len(needle_blocks & brought) / len(needle_blocks)


@contextmanager
def retrieval_switched_off(llm: LLM):
    """Retrieving caches evict on the same schedule, but nothing is archived, scored or recalled."""
    ops = llm.engine.runner.cache_ops
    archive, capture = ops.archive_evicted, ops.query_capture
    ops.archive_evicted, ops.query_capture = (lambda eviction: None), (lambda step, starts, num_tokens: None)
    try:
        yield
    finally:
        ops.archive_evicted, ops.query_capture = archive, capture


def time_to_first_token(llm: LLM, texts: dict, length: int, window: int, retrieve: int) -> dict[str, float]:
    """Median seconds (of 3) to prefill one prompt and sample a token under sink_window, under
    retrieve, and under retrieve with retrieval switched off (the same chunks and evictions)."""
    prompt = next(iter(texts.values()))[:length]
    named = policies(window, retrieve)
    out = {}
    for name, policy, switched_off in (("sink_window", named["sink_window"], False),
                                       ("retrieve", named["retrieve"], False),
                                       ("retrieve, archive and recall off", named["retrieve"], True)):
        times = []
        for _ in range(3):
            with retrieval_switched_off(llm) if switched_off else nullcontext():
                started = time.perf_counter()
                llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1),
                             context=ContextParams(context_policy=policy))
                times.append(time.perf_counter() - started)
        out[name] = sorted(times)[1]
    out["retrieval_overhead"] = out["retrieve"] / out["retrieve, archive and recall off"] - 1
    return out


def decode_step_seconds(llm: LLM, texts: dict, length: int, window: int, retrieve: int,
                        decode_tokens: int = 48) -> dict[str, float]:
    """Median seconds of an engine step in which a short sink_window stream decodes: alone, and
    beside a neighbour prefilling a `length`-token prompt under sink_window and under retrieve;
    and of the neighbour's own decode steps after its prompt (no recall happens in decode)."""
    engine = llm.engine
    named = policies(window, retrieve)
    decoding = {"type": "sink_window", "sinks": SINKS, "window": window}
    short = next(iter(texts.values()))[:64]
    prompt = list(texts.values())[-1][:length]
    params = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    out = {}

    def steps(neighbour: str | None) -> tuple[list[float], list[float]]:
        """Step times while the short stream decodes beside the neighbour's prefill, and the
        neighbour's own decode steps once the short stream has finished."""
        engine.add_request("short", short, params, ContextParams(context_policy=decoding))
        seq = engine.requests["short"].choices[0].seq
        while not seq.prompt_done or len(seq.output_token_ids) < 2:
            engine.step()
        other = None
        if neighbour:
            engine.add_request("neighbour", prompt, SamplingParams(temperature=0, max_tokens=3 * decode_tokens,
                                                                   ignore_eos=True),
                               ContextParams(context_policy=named[neighbour]))
            other = engine.requests["neighbour"].choices[0].seq
        beside, own = [], []
        while engine.has_unfinished_requests():
            decoding_short = "short" in engine.requests
            prefilling = other is not None and not other.prompt_done
            started = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - started
            if decoding_short and (prefilling or other is None):
                beside.append(elapsed)
            elif not decoding_short and other is not None and other.prompt_done:
                own.append(elapsed)
        return beside, own

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2] if values else float("nan")

    out["decode alone"] = median(steps(None)[0])
    for name in ("sink_window", "retrieve"):
        beside, own = steps(name)
        out[f"decode beside a {name} prefill"] = median(beside)
        out[f"{name} stream's own decode"] = median(own)
    return out


def plot(results: dict, windows: list[int], lengths: list[int], depths: list[float], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(name for cell in results.values() for name in cell))
    for name in names:
        measures = list(dict.fromkeys(m for cell in results.values() if name in cell
                                      for m in cell[name] if m in ("accuracy", "needle_block_recall")))
        fig, axes = plt.subplots(len(measures), len(windows), squeeze=False,
                                 figsize=(3.2 * len(windows) + 1, 2.6 * len(measures) + 0.6))
        for row, measure in enumerate(measures):
            for col, window in enumerate(windows):
                # A cell that did not run this policy (or has not run yet) stays blank.
                grid = [[results.get(f"{window}/{length}/{depth}", {}).get(name, {}).get(measure, math.nan)
                         for length in lengths] for depth in depths]
                ax = axes[row][col]
                ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
                ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths])
                ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
                for i, values in enumerate(grid):
                    for j, value in enumerate(values):
                        if not math.isnan(value):
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
    parser.add_argument("--lengths", default="16384,32768,65536,131072")
    parser.add_argument("--windows", default="1024,4096")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="comma-separated shares of the evicted part")
    parser.add_argument("--trials", type=int, default=8, help="prompts per cell, run as concurrent streams")
    parser.add_argument("--retrieve", type=int, default=256)
    parser.add_argument("--policies", default="retrieve",
                        help=f"comma-separated, of: {', '.join(policies(1024, 256))} (the oracle always runs)")
    parser.add_argument("--extra-policies", default="", help="comma-separated policies run only at --extra-lengths")
    parser.add_argument("--extra-lengths", default="", help="comma-separated lengths for --extra-policies")
    parser.add_argument("--ttft-length", type=int, default=0,
                        help="first time one prompt of this length and decode steps beside it (window: the first)")
    parser.add_argument("--out-dir", default="benchmarks/results/needle")
    parser.add_argument("--resume", action="store_true", help="keep the cells OUT_DIR/needle.json already holds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--standout-ratio", type=float, default=recall.RECALL_STANDOUT_RATIO,
                        help="the standout rule: when few blocks score within this factor of the best, the region "
                             "holds contiguous runs around them (engine/recall.py RECALL_STANDOUT_RATIO; 0: off; "
                             "default: the engine's, %(default)s)")
    parser.add_argument("--recompute-recalled", choices=("on", "off"), default="on",
                        help="compute the question's recalled blocks afresh in the region (the engine's default: on)")
    args = parser.parse_args()
    cache_ops.RECOMPUTE_RECALLED = args.recompute_recalled == "on"
    recall.RECALL_STANDOUT_RATIO = args.standout_ratio or None

    cuda = torch.cuda.is_available()
    lengths = [int(n) for n in args.lengths.split(",")]
    windows = [int(n) for n in args.windows.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    policy_names = args.policies.split(",")
    extra_names = [n for n in args.extra_policies.split(",") if n]
    extra_lengths = {int(n) for n in args.extra_lengths.split(",") if n}
    unknown = set(policy_names + extra_names) - set(policies(1024, 256))
    if unknown:
        parser.error(f"unknown policies {sorted(unknown)}")
    llm = LLM(dtype="bfloat16" if cuda else "float32", max_model_len=max(lengths) + 64,
              kv_cache_memory_bytes=(8 << 30) if cuda else (2 << 30), max_num_seqs=max(args.trials, 2),
              max_num_batched_tokens=8192 if cuda else 1024, prefill_chunk_size=2048 if cuda else 512,
              # Eight retrieving 128k streams keep ~24 GB of evicted KV on the host (pinned) and
              # ~12 GB of scoring keys on the GPU (bf16).
              retrieval_archive_bytes=(48 << 30) if cuda else (2 << 30))
    texts = fillers(llm.tokenizer, max(lengths))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / "needle.json"
    started = time.perf_counter()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    meta = {"model": llm.engine.model_config.name, "device": device, "dtype": str(llm.engine.dtype),
            "lengths": lengths, "windows": windows, "depths": depths, "trials": args.trials,
            "retrieve": args.retrieve, "sinks": SINKS, "policies": policy_names,
            "extra_policies": extra_names, "extra_lengths": sorted(extra_lengths), "command": " ".join(sys.argv),
            "recompute_recalled": args.recompute_recalled, "standout_ratio": args.standout_ratio}
    results = {}
    if args.resume and results_file.exists():
        saved = json.loads(results_file.read_text())
        results = saved["cells"]
        meta = {**saved["meta"], **{k: v for k, v in meta.items() if k != "command"}}
        print(f"resuming: {len(results)} cells already measured", flush=True)

    def save() -> None:
        meta["seconds"] = meta.get("seconds_before", 0) + time.perf_counter() - started
        results_file.write_text(json.dumps({"meta": meta, "cells": results}, indent=1))

    meta["seconds_before"] = meta.get("seconds", 0)
    if args.ttft_length:
        meta["ttft_seconds"] = time_to_first_token(llm, texts, args.ttft_length, windows[0], args.retrieve)
        print("time to first token", json.dumps(meta["ttft_seconds"]), flush=True)
        meta["decode_step_seconds"] = decode_step_seconds(llm, texts, args.ttft_length, windows[0], args.retrieve)
        print("decode steps", json.dumps(meta["decode_step_seconds"]), flush=True)
        save()
    for window in windows:
        for length in lengths:
            names = policy_names + (extra_names if length in extra_lengths else [])
            for depth in depths:
                key = f"{window}/{length}/{depth}"
                if key in results:
                    continue
                results[key] = run_cell(llm, texts, window, length, depth, args.trials, args.retrieve, names,
                                        args.seed)
                save()  # after every cell: a run cut short keeps what it measured
                summary = {name: {m: v for m, v in r.items() if m != "trials"} for name, r in results[key].items()}
                print(key, json.dumps(summary), f"{meta['seconds']:.0f} s", flush=True)
                for name, r in results[key].items():
                    for trial in r["trials"]:
                        print(f"    {name:>12} {trial['case']:<28} {trial['correct']!s:<5} "
                              f"{trial.get('needle_block_share', '')!s:<5} {trial['text']!r}", flush=True)
    # The plots show every cell the file holds, earlier calls' (--resume) included.
    keys = [key.split("/") for key in results]
    plot(results, *(sorted({int(k[i]) for k in keys}) for i in (0, 1)), sorted({float(k[2]) for k in keys}), out_dir)
    for name in [*policy_names, *extra_names, "oracle"]:
        cells = [c[name] for c in results.values() if name in c]
        line = f"{name:>22}: accuracy {sum(c['accuracy'] for c in cells) / len(cells):.3f}"
        if "needle_block_recall" in cells[0]:
            line += f", needle-block recall {sum(c['needle_block_recall'] for c in cells) / len(cells):.3f}"
        print(line)
    print(f"wrote {results_file} and PNGs ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
