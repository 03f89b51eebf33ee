"""Decode-sized linears on the GPU (issue 8): cuBLAS's F.linear against the Triton
skinny GEMM (every candidate config and K split, and choose_config's pick).

Shapes are Llama-3-8B's five projections (bf16, random weights) at 1..16 rows. Each
timing replays a CUDA graph of one call per weight copy, with enough copies that they
exceed the L2 cache several times over: as in a decode step, every call reads its weight
from HBM and pays no host launch cost. GB/s counts weight bytes only, against the measured
4.25 TB/s device copy bandwidth. Errors are max |out - F.linear in fp32|. A config that
fails is reported and skipped; past --budget-s only F.linear and the pick are timed.

    PYTHONPATH=$PWD python benchmarks/skinny_gemm.py [--rows 1 2 4 8 16] [--out PATH]

Writes JSON to $OUT/skinny_gemm.json if OUT is set, else benchmarks/results/skinny_gemm.json.
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ropeway.kernels.triton_linear import (DOT_CANDIDATES, ROW_CANDIDATES,  # noqa: E402
                                           SPLIT_CANDIDATES, LinearConfig, choose_config,
                                           choose_split, skinny_linear_triton)

COPY_BANDWIDTH = 4.25e12
LAYERS = 32
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}
# Several times the H200's 50 MB L2, so a graph's calls never find their weight cached.
COLD_BYTES = 256 * 2**20
TRIAL_SECONDS = 2e-3
TRIALS = 5


def graph_seconds_per_call(fn, x, weights) -> float:
    """Median seconds per call over TRIALS timed runs of a graph of one call per weight."""
    fn(x, weights[0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for weight in weights:
            fn(x, weight)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    replays = max(3, math.ceil(TRIAL_SECONDS / (start.elapsed_time(end) * 1e-3)))
    times = []
    for _ in range(TRIALS):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3 / (replays * len(weights)))
    del graph
    return sorted(times)[len(times) // 2]


def candidates(rows: int, k: int) -> list[LinearConfig]:
    tiles = ROW_CANDIDATES if rows == 1 else DOT_CANDIDATES
    return [LinearConfig(t.block_n, t.block_k, split, t.num_warps, t.num_stages)
            for t in tiles for split in SPLIT_CANDIDATES if k // split >= t.block_k]


def measure(label, fn, x, weights, expected, weight_bytes, baseline_error):
    row = {"kernel": label}
    try:
        error = (fn(x, weights[0]).float() - expected).abs().max().item()
        seconds = graph_seconds_per_call(fn, x, weights)
    except Exception as exc:  # one broken config must not end the sweep
        row["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        return row
    row.update(us=seconds * 1e6, gbps=weight_bytes / seconds / 1e9,
               pct_copy=100 * weight_bytes / seconds / COPY_BANDWIDTH, max_abs_error=error)
    if baseline_error is not None and error > 2 * baseline_error + 1e-3:
        row["wrong"] = True
    return row


def config_label(config: LinearConfig) -> str:
    return (f"bn{config.block_n} bk{config.block_k} split{config.split_k} "
            f"w{config.num_warps} s{config.num_stages}")


def run_shape(name, n, k, rows_list, num_sms, deadline):
    weight_bytes = n * k * 2
    copies = max(1, math.ceil(COLD_BYTES / weight_bytes))
    weights = [(torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16) for _ in range(copies)]
    x_all = torch.randn(max(rows_list), k, device="cuda").to(torch.bfloat16)
    expected_all = F.linear(x_all.float(), weights[0].float())
    results = []
    for rows in rows_list:
        x, expected = x_all[:rows].contiguous(), expected_all[:rows]
        cublas = measure("F.linear", F.linear, x, weights, expected, weight_bytes, None)
        pick = choose_config(rows, n, k, num_sms)
        heuristic = measure(f"pick {config_label(pick)}",
                            lambda a, w, c=pick: skinny_linear_triton(a, w, config=c),
                            x, weights, expected, weight_bytes, cublas.get("max_abs_error"))
        sweep = []
        if time.monotonic() < deadline:
            for config in candidates(rows, k):
                row = measure(config_label(config),
                              lambda a, w, c=config: skinny_linear_triton(a, w, config=c),
                              x, weights, expected, weight_bytes, cublas.get("max_abs_error"))
                sweep.append(dict(row, config=dataclasses.asdict(config)))
        timed = [r for r in [heuristic] + sweep if "us" in r and not r.get("wrong")]
        best = min(timed, key=lambda r: r["us"]) if timed else None
        results.append({"shape": name, "n": n, "k": k, "rows": rows, "weight_bytes": weight_bytes,
                        "copies": copies, "floor_us": weight_bytes / COPY_BANDWIDTH * 1e6,
                        "cublas": cublas, "pick": heuristic, "best": best, "sweep": sweep,
                        "swept": bool(sweep)})
        print_row(results[-1])
    del weights, expected_all
    torch.cuda.empty_cache()
    return results


def cell(row):
    if row is None:
        return "-"
    if "failed" in row:
        return "FAILED"
    flag = " WRONG" if row.get("wrong") else ""
    return f"{row['us']:8.1f} us {row['pct_copy']:5.1f}%{flag}"


def print_row(r):
    speedup = ""
    if "us" in r["cublas"] and "us" in r["pick"]:
        speedup = f"{r['cublas']['us'] / r['pick']['us']:.2f}x"
    best = r["best"]["kernel"] if r["best"] else "-"
    print(f"{r['shape']:>8} {r['rows']:>3} {r['floor_us']:8.1f} | {cell(r['cublas']):>22} | "
          f"{cell(r['pick']):>22} {speedup:>6} | {cell(r['best']):>22} {best}", flush=True)
    errors = [f"{label} {row['max_abs_error']:.2e}" for label, row in
              (("F.linear", r["cublas"]), ("pick", r["pick"]), ("best", r["best"]))
              if row and "max_abs_error" in row]
    print(f"{'':>13} max abs error vs fp32: " + ", ".join(errors), flush=True)
    for row in r["sweep"]:
        if "failed" in row or row.get("wrong"):
            print(f"{'':>13} {row['kernel']}: {row.get('failed', 'WRONG (error above 2x cuBLAS)')}",
                  flush=True)


def step_totals(results, rows_list):
    """Per row count: one decode step's GEMM time (LAYERS x the four layer projections, plus
    lm_head) with F.linear, with the pick, and with the best config per shape."""
    totals = {}
    for rows in rows_list:
        by_shape = {r["shape"]: r for r in results if r["rows"] == rows}
        if set(by_shape) != set(SHAPES):
            continue
        total = {}
        for key in ("cublas", "pick", "best"):
            rows_ok = [by_shape[s][key] for s in SHAPES]
            if all(row is not None and "us" in row for row in rows_ok):
                total[key] = sum(by_shape[s][key]["us"] * (1 if s == "lm_head" else LAYERS)
                                 for s in SHAPES)
        total["floor_us"] = sum(by_shape[s]["floor_us"] * (1 if s == "lm_head" else LAYERS)
                                for s in SHAPES)
        totals[rows] = total
    return totals


def tile_totals(results, rows_list, num_sms):
    """Per row count and candidate tile: the step's GEMM time with that tile for every shape,
    at the best swept K split per shape and at choose_split's split (None where a shape
    lacks a timing): which tile choose_config should put first, and whether its split rule
    is right."""
    summary = {}
    for rows in rows_list:
        by_shape = {r["shape"]: r for r in results if r["rows"] == rows and r["swept"]}
        if set(by_shape) != set(SHAPES):
            continue
        tiles = {}
        for shape, r in by_shape.items():
            per_step = 1 if shape == "lm_head" else LAYERS
            for row in r["sweep"]:
                if "us" not in row or row.get("wrong"):
                    continue
                c = row["config"]
                label = f"bn{c['block_n']} bk{c['block_k']} w{c['num_warps']} s{c['num_stages']}"
                entry = tiles.setdefault(label, {"best": {}, "rule": {}})
                entry["best"][shape] = min(entry["best"].get(shape, math.inf), row["us"] * per_step)
                if c["split_k"] == choose_split(r["n"], r["k"], c["block_n"], num_sms):
                    entry["rule"][shape] = row["us"] * per_step
        summary[rows] = {label: {key: sum(entry[key].values()) if len(entry[key]) == len(SHAPES) else None
                                 for key in ("best", "rule")}
                         for label, entry in tiles.items()}
    return summary


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="after this, stop sweeping configs (F.linear and the pick still run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    started = time.monotonic()
    torch.manual_seed(0)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()} ({num_sms} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}; us per call, % of {COPY_BANDWIDTH / 1e12} TB/s")
    print(f"{'shape':>8} {'M':>3} {'floor':>8} | {'F.linear':>22} | {'pick':>22} {'vs cuB':>6} | "
          f"{'best swept':>22} config")
    results = []
    for name in args.shapes:
        results += run_shape(name, *SHAPES[name], args.rows, num_sms, started + args.budget_s)
    totals = step_totals(results, args.rows)
    if totals:
        print(f"\nDecode-step GEMMs ({LAYERS} layers x qkv, o, gate_up, down + lm_head), us:")
        for rows, total in totals.items():
            print(f"  M={rows:>2}: floor {total['floor_us']:7.0f}  F.linear {total.get('cublas', 0):7.0f}  "
                  f"pick {total.get('pick', 0):7.0f}  best-per-shape {total.get('best', 0):7.0f}")
    tiles = tile_totals(results, args.rows, num_sms)
    if tiles:
        print("\nPer tile, step GEMM us at the best split per shape / at choose_split's split:")
        for rows, by_tile in tiles.items():
            ranked = sorted(by_tile.items(), key=lambda item: item[1]["best"] or math.inf)
            print(f"  M={rows:>2}: " + "; ".join(
                f"{label} {total['best'] or 0:.0f} / {total['rule'] or 0:.0f}" for label, total in ranked[:4]))
    wins = [rows for rows, total in totals.items()
            if "pick" in total and "cublas" in total and total["pick"] < total["cublas"]]
    print(f"\nRow counts where the pick beats F.linear over a whole step: {wins}")
    unswept = sorted({(r["shape"], r["rows"]) for r in results if not r["swept"]})
    if unswept:
        print(f"Budget spent: configs not swept for {unswept}")
    elapsed = time.monotonic() - started
    print(f"elapsed {elapsed:.0f} s")
    out = args.out or (os.path.join(os.environ["OUT"], "skinny_gemm.json") if os.environ.get("OUT")
                       else os.path.join(os.path.dirname(__file__), "results", "skinny_gemm.json"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "num_sms": num_sms,
                   "torch": torch.__version__, "triton": triton.__version__,
                   "python": platform.python_version(), "copy_bandwidth": COPY_BANDWIDTH,
                   "elapsed_s": elapsed, "results": results,
                   "step_totals_us": {str(k): v for k, v in totals.items()},
                   "tile_step_totals_us": {str(k): v for k, v in tiles.items()}}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
