"""A 32k prompt's 8k prefill chunks: the Triton paged kernel, ropeway's cuDNN split, and torch SDPA (CUDA).

  python benchmarks/prefill_vs_sdpa.py [--out results/prefill_vs_sdpa.json] [--crossover]

Each chunk attends to the cached prefix and, causally, to itself (a lower-right causal mask:
query i of the chunk sees keys up to prefix + i). "cudnn split" is what the engine runs for
long chunks (kernels/cudnn_attention.py: the prefix without a mask and the chunk's own causal
square, in two cuDNN calls merged by log-sum-exp). SDPA needs the pages gathered into
contiguous K/V first (the "gather" row times that alone) and the lower-right mask
(torch.nn.attention.bias.causal_lower_right); it runs with GQA expanded to 32 heads,
with enable_gqa, and with the flash and cuDNN backends forced. "ms over 32 layers" sums the
four chunks and multiplies by the layer count: the attention share of the 32k TTFT.
--crossover also times Triton against the cuDNN split over chunk sizes x prefix lengths
(where kernels.LONG_CHUNK_MIN_QUERIES comes from). Times are warm: each cuDNN shape's plan
is built before timing (~75 ms once per shape).
"""

import argparse
import json

import torch
import torch.nn.functional as F
from kernels import HEAD_DIM, KV_HEADS, PAGE, Q_HEADS, shuffled_cache
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

from ropeway.kernels.cudnn_attention import attend_long_chunk
from ropeway.kernels.triton_attention import paged_attention_triton

LAYERS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--out", default="results/prefill_vs_sdpa.json")
    parser.add_argument("--crossover", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    k_cache, v_cache, block_table, _, _ = shuffled_cache(1, args.length)
    pages = block_table[0].long()
    scale = HEAD_DIM ** -0.5
    rows, totals = [], {}
    for prefix in range(0, args.length, args.chunk):
        seq_len = prefix + args.chunk
        q = torch.randn(args.chunk, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        query_start_loc = torch.tensor([0, args.chunk], dtype=torch.int32, device="cuda")
        seq_lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
        mask = causal_lower_right(args.chunk, seq_len)
        q_sdpa = q.transpose(0, 1).unsqueeze(0)

        def triton_paged():
            return paged_attention_triton(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                                          scale, args.chunk, seq_len)

        def gather():
            used = pages[: seq_len // PAGE]
            return tuple(c[used].view(seq_len, KV_HEADS, HEAD_DIM).transpose(0, 1).unsqueeze(0)
                         for c in (k_cache, v_cache))

        def sdpa(expand: bool, backend=None):
            def run():
                k, v = gather()
                if expand:
                    k, v = (t.repeat_interleave(Q_HEADS // KV_HEADS, dim=1) for t in (k, v))
                call = lambda: F.scaled_dot_product_attention(  # noqa: E731
                    q_sdpa, k, v, attn_mask=mask, scale=scale, enable_gqa=not expand)
                if backend is None:
                    return call()
                with sdpa_kernel(backend):
                    return call()
            return run

        reference = triton_paged()
        def cudnn_split():
            out = torch.empty_like(q)
            assert attend_long_chunk(q, k_cache, v_cache, block_table[0], prefix, scale, out)
            return out

        variants = {"triton paged": triton_paged, "cudnn split": cudnn_split,
                    "sdpa expanded": sdpa(True), "sdpa enable_gqa": sdpa(False),
                    "sdpa flash": sdpa(True, SDPBackend.FLASH_ATTENTION),
                    "sdpa cudnn": sdpa(True, SDPBackend.CUDNN_ATTENTION), "gather": gather}
        for name, fn in variants.items():
            try:
                out = fn()
                if name in ("triton paged", "gather"):
                    diff = 0.0
                else:
                    laid_out = out if out.dim() == 3 else out[0].transpose(0, 1)
                    diff = laid_out.float().sub(reference.float()).abs().max().item()
                ms = do_bench(fn, warmup=5, rep=50)
            except RuntimeError as error:  # a backend that refuses the shape or the mask
                print(f"prefix {prefix:6d} {name:16s} failed: {str(error)[:120]}")
                continue
            totals[name] = totals.get(name, 0.0) + ms
            rows.append({"prefix": prefix, "variant": name, "ms": ms, "max_abs_diff": diff})
            print(f"prefix {prefix:6d} {name:16s} {ms * 1e3:9.1f} us  max |diff| {diff:.3g}", flush=True)
    over_layers = {name: ms * LAYERS for name, ms in totals.items()}
    print("ms over 32 layers:", {name: round(ms, 1) for name, ms in over_layers.items()})
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
              "ms_over_layers": over_layers}
    if args.crossover:
        result["crossover"] = crossover(k_cache, v_cache, block_table, scale)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def crossover(k_cache, v_cache, block_table, scale) -> list[dict]:
    """Triton against the cuDNN split for one chunk of n queries after `prefix` cached keys."""
    rows = []
    print(f"\n{'queries':>7s} {'prefix':>7s} {'triton us':>10s} {'cudnn us':>9s} {'speedup':>7s}")
    for n in (1024, 2048, 4096, 8192):
        for prefix in (0, 4096, 16384, 24576):
            q = torch.randn(n, Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
            query_start_loc = torch.tensor([0, n], dtype=torch.int32, device="cuda")
            seq_lens = torch.tensor([prefix + n], dtype=torch.int32, device="cuda")
            out = torch.empty_like(q)
            triton_ms = do_bench(lambda: paged_attention_triton(
                q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale, n, prefix + n), warmup=5, rep=30)
            cudnn_ms = do_bench(lambda: attend_long_chunk(q, k_cache, v_cache, block_table[0], prefix, scale, out),
                                warmup=5, rep=30)
            rows.append({"queries": n, "prefix": prefix, "triton_ms": triton_ms, "cudnn_split_ms": cudnn_ms})
            print(f"{n:7d} {prefix:7d} {triton_ms * 1e3:10.1f} {cudnn_ms * 1e3:9.1f} {triton_ms / cudnn_ms:6.2f}x",
                  flush=True)
    return rows


if __name__ == "__main__":
    main()
