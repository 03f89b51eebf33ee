"""fp8 against bf16 decode attention: tile configs and fp8 widening variants, timed (CUDA; issue 20).

  python3 benchmarks/fp8_decode_sweep.py [--out results/fp8_decode_sweep.json] [--jobs 14] [--quick]

Cases: B=1 at 128k and B=8 at 32k cached tokens, Llama-3-8B attention (GQA 32/8, head dim 128,
16-token pages in shuffled order), block tables as wide as a 128k graph's and max_seq_len the
capacity (131072), as a captured decode graph launches them. Each config attends over LAYERS
layers with caches of their own (more bytes than L2 holds) inside a CUDA graph; the table
gives microseconds per layer, that times 32 (a whole step's attention, as long_memory.py
decode reports it), the KV read rate, and the error of layer 0's output against the torch
reference (fp32 on the dequantized cache): max abs and relative norm. "default" marks what
choose_config picks. Variants (AttentionConfig.fp8_widen): q = the old path (bf16 dots);
f16 = fp16 dots, Triton's cast; f16_ptx_v / f16_ptx = values / keys and values widened by
inline PTX. regs = AttentionConfig.max_registers (ptxas maxnreg).

Every config is compiled first in --jobs worker processes (into Triton's disk cache, on tiny
caches with the same strides), so the timed pass only loads kernels.
"""

import argparse
import itertools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ropeway.kernels.attention import paged_attention_reference  # noqa: E402
from ropeway.kernels.fp8_kv import cache_views, fp8_block_bytes, quantize_fp8  # noqa: E402
from ropeway.kernels.triton_attention import AttentionConfig, choose_config, paged_attention_triton  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
CAPACITY = 131072
TABLE_WIDTH = CAPACITY // PAGE
LAYERS = 4
CASES = {"B=1 L=128k": (1, 131072), "B=8 L=32k": (8, 32768)}


def make_caches(batch: int, length: int, fp8: bool, layers: int, seed: int = 0):
    """Per layer (k_cache, v_cache, k_scale, v_scale); the shared block table, q, seq_lens."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    pages = math.ceil(length / PAGE)
    num_blocks = batch * pages
    caches = []
    for _ in range(layers):
        if fp8:
            pool = torch.empty(2, num_blocks, fp8_block_bytes(PAGE, KV_HEADS, HEAD_DIM), dtype=torch.uint8,
                               device="cuda")
            layer = []
            for kind in (0, 1):
                values, scales = cache_views(pool[kind], KV_HEADS, HEAD_DIM)
                values[:], scales[:] = quantize_fp8(torch.randn(values.shape, generator=gen, device="cuda"))
                layer.append((values, scales))
            caches.append((layer[0][0], layer[1][0], layer[0][1], layer[1][1]))
        else:
            k = torch.randn(num_blocks, PAGE, KV_HEADS, HEAD_DIM, generator=gen, device="cuda").to(torch.bfloat16)
            v = torch.randn(num_blocks, PAGE, KV_HEADS, HEAD_DIM, generator=gen, device="cuda").to(torch.bfloat16)
            caches.append((k, v, None, None))
    table = torch.zeros(batch, TABLE_WIDTH, dtype=torch.int32, device="cuda")
    perm = torch.randperm(num_blocks, generator=gen, device="cuda").to(torch.int32)
    table[:, :pages] = perm.view(batch, pages)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, generator=gen, device="cuda").to(torch.bfloat16)
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    return caches, table, q, seq_lens


def attend(q, layer, table, seq_lens, config, out=None):
    k, v, ks, vs = layer
    query_start_loc = torch.arange(q.shape[0] + 1, dtype=torch.int32, device="cuda")
    return paged_attention_triton(q, k, v, table, seq_lens, query_start_loc, HEAD_DIM ** -0.5, 1, CAPACITY,
                                  config=config, k_scale=ks, v_scale=vs)


def candidates(batch: int, fp8: bool, quick: bool) -> list[tuple[str, AttentionConfig]]:
    """(label, config): the default first, then the grid."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = batch * KV_HEADS
    q = torch.empty(batch, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    default = choose_config(q, KV_HEADS, batch, 1, CAPACITY, fp8=fp8)
    bf16_splits = choose_config(q, KV_HEADS, batch, 1, CAPACITY).num_splits

    def fit(per_sm):  # one wave of per_sm programs per SM
        return max(1, min(per_sm * sms // tiles, CAPACITY // 2048)) if tiles < per_sm * sms else 1

    split_choices = sorted({bf16_splits, fit(2), fit(3), fit(4)} if not quick else {bf16_splits, fit(3)})
    out = [("default", default)]
    if fp8:
        old = AttentionConfig(16, 64, bf16_splits, 4, 2, fp8_widen="q")
        out += [("old path", old), ("f16", replace(old, fp8_widen="f16")),
                ("f16_ptx_v", replace(old, fp8_widen="f16_ptx_v")),
                ("f16_ptx_v", AttentionConfig(16, 128, default.num_splits, 4, 2, "f16_ptx_v", 168))]
        # (block_n, warps, stages, max registers)
        shapes = [(64, 4, 2, None), (64, 4, 2, 128), (64, 4, 3, 128), (64, 8, 2, None), (128, 4, 2, None),
                  (128, 4, 2, 168), (128, 4, 3, 168), (128, 8, 2, None), (128, 8, 2, 128), (256, 8, 2, None),
                  (32, 4, 2, None)]
        if quick:
            shapes = [(64, 4, 2, None), (64, 4, 2, 128), (128, 4, 2, 168), (128, 8, 2, 128)]
        out += [("f16_ptx", AttentionConfig(16, bn, s, w, st, "f16_ptx", reg))
                for (bn, w, st, reg), s in itertools.product(shapes, split_choices)]
    else:
        shapes = [(64, 4, 2, None), (64, 4, 2, 128), (64, 8, 2, None), (128, 8, 2, None)]
        out += [("bf16", AttentionConfig(16, bn, s, w, st, max_registers=reg))
                for (bn, w, st, reg), s in itertools.product(shapes, split_choices)]
    seen, unique = set(), []
    for label, config in out:
        if config not in seen:
            seen.add(config)
            unique.append((label, config))
    return unique


def compile_one(batch: int, fp8: bool, config: AttentionConfig) -> str | None:
    """Launch once on a tiny cache with the timed run's strides: Triton compiles into its disk
    cache. Returns the error, if any (also reported by the timed pass)."""
    try:
        caches, table, q, _ = make_caches(batch, 256, fp8, 1)
        seq_lens = torch.full((batch,), 256, dtype=torch.int32, device="cuda")
        attend(q, caches[0], table, seq_lens, config)
        torch.cuda.synchronize()
        return None
    except Exception as error:  # noqa: BLE001 - a config that does not build is a result
        return f"{type(error).__name__}: {error}"[:300]


def reference(q, layer, table, seq_lens):
    k, v, ks, vs = layer
    query_start_loc = torch.arange(q.shape[0] + 1, dtype=torch.int32, device="cuda")
    if ks is None:
        k, v = k.float(), v.float()
    return paged_attention_reference(q.float(), k, v, table, seq_lens, query_start_loc, HEAD_DIM ** -0.5,
                                     k_scale=ks, v_scale=vs)


def time_case(name: str, batch: int, length: int, fp8: bool, configs, rep_ms: int) -> list[dict]:
    from triton.testing import do_bench_cudagraph

    caches, table, q, seq_lens = make_caches(batch, length, fp8, LAYERS)
    expected = reference(q, caches[0], table, seq_lens)
    kv_bytes = sum(t.numel() * t.element_size() for t in caches[0] if t is not None)  # one layer, scales included
    rows = []
    for label, config in configs:
        row = {"case": name, "kv": "fp8" if fp8 else "bf16", "label": label, "config": asdict(config)}
        try:
            out = attend(q, caches[0], table, seq_lens, config).float()
            row["max_abs_error"] = (out - expected).abs().max().item()
            row["relative_error"] = ((out - expected).norm() / expected.norm()).item()

            def run():
                for layer in caches:
                    attend(q, layer, table, seq_lens, config)

            per_layer = do_bench_cudagraph(run, rep=rep_ms, return_mode="median") * 1e3 / LAYERS
            row.update(us_per_layer=per_layer, ms_32_layers=per_layer * 32e-3, kv_tb_per_s=kv_bytes / per_layer / 1e6)
        except Exception as error:  # noqa: BLE001
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        rows.append(row)
    return rows


def describe(row: dict) -> str:
    c = row["config"]
    return (f"{row['label']:<10}{c['fp8_widen'] if row['kv'] == 'fp8' else '':<10}{c['block_n']:>4}{c['num_splits']:>5}"
            f"{c['num_warps']:>3}{c['num_stages']:>3}{str(c['max_registers'] or ''):>5}")


def print_table(rows: list[dict]) -> None:
    good = sorted((r for r in rows if "us_per_layer" in r), key=lambda r: r["us_per_layer"])
    print(f"\n{rows[0]['case']} {rows[0]['kv']}: {'label':<10}{'widen':<10}{'bn':>4}{'spl':>5}{'w':>3}{'st':>3}"
          f"{'regs':>5}{'us/layer':>10}{'x32 ms':>8}{'TB/s':>7}{'max err':>10}{'rel err':>10}")
    for r in good:
        flag = "  <- default" if r["label"] == "default" else ""
        bad = "  ERROR>2e-2" if r["relative_error"] > 2e-2 else ""
        print(f"{'':>{len(rows[0]['case']) + len(rows[0]['kv']) + 3}}{describe(r)}{r['us_per_layer']:>10.1f}"
              f"{r['ms_32_layers']:>8.3f}{r['kv_tb_per_s']:>7.2f}{r['max_abs_error']:>10.2e}{r['relative_error']:>10.2e}"
              f"{flag}{bad}")
    for r in rows:
        if "error" in r:
            print(f"   failed: {describe(r)}: {r['error']}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/fp8_decode_sweep.json")
    parser.add_argument("--jobs", type=int, default=14, help="compile workers (1: compile while timing)")
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--rep-ms", type=int, default=25, help="do_bench_cudagraph's rep per config")
    args = parser.parse_args()
    started = time.perf_counter()
    work = [(name, batch, length, fp8, candidates(batch, fp8, args.quick))
            for name, (batch, length) in CASES.items() for fp8 in (False, True)]
    if args.jobs > 1:
        import multiprocessing

        tasks = [(batch, fp8, config) for _, batch, _, fp8, configs in work for _, config in configs]
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(compile_one, *zip(*tasks)))
        print(f"compiled {len(tasks)} configs in {time.perf_counter() - started:.0f} s", flush=True)
    results = []
    for name, batch, length, fp8, configs in work:
        rows = time_case(name, batch, length, fp8, configs, args.rep_ms)
        print_table(rows)
        results += rows
    summary = {}
    for name in CASES:
        best = {}
        for kv in ("bf16", "fp8"):
            timed = [r for r in results if r["case"] == name and r["kv"] == kv and "us_per_layer" in r
                     and r["relative_error"] <= 2e-2]
            default = next((r for r in timed if r["label"] == "default"), None)
            best[kv] = min(timed, key=lambda r: r["us_per_layer"]) if timed else None
            summary[f"{name} {kv}"] = {"default_us": default and default["us_per_layer"],
                                       "best_us": best[kv] and best[kv]["us_per_layer"],
                                       "best_config": best[kv] and best[kv]["config"]}
        if best["bf16"] and best["fp8"]:
            bf16_default = summary[f"{name} bf16"]["default_us"]
            print(f"\n{name}: bf16 default {bf16_default:.1f} us/layer; fp8 default "
                  f"{summary[f'{name} fp8']['default_us']:.1f}, best fp8 {best['fp8']['us_per_layer']:.1f} "
                  f"({describe(best['fp8'])}): {bf16_default / best['fp8']['us_per_layer']:.2f}x bf16's default")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "seconds": time.perf_counter() - started,
                   "layers_per_graph": LAYERS, "summary": summary, "rows": results}, f, indent=1)
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
