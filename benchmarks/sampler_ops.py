"""Torch ops and Triton launches of one sampler call, eager against replayed as a CUDA graph.

What `sample()` dispatches on the host for a batch of each setting of benchmarks/sampling.py
(and a chat mix: temperature 0.8 + top_p 0.95, every tenth row with 5 logprobs): launched op by
op, and through `SamplerGraphs` (sampler_graphs.py). On CPU the replay is a stand-in that runs
nothing, so the graphed count is the host's own work per replay (its one graph launch aside),
and the draw's Triton kernels run in the interpreter, so their launches are the GPU's. On CPU,
pinned copies are skipped: a CUDA host adds two ops per copied array to both columns.

    python benchmarks/sampler_ops.py --out sampler_ops.json
"""

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from op_counter import OpCounter  # noqa: E402

from ropeway.engine import sampler  # noqa: E402
from ropeway.engine.sampler import SamplingRow, sample  # noqa: E402
from ropeway.engine.sampler_graphs import SamplerGraphs, cuda_graph_capture  # noqa: E402
from ropeway.sampling_params import SamplingParams  # noqa: E402

SETTINGS = {
    "greedy": lambda i: {"temperature": 0.0},
    "top_p": lambda i: {"temperature": 0.8, "top_p": 0.95},
    "top_k": lambda i: {"temperature": 0.8, "top_k": 50},
    "logprobs": lambda i: {"temperature": 0.0, "logprobs": 5},
    "chat mix": lambda i: {"temperature": 0.8, "top_p": 0.95, **({"logprobs": 5} if i % 10 == 0 else {})},
}


def replay_nothing(run):
    return (lambda: None), run()


def count(call) -> tuple[int, int, dict]:
    counter = OpCounter()
    with counter.counting_triton_launches(), counter:
        call()
    return sum(counter.ops.values()), sum(counter.launches.values()), dict(counter.ops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":  # chosen before triton is first imported
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "TRITON_INTERPRET": "1"})
    if not cuda:
        from ropeway.kernels.triton_sampling import filtered_draw_triton
        sampler.filtered_draw = filtered_draw_triton
    logits = torch.randn(args.batch, args.vocab, device="cuda" if cuda else "cpu")
    results = {}
    for name, setting in SETTINGS.items():
        rows = [SamplingRow(SamplingParams(seed=i, **setting(i)), seed=i, step=3) for i in range(args.batch)]
        capture = cuda_graph_capture(torch.cuda.graph_pool_handle()) if cuda else replay_nothing
        graphs = SamplerGraphs(SimpleNamespace(last_logits=logits), capture=capture)
        sample(logits, rows, graphs=graphs).read()  # captures, and compiles the kernels
        sample(logits, rows).read()
        for mode, with_graphs in (("eager", None), ("graphed", graphs)):
            ops, launches, by_name = count(lambda: sample(logits, rows, graphs=with_graphs))
            results[f"{name}, {mode}"] = {"torch_ops": ops, "triton_launches": launches, "ops": by_name}
            print(f"{name + ', ' + mode:20s} torch ops {ops:3d}  Triton launches {launches}")
    if args.out:
        args.out.write_text(json.dumps({"device": "cuda" if cuda else "cpu", "batch": args.batch,
                                        "vocab": args.vocab, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
