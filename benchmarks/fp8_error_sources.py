"""Where the fp8 KV cache's perplexity loss comes from (issue 20), on the default model.

Each variant runs long_context.py's perplexity on a cache in the model's dtype whose written
keys and/or values are then rounded as the fp8 cache would round them (quantize, dequantize:
the exact numbers an fp8 cache's readers see), so one pass isolates one source:

  exact        no rounding (the auto cache)
  fp8          keys and values through fp8 (what --kv-cache-dtype fp8 stores)
  fp8-k        keys only
  fp8-v        values only
  fp8-sink16   both, but the first 16 positions (the attention sink) kept exact
  bf16         both through bf16 (on CPU, the size of the GPU baseline's own rounding)
  fp8-hadamard both, keys quantized in a Hadamard-rotated basis (as if the cache held H·k and
               attention used H·q: q·k is unchanged, each key's error spread over all dims)
  real-fp8     the real fp8 cache (checks that the emulation matches it)

  python benchmarks/fp8_error_sources.py --lengths 2048 --plans none            # CPU, ~2 min a row
  python3 benchmarks/fp8_error_sources.py --lengths 8192,32768 --plans none,dynamic,yarn   # GPU

Prints perplexity and its ratio to exact minus 1; writes JSON (--out).
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from long_context import PLANS, documentation_tokens, perplexity  # noqa: E402

import ropeway.models.llama as llama  # noqa: E402
from ropeway import LLM, EngineConfig, LLMEngine  # noqa: E402
from ropeway.engine import LoadedModel  # noqa: E402
from ropeway.kernels.fp8_kv import dequantize_fp8, quantize_fp8  # noqa: E402

VARIANTS = ("exact", "fp8", "fp8-k", "fp8-v", "fp8-sink16", "bf16", "fp8-hadamard", "real-fp8")


def through_fp8(x: torch.Tensor) -> torch.Tensor:
    return dequantize_fp8(*quantize_fp8(x), x.dtype)


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal n x n Hadamard matrix (Sylvester; n a power of two)."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def through_fp8_rotated(x: torch.Tensor) -> torch.Tensor:
    h = hadamard(x.shape[-1]).to(x.device, torch.float64)
    rotated = (x.double() @ h.T).to(x.dtype)
    return (through_fp8(rotated).double() @ h).to(x.dtype)


def through_bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(x.dtype)


def rounding_writer(write, variant: str):
    """rotary_write_kv, then the written slots rounded as variant says."""
    rounds_keys = variant in ("fp8", "fp8-k", "fp8-sink16", "bf16", "fp8-hadamard")
    rounds_values = variant in ("fp8", "fp8-v", "fp8-sink16", "bf16", "fp8-hadamard")
    through = through_bf16 if variant == "bf16" else through_fp8
    sink = 16 if variant == "fp8-sink16" else 0

    def write_and_round(q, k, v, k_cache, v_cache, slot_mapping, positions, *args, **kwargs):
        write(q, k, v, k_cache, v_cache, slot_mapping, positions, *args, **kwargs)
        slots = slot_mapping[(slot_mapping >= 0) & (positions >= sink)].long()
        for cache, rounds, is_key in ((k_cache, rounds_keys, True), (v_cache, rounds_values, False)):
            if rounds:
                flat = cache.view(-1, *cache.shape[2:])
                rotated = is_key and variant == "fp8-hadamard"
                flat[slots] = (through_fp8_rotated if rotated else through)(flat[slots])

    return write_and_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048")
    parser.add_argument("--plans", default="none")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--out", default="results/fp8_error_sources.json")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    lengths = [int(n) for n in args.lengths.split(",")]
    config = EngineConfig(dtype="bfloat16" if cuda else "float32", max_model_len=max(lengths) + 64,
                          kv_cache_memory_bytes=(8 << 30) if cuda else (1 << 30), max_num_batched_tokens=8192)
    exact = LLM(engine=LLMEngine(config))
    variants = args.variants.split(",")
    real = (LLM(engine=LLMEngine(replace(config, kv_cache_dtype="fp8"),
                                 loaded=LoadedModel(exact.engine.model, exact.tokenizer, 0.0)))
            if "real-fp8" in variants else None)
    ids = documentation_tokens(exact.tokenizer, max(lengths) + 1)
    write = llama.rotary_write_kv
    rows: dict = {}
    started = time.perf_counter()
    try:
        for plan in args.plans.split(","):
            for variant in variants:
                llama.rotary_write_kv = write if variant in ("exact", "real-fp8") else rounding_writer(write, variant)
                llm = real if variant == "real-fp8" else exact
                for n in lengths:
                    rows.setdefault(f"{plan}/{variant}", {})[str(n)] = perplexity(llm, ids[: n + 1], PLANS[plan],
                                                                                   args.chunk)
                    print(f"{plan}/{variant} {n}: {rows[f'{plan}/{variant}'][str(n)]:.4f}", flush=True)
    finally:
        llama.rotary_write_kv = write
    print(f"\nperplexity and ratio to exact - 1 ({exact.engine.dtype}, chunks of {args.chunk})")
    print(f"{'plan/variant':>20}" + "".join(f"{n:>10}{'':>9}" for n in lengths))
    for name, by_length in rows.items():
        base = rows[f"{name.split('/')[0]}/exact"] if f"{name.split('/')[0]}/exact" in rows else by_length
        print(f"{name:>20}" + "".join(f"{by_length[str(n)]:>10.4f}{by_length[str(n)] / base[str(n)] - 1:>+9.4f}"
                                      for n in lengths))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name() if cuda else "cpu",
                                          "dtype": str(exact.engine.dtype), "chunk": args.chunk,
                                          "seconds": time.perf_counter() - started, "perplexity": rows}, indent=1))


if __name__ == "__main__":
    main()
