"""ropeway against transformers on CPU, side by side in one process, on the same GGUF (fp32).

  python benchmarks/cpu_vs_transformers.py                      # prefill 2k-16k, decode at 16 and 4k tokens
  python benchmarks/cpu_vs_transformers.py --prefill 2048 4096  # a shorter run

Prefill: one prompt of N random token ids, time to its first output token (greedy).
Decode: after a prompt of C tokens, the time of the next D tokens (the first token excluded).
Each figure is the median of --repeats runs. The two libraries take turns at each shape, and
which goes first alternates from one repeat to the next, so on a shared machine both see the
same load. ropeway runs with prefix caching off (a repeat must not reuse the previous run's
blocks) and its defaults otherwise (2,048-token prefill chunks); transformers runs `generate` on
its whole prompt at once (its SDPA attention). Prints a table, writes JSON (every run's times).
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ropeway import LLM, SamplingParams
from ropeway.models.default_model import default_model_path

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_vs_transformers.json"


def ropeway_times(llm: LLM, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds of the tokens after it)."""
    engine = llm.engine
    engine.add_request(f"bench-{time.monotonic_ns()}", prompt,
                       SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    started = time.perf_counter()
    first = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if first is None and output.outputs[0].token_ids:
                first = time.perf_counter()
    return first - started, time.perf_counter() - first


class FirstTokenClock:
    """A transformers streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.puts = 0
        self.first = None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def transformers_times(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    clock = FirstTokenClock()
    ids = torch.tensor([prompt])
    started = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, streamer=clock, pad_token_id=0)
    return clock.first - started, time.perf_counter() - clock.first


def side_by_side(ours, theirs, repeats: int, pick: int) -> tuple[list[float], list[float]]:
    """Each side's times (element pick of what a run returns) over repeats, the side that goes
    first alternating from one repeat to the next."""
    times: dict = {ours: [], theirs: []}
    for repeat in range(repeats):
        for run in ((ours, theirs) if repeat % 2 == 0 else (theirs, ours)):
            times[run].append(run()[pick])
    return times[ours], times[theirs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, nargs="*", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--decode-contexts", type=int, nargs="*", default=[16, 4096])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Other work on the machine slows both libraries, and 2-thread runs far more than 1-thread ones.
    load_before = os.getloadavg()
    from transformers import AutoModelForCausalLM

    # Prompt plus output tokens: one after a prefill, decode_tokens + 1 after a decode context.
    longest = max([n + 1 for n in args.prefill] + [c + args.decode_tokens + 1 for c in args.decode_contexts])
    # The default 1 GiB KV pool holds 23k tokens of the default model.
    llm = LLM(dtype="float32", device="cpu", enable_prefix_caching=False, max_model_len=longest)
    gguf = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    vocab = hf.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def prompt(length: int) -> list[int]:
        return torch.randint(100, vocab, (length,), generator=generator).tolist()

    # One short run each first: the first call of either pays one-time costs.
    warm = prompt(32)
    ropeway_times(llm, warm, 2)
    transformers_times(hf, warm, 2)

    rows = []
    for length in args.prefill:
        ids = prompt(length)
        ours_runs, theirs_runs = side_by_side(lambda: ropeway_times(llm, ids, 1),
                                              lambda: transformers_times(hf, ids, 1), args.repeats, 0)
        ours, theirs = statistics.median(ours_runs), statistics.median(theirs_runs)
        rows.append({"what": "prefill", "tokens": length, "ropeway_s": ours, "transformers_s": theirs,
                     "ropeway_runs": ours_runs, "transformers_runs": theirs_runs})
        print(f"prefill {length:>6} tokens: ropeway {ours:7.2f} s, transformers {theirs:7.2f} s", flush=True)
    for context in args.decode_contexts:
        ids = prompt(context)
        # One more token than timed: the first comes from the prefill.
        ours_runs, theirs_runs = side_by_side(lambda: ropeway_times(llm, ids, args.decode_tokens + 1),
                                              lambda: transformers_times(hf, ids, args.decode_tokens + 1),
                                              args.repeats, 1)
        ours, theirs = statistics.median(ours_runs), statistics.median(theirs_runs)
        rows.append({"what": "decode", "context": context, "tokens": args.decode_tokens,
                     "ropeway_s": ours, "transformers_s": theirs,
                     "ropeway_runs": ours_runs, "transformers_runs": theirs_runs})
        print(f"decode {args.decode_tokens} tokens at {context:>6}: ropeway {ours:7.2f} s, "
              f"transformers {theirs:7.2f} s", flush=True)

    print("\n| what | tokens | ropeway s | transformers s | transformers / ropeway |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        shape = (f"{row['tokens']}" if row["what"] == "prefill"
                 else f"{row['tokens']} after {row['context']}")
        print(f"| {row['what']} | {shape} | {row['ropeway_s']:.2f} | {row['transformers_s']:.2f} "
              f"| {row['transformers_s'] / row['ropeway_s']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
        "load_average_before_after": [load_before[0], os.getloadavg()[0]], "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
