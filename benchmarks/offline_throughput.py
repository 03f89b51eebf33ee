"""Offline prefill and decode throughput of the engine at several batch sizes.

  python benchmarks/offline_throughput.py                         # CPU, the built-in default model
  python benchmarks/offline_throughput.py --random-llama3-8b      # GPU, Llama-3-8B shape, random bf16

Prefill: B prompts of P tokens, one output token each, timed over the whole run.
Decode: B short prompts, N output tokens each; only the pure decode steps are timed.
Prints a table and writes JSON.

  python benchmarks/offline_throughput.py --random-llama3-8b --batch-sizes "" --kv-gib 40 --issue8
runs the serving-speed issue's shapes instead, each against its floor (issue8_shapes.py).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from issue8_shapes import run_issue_shapes  # noqa: E402
from random_model import build_engine  # noqa: E402

from ropeway import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_requests(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams):
    """Run to completion; return (seconds of all steps, seconds of pure-decode steps, decode tokens)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params)
    total = decode_time = 0.0
    decode_tokens = 0
    sync(engine.device)
    while engine.has_unfinished_requests():
        plan_probe = engine.scheduler
        # No device sync per step (asynchronous scheduling overlaps a step with the next;
        # each step reads the previous one's tokens, so step times add up to wall time).
        started = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - started
        total += elapsed
        last = plan_probe.last_plan
        if last is not None and all(item.num_new_tokens == 1 for item in last.scheduled):
            decode_time += elapsed
            decode_tokens += len(last.scheduled)
    return total, decode_time, decode_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: the built-in model)")
    parser.add_argument("--random-llama3-8b", action="store_true", help="Llama-3-8B shape with random weights")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--kv-gib", type=float, default=None, help="KV pool size in GiB")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--issue8", action="store_true",
                        help="the serving-speed issue's shapes against their floors (CUDA)")
    parser.add_argument("--out", default="results/offline_throughput.json")
    args = parser.parse_args()

    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    config = EngineConfig(
        model=args.model, dtype=args.dtype, max_num_seqs=max(batch_sizes + [64 if args.issue8 else 1]),
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory_bytes=int(args.kv_gib * 2**30) if args.kv_gib else None,
        enable_prefix_caching=False,  # every prompt is computed, never served from the cache
    )
    engine = build_engine(config, args.random_llama3_8b)
    vocab = min(engine.model_config.vocab_size, engine.tokenizer.vocab_size or engine.model_config.vocab_size)
    generator = torch.Generator().manual_seed(0)

    def prompts(batch: int, length: int) -> list[list[int]]:
        return torch.randint(0, vocab, (batch, length), generator=generator).tolist()

    # Warm-up (allocator, kernels' first launches).
    run_requests(engine, prompts(2, 32), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False))

    rows = []
    for batch in tqdm(batch_sizes, desc="batch sizes"):
        # Captures this batch size's decode graph outside the timed steps.
        warm_up = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, detokenize=False)
        run_requests(engine, prompts(batch, 16), warm_up)
        prefill_s, _, _ = run_requests(engine, prompts(batch, args.prompt_len),
                                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False))
        _, decode_s, decode_tokens = run_requests(
            engine, prompts(batch, 16),
            SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, detokenize=False))
        rows.append({
            "batch": batch,
            "prefill_tokens": batch * args.prompt_len,
            "prefill_s": prefill_s,
            "prefill_tok_s": batch * args.prompt_len / prefill_s,
            "decode_tokens": decode_tokens,
            "decode_s": decode_s,
            "decode_tok_s": decode_tokens / decode_s if decode_s else float("nan"),
            "decode_ms_per_step": 1000 * decode_s / max(1, decode_tokens // batch),
        })

    on_cuda = engine.device.type == "cuda"
    device_name = torch.cuda.get_device_name(engine.device) if on_cuda else platform.processor() or "cpu"
    meta = {"model": engine.model_config.name, "device": str(engine.device), "device_name": device_name,
            "dtype": str(engine.dtype), "prompt_len": args.prompt_len, "output_len": args.output_len,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
    print(f"\n{meta['model']} on {device_name} ({meta['dtype']}), prompt {args.prompt_len}, output {args.output_len}")
    print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/decode step':>15}")
    for r in rows:
        print(f"{r['batch']:>5} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} "
              f"{r['decode_ms_per_step']:>15.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    issue_rows = run_issue_shapes(engine, vocab) if args.issue8 else []
    out.write_text(json.dumps({"meta": meta, "rows": rows, "issue8": issue_rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
