"""One layer's decode attention on CPU at long contexts: in pieces (cpu_long_decode.py) against one gather.

  python benchmarks/cpu_decode_attention.py                         # 1k-16k, batch 1 and 4, 2 threads
  python benchmarks/cpu_decode_attention.py --contexts 4096 --threads 1

The default model's attention shape (9 query heads, 3 KV heads, head_dim 64, 16-slot blocks,
fp32). Each sequence's blocks are laid out as a pool hands them out: `ascending` (a fresh
pool: the pieces read the cache in place), `descending` (a freed sequence's blocks, which come
back tail first) or `scattered` (every other block); in those two the pieces gather whole
blocks. `one gather` is the path for short decodes (each sequence's keys gathered slot by slot
into one tensor, one SDPA call per length bucket), forced by raising
cpu_attention.LONG_DECODE_KEYS. The two take turns; each figure is the median of --repeats
timings of --calls calls.
"""

import argparse
import statistics
import time

import torch

from ropeway.kernels import cpu_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 16


def layout(kind: str, first: int, count: int) -> torch.Tensor:
    blocks = torch.arange(first, first + count)
    if kind == "descending":
        return blocks.flip(0)
    if kind == "scattered":
        return first + 2 * torch.arange(count)
    return blocks


def case(context: int, batch: int, kind: str):
    count = -(-context // BLOCK)
    span = 2 * count + 1  # room for a scattered table
    tables = torch.stack([layout(kind, 1 + s * span, count) for s in range(batch)]).int()
    kv = torch.randn(2, 1 + batch * span, BLOCK, KV_HEADS, HEAD_DIM)
    q = torch.randn(batch, HEADS, HEAD_DIM)
    return q, kv, tables, torch.full((batch,), context), torch.arange(batch + 1)


def time_calls(q, kv, tables, seq_lens, starts, calls: int) -> float:
    plan = cpu_attention.plan_cpu_attention(tables, seq_lens, starts, BLOCK)
    cpu_attention.paged_attention_cpu(q, kv[0], kv[1], tables, seq_lens, starts, HEAD_DIM ** -0.5, plan=plan)
    began = time.perf_counter()
    for _ in range(calls):
        cpu_attention.paged_attention_cpu(q, kv[0], kv[1], tables, seq_lens, starts, HEAD_DIM ** -0.5, plan=plan)
    return (time.perf_counter() - began) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--layouts", nargs="*", default=["ascending", "descending", "scattered"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    long_decode_keys = cpu_attention.LONG_DECODE_KEYS
    print(f"threads {args.threads}; ms per layer call")
    print("| context | batch | layout | pieces ms | one gather ms | one gather / pieces |")
    print("|---:|---:|---|---:|---:|---:|")
    for context in args.contexts:
        for batch in args.batches:
            for kind in args.layouts:
                inputs = case(context, batch, kind)
                times = {"pieces": [], "one gather": []}
                for repeat in range(args.repeats):
                    for name in (("pieces", "one gather") if repeat % 2 == 0 else ("one gather", "pieces")):
                        cpu_attention.LONG_DECODE_KEYS = long_decode_keys if name == "pieces" else 1 << 62
                        times[name].append(time_calls(*inputs, args.calls))
                cpu_attention.LONG_DECODE_KEYS = long_decode_keys
                ours, theirs = (statistics.median(times[name]) for name in ("pieces", "one gather"))
                print(f"| {context} | {batch} | {kind} | {ours:.3f} | {theirs:.3f} | {theirs / ours:.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
