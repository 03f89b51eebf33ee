"""Where the GPU time of a decode step goes, kernel by kernel (CUDA; torch.profiler over graph replays).

  python benchmarks/profile_gpu_step.py --random-llama3-8b --batches 1,64 --context 1024 --out results/gpu_step.json

For each batch size: one synthetic decode batch at `context` cached tokens is replayed
through its CUDA graph under torch.profiler; kernels are grouped by name and reported per
step (calls, mean and total microseconds), next to the step's wall time from CUDA events,
so the gap between kernel time and step time (launch gaps inside the graph) shows too.
With --gemms it also times each decode GEMM shape at M=1: cuBLAS, cuBLASLt, the Triton GEMV's
configurations.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from issue8_shapes import COPY_BYTES_PER_S, model_step, synthetic_decode_batch  # noqa: E402
from random_model import build_engine  # noqa: E402

from ropeway import EngineConfig, LLMEngine  # noqa: E402


def kernel_table(engine: LLMEngine, batch: int, context: int, replays: int = 20) -> dict:
    synthetic = synthetic_decode_batch(engine, batch, context)
    step_s = model_step(engine, synthetic, graphs=True)
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(replays):
            engine.runner.decode_graphs.run(synthetic)
        torch.cuda.synchronize()
    per_name = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            entry = per_name[event.name[:90]]
            entry[0] += 1
            entry[1] += event.device_time  # microseconds
    rows = sorted(({"kernel": name, "calls_per_step": calls / replays, "mean_us": total / calls,
                    "us_per_step": total / replays} for name, (calls, total) in per_name.items()),
                  key=lambda r: -r["us_per_step"])
    kernel_us = sum(r["us_per_step"] for r in rows)
    calls = sum(r["calls_per_step"] for r in rows)
    print(f"\nB={batch} L={context}: step {step_s * 1e3:.3f} ms, kernels {kernel_us / 1e3:.3f} ms "
          f"in {calls:.0f} launches, gaps {(step_s * 1e6 - kernel_us) / 1e3:.3f} ms")
    print(f"{'kernel':70s} {'calls':>6s} {'mean us':>8s} {'us/step':>8s}")
    for r in rows[:22]:
        print(f"{r['kernel'][:70]:70s} {r['calls_per_step']:6.0f} {r['mean_us']:8.2f} {r['us_per_step']:8.1f}")
    return {"batch": batch, "context": context, "step_ms": step_s * 1e3, "kernel_ms": kernel_us / 1e3,
            "launches": calls, "kernels": rows}


def graph_time_us(fn, calls: int = 10, replays: int = 10) -> float:
    """Microseconds per call of fn, replayed back to back inside one CUDA graph (as a step
    runs its kernels: launch gaps included, Python launch overhead not)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def gemm_table(engine: LLMEngine, context: int) -> dict:
    """Each decode GEMM shape at M=1: cuBLAS and every Triton GEMV config (gate_up with its
    SiLU fused, against cuBLAS + silu_mul), timed inside CUDA graphs; then the whole batch-1
    step with cuBLAS, the GEMV's default configs, and the best swept config per shape."""
    import ropeway.kernels as kernels
    from ropeway.kernels import triton_gemv

    layer = engine.model.layers[0]
    shapes = {"qkv": layer.qkv_weight, "o": layer.o_weight, "gate_up": layer.gate_up_weight,
              "down": layer.down_weight, "lm_head": engine.model.lm_head}
    configs = [(bn, bk, w) for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for w in (4, 8)]
    rows, picks = [], {}
    print(f"\n{'gemm':8s} {'floor':>6s} {'cublas':>7s} {'default':>8s} {'best':>7s} "
          "config   (us per call, M=1, in a graph)")
    for name, weight in shapes.items():
        fused = name == "gate_up"
        x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
        cublas_call = (lambda: kernels.silu_mul(F.linear(x, weight))) if fused else (lambda: F.linear(x, weight))
        cublas = graph_time_us(cublas_call)
        swept = {c: graph_time_us(lambda: triton_gemv.gemv_triton(x, weight, silu_mul=fused, config=c))
                 for c in configs}
        best = min(swept, key=swept.get)
        n, k = (weight.shape[0] // 2 if fused else weight.shape[0]), weight.shape[1]
        picks[(n, k, fused)] = best
        default = swept.get(triton_gemv.gemv_config(n, k, fused))
        floor = weight.numel() * weight.element_size() / COPY_BYTES_PER_S * 1e6
        rows.append({"gemm": name, "floor_us": floor, "cublas_us": cublas, "gemv_default_us": default,
                     "gemv_best_us": swept[best], "gemv_best_config": best,
                     "gemv_sweep": {str(c): t for c, t in swept.items()}})
        print(f"{name:8s} {floor:6.1f} {cublas:7.1f} {default or 0:8.1f} {swept[best]:7.1f} {best}")

    synthetic = synthetic_decode_batch(engine, 1, context)
    step = lambda: engine.model.forward(synthetic, engine.kv_cache)  # noqa: E731
    default_config = triton_gemv.gemv_config
    kernels._GEMV_DISABLED = True
    steps = {"cublas": graph_time_us(step, calls=5)}
    kernels._GEMV_DISABLED = False
    steps["gemv default"] = graph_time_us(step, calls=5)
    triton_gemv.gemv_config = lambda n, k, silu=False: picks.get((n, k, silu)) or default_config(n, k, silu)
    steps["gemv best"] = graph_time_us(step, calls=5)
    triton_gemv.gemv_config = default_config
    print("B=1 step (us): " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items()))
    return {"gemms": rows, "steps_us": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--random-llama3-8b", action="store_true")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--gemms", action="store_true")
    parser.add_argument("--kv-gib", type=float, default=20)
    parser.add_argument("--out", default="results/gpu_step.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b]
    config = EngineConfig(max_num_seqs=max(batches), enable_prefix_caching=False,
                          kv_cache_memory_bytes=int(args.kv_gib * 2**30))
    engine = build_engine(config, args.random_llama3_8b)
    engine.runner.decode_graphs.capture_up_to(max(batches))
    result = {"steps": [kernel_table(engine, b, args.context) for b in batches]}
    if args.gemms:
        result["gemms"] = gemm_table(engine, args.context)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
