"""A 32k prompt's 8k prefill chunks: the Triton paged kernel against torch SDPA on gathered KV (CUDA).

  python benchmarks/prefill_vs_sdpa.py [--out results/prefill_vs_sdpa.json]

Each chunk attends to the cached prefix and, causally, to itself (a lower-right causal mask:
query i of the chunk sees keys up to prefix + i). SDPA needs the pages gathered into
contiguous K/V first (the "gather" row times that alone) and the lower-right mask
(torch.nn.attention.bias.causal_lower_right); it runs with GQA expanded to 32 heads,
with enable_gqa, and with the flash and cuDNN backends forced. "ms over 32 layers" sums the
four chunks and multiplies by the layer count: the attention share of the 32k TTFT.
"""

import argparse
import json

import torch
import torch.nn.functional as F
from kernels import HEAD_DIM, KV_HEADS, PAGE, Q_HEADS, shuffled_cache
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right
from triton.testing import do_bench

from ropeway.kernels.triton_attention import paged_attention_triton

LAYERS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--out", default="results/prefill_vs_sdpa.json")
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
        variants = {"triton paged": triton_paged, "sdpa expanded": sdpa(True), "sdpa enable_gqa": sdpa(False),
                    "sdpa flash": sdpa(True, SDPBackend.FLASH_ATTENTION),
                    "sdpa cudnn": sdpa(True, SDPBackend.CUDNN_ATTENTION), "gather": gather}
        for name, fn in variants.items():
            try:
                out = fn()
                diff = 0.0 if name in ("triton paged", "gather") else \
                    (out[0].transpose(0, 1).float() - reference.float()).abs().max().item()
                ms = do_bench(fn, warmup=5, rep=50)
            except RuntimeError as error:  # a backend that refuses the shape or the mask
                print(f"prefix {prefix:6d} {name:16s} failed: {str(error)[:120]}")
                continue
            totals[name] = totals.get(name, 0.0) + ms
            rows.append({"prefix": prefix, "variant": name, "ms": ms, "max_abs_diff": diff})
            print(f"prefix {prefix:6d} {name:16s} {ms * 1e3:9.1f} us  max |diff| {diff:.3g}", flush=True)
    over_layers = {name: ms * LAYERS for name, ms in totals.items()}
    print("ms over 32 layers:", {name: round(ms, 1) for name, ms in over_layers.items()})
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                   "ms_over_layers": over_layers}, f, indent=1)


if __name__ == "__main__":
    main()
