"""Decode attention at short contexts: KV-split counts and key tiles, timed in CUDA graphs (CUDA).

  python benchmarks/decode_split_sweep.py [--shapes 1:1024,32:2176] [--out results/decode_split_sweep.json]

Each row is a decode batch (B sequences of L cached tokens, GQA 32/8, head dim 128, 16-token
pages in shuffled order) launched as a captured decode graph launches it: max_seq_len is the
pool's capacity (131072), so choose_config's split count is the one the graph gets. Every
alternative is checked against the default's output before it is timed.
"""

import argparse
import itertools
import json

import torch
from kernels import HEAD_DIM, KV_HEADS, Q_HEADS, shuffled_cache
from triton.testing import do_bench_cudagraph

from ropeway.kernels.triton_attention import AttentionConfig, choose_config, paged_attention_triton

CAPACITY = 131072


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/decode_split_sweep.json")
    parser.add_argument("--shapes", default="1:1024,32:1024,64:1024,128:1024",
                        help="comma-separated BATCH:LENGTH decode batches")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for batch, length in (tuple(int(n) for n in shape.split(":")) for shape in args.shapes.split(",")):
        k_cache, v_cache, tables, _, _ = shuffled_cache(batch, length)
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        seq_lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
        query_start_loc = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
        default = choose_config(q, KV_HEADS, batch, 1, CAPACITY)

        def attend(config):
            return paged_attention_triton(q, k_cache, v_cache, tables, seq_lens, query_start_loc,
                                          HEAD_DIM ** -0.5, 1, CAPACITY, config=config)

        reference = attend(default)
        times = {}
        for block_n, splits in itertools.product((32, 64, 128), (1, 2, 4, 8, default.num_splits)):
            config = AttentionConfig(16, block_n, splits, default.num_warps, default.num_stages)
            if config in times:
                continue
            assert (attend(config).float() - reference.float()).abs().max().item() < 2e-2
            times[config] = do_bench_cudagraph(lambda: attend(config), rep=50, return_mode="median") * 1e3
        kv_bytes = batch * length * KV_HEADS * HEAD_DIM * 2 * 2
        ranked = sorted(times, key=times.get)
        print(f"B={batch} L={length}: default (block_n {default.block_n}, splits {default.num_splits}) "
              f"{times[default]:.1f} us, {kv_bytes / times[default] / 1e6:.2f} TB/s; best: "
              + "; ".join(f"{c.block_n}/{c.num_splits} {times[c]:.1f}" for c in ranked[:4]), flush=True)
        rows.append({"batch": batch, "length": length, "default": default.__dict__, "default_us": times[default],
                     "sweep": [{"config": c.__dict__, "us": t} for c, t in times.items()]})
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
