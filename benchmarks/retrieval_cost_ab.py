"""Retrieval's time to first token in two source trees, interleaved round by round (issue 19).

retrieval_cost.py times one tree: its modes alternate, but comparing two trees meant two runs
minutes apart, and these machines' hosts drift more than that in minutes (one call: the same
mode's fastest run 0.90 s in the first tree's run, 0.75 s in the second's). Here each tree runs
in a process of its own (a package cannot be imported twice in one), each loads the model once,
and the rounds alternate between them (ABBA...: neither always goes first), so both trees see the
same drift. A round is one prompt with retrieval on and one with archive and recall switched off.

  # H200: the session's start against the working tree, window 4096, 9 rounds each:
  python3 benchmarks/retrieval_cost_ab.py /tmp/old-tree . --window 4096 --rounds 9 --out ab.json

Reported per tree: the median of its rounds' ratios (retrieval on over off, the figure issue 19's
target reads) and the ratio of each mode's fastest run; and the paired difference of the two
trees' ratios, round by round (the second tree's minus the first's), with its median and range.
Each tree's own benchmarks/retrieval_cost.py and needle.py run its rounds.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# What a tree's process runs: load once, then one round per line read, one JSON line written.
WORKER = """
import json, sys
sys.path.insert(0, "benchmarks")
import needle, retrieval_cost as rc
import torch
from ropeway import LLM
model, length, window, retrieve = sys.argv[1] or None, int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cuda = torch.cuda.is_available()
llm = LLM(model, dtype="bfloat16" if cuda else "float32", max_model_len=length + 64,
          kv_cache_memory_bytes=(8 << 30) if cuda else (1 << 30), max_num_seqs=2,
          max_num_batched_tokens=8192 if cuda else 1024, prefill_chunk_size=2048 if cuda else 512,
          retrieval_archive_bytes=(16 << 30) if cuda else (2 << 30))
prompt = next(iter(needle.fillers(llm.tokenizer, length).values()))[:length]
policy = needle.policies(window, retrieve)["retrieve"]
for _ in range(2 if cuda else 0):  # compiles what the prompt needs
    rc.run_prompt(llm, prompt, policy, False), rc.run_prompt(llm, prompt, policy, True)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    on, steps = rc.run_prompt(llm, prompt, policy, False)
    off, _ = rc.run_prompt(llm, prompt, policy, True)
    print(json.dumps({"on": on, "off": off, "steps": steps}), flush=True)
"""


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def start(tree: Path, args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    worker = subprocess.Popen([sys.executable, "-c", WORKER, args.model or "", str(args.length), str(args.window),
                               str(args.retrieve)], cwd=tree, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    while True:  # (the model's own messages go to stderr; stdout carries only JSON lines)
        line = worker.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker for {tree} exited before it was ready")
        if json.loads(line).get("ready"):
            return worker


def one_round(worker: subprocess.Popen) -> dict:
    worker.stdin.write("round\n")
    worker.stdin.flush()
    return json.loads(worker.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs=2, type=Path, help="two source trees (each with ropeway/ and benchmarks/)")
    parser.add_argument("--model", default=None, help="a model directory or GGUF (default: the built-in model)")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--retrieve", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    # Loaded one after the other, so that neither's start-up runs beside the other's rounds.
    workers = [start(tree.resolve(), args) for tree in args.trees]
    rounds: list[list[dict]] = [[], []]
    try:
        for index in range(args.rounds):
            order = (0, 1) if index % 2 == 0 else (1, 0)
            for which in order:
                rounds[which].append(one_round(workers[which]))
    finally:
        for worker in workers:
            worker.stdin.close()
            worker.wait()
    result = {"meta": {"trees": [str(t) for t in args.trees], "length": args.length, "window": args.window,
                       "retrieve": args.retrieve, "command": " ".join(sys.argv)}, "trees": []}
    ratios = [[r["on"] / r["off"] - 1 for r in tree_rounds] for tree_rounds in rounds]
    for tree, tree_rounds, tree_ratios in zip(args.trees, rounds, ratios):
        fastest = min(r["on"] for r in tree_rounds) / min(r["off"] for r in tree_rounds) - 1
        entry = {"tree": str(tree), "rounds": tree_rounds, "ratios": tree_ratios,
                 "median_ratio": median(tree_ratios), "fastest_ratio": fastest}
        result["trees"].append(entry)
        print(f"{tree}: retrieval adds {entry['median_ratio']:.1%} (median of {len(tree_ratios)} rounds: "
              f"{', '.join(f'{r:.0%}' for r in sorted(tree_ratios))}); fastest runs {fastest:.1%}", flush=True)
    differences = [b - a for a, b in zip(*ratios)]
    result["paired_difference"] = {"per_round": differences, "median": median(differences),
                                   "range": [min(differences), max(differences)]}
    print(f"second tree minus first, round by round: median {median(differences):+.1%} "
          f"(from {min(differences):+.1%} to {max(differences):+.1%})", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
