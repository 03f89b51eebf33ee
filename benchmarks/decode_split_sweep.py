"""Decode attention at short contexts: KV-split counts and key tiles, timed in CUDA graphs (CUDA).

  python benchmarks/decode_split_sweep.py [--shapes 1:1024,32:2176,256:100-2048] [--wide]
      [--out results/decode_split_sweep.json]

Each row is a decode batch (B sequences of L cached tokens, GQA 32/8, head dim 128, 16-token
pages in shuffled order; LOW-HIGH: each sequence's length drawn uniformly, as a serving batch's, and
by default ordered shortest first, as the model runner orders them)
launched as a captured decode graph launches it: max_seq_len is the
pool's capacity (131072), so choose_config's split count is the one the graph gets. Every
alternative is checked against the default's output before it is timed. --wide also varies warps
and pipeline stages.
"""

import argparse
import itertools
import json

import torch
import triton
from kernels import HEAD_DIM, KV_HEADS, Q_HEADS, shuffled_cache
from triton.testing import do_bench_cudagraph

from ropeway.kernels.triton_attention import AttentionConfig, choose_config, paged_attention_triton

CAPACITY = 131072


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/decode_split_sweep.json")
    parser.add_argument("--shapes", default="1:1024,32:1024,64:1024,128:1024",
                        help="comma-separated BATCH:LENGTH or BATCH:LOW-HIGH decode batches")
    parser.add_argument("--wide", action="store_true", help="also sweep warps (2, 4, 8) and stages (1-4)")
    parser.add_argument("--order", choices=["ascending", "drawn"], default="ascending",
                        help="drawn lengths shortest first, as the model runner orders a step's decodes, or as drawn")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        batch, lengths = shape.split(":")
        low, _, high = lengths.partition("-")
        batch, low, high = int(batch), int(low), int(high or low)
        k_cache, v_cache, tables, _, _ = shuffled_cache(batch, high)
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        seq_lens = torch.randint(low, high + 1, (batch,), device="cuda", dtype=torch.int32)
        if args.order == "ascending":
            seq_lens = seq_lens.sort().values
        query_start_loc = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
        default = choose_config(q, KV_HEADS, batch, 1, CAPACITY)

        def attend(config):
            return paged_attention_triton(q, k_cache, v_cache, tables, seq_lens, query_start_loc,
                                          HEAD_DIM ** -0.5, 1, CAPACITY, config=config)

        reference = attend(default)
        times = {}
        warps, stages = ((2, 4, 8), (1, 2, 3, 4)) if args.wide else ((default.num_warps,), (default.num_stages,))
        splits_tried = (1, 2, default.num_splits) if args.wide else (1, 2, 4, 8, default.num_splits)
        for block_n, splits, num_warps, num_stages in itertools.product((32, 64, 128), splits_tried, warps, stages):
            config = AttentionConfig(16, block_n, splits, num_warps, num_stages)
            if config in times:
                continue
            try:
                assert (attend(config).float() - reference.float()).abs().max().item() < 2e-2
            except triton.runtime.errors.OutOfResources:
                continue  # e.g. 128-key tiles in 4 stages: more shared memory than an SM has
            times[config] = do_bench_cudagraph(lambda: attend(config), rep=50, return_mode="median") * 1e3
        kv_bytes = int(seq_lens.sum()) * KV_HEADS * HEAD_DIM * 2 * 2
        ranked = sorted(times, key=times.get)
        print(f"B={batch} L={lengths}: default (block_n {default.block_n}, splits {default.num_splits}) "
              f"{times[default]:.1f} us, {kv_bytes / times[default] / 1e6:.2f} TB/s; best (keys/splits/warps/stages): "
              + "; ".join(f"{c.block_n}/{c.num_splits}/{c.num_warps}/{c.num_stages} {times[c]:.1f}"
                          for c in ranked[:5]), flush=True)
        rows.append({"batch": batch, "lengths": lengths, "default": default.__dict__, "default_us": times[default],
                     "sweep": [{"config": c.__dict__, "us": t} for c, t in times.items()]})
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
