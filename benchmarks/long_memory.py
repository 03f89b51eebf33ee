"""What long contexts cost in KV memory, per KV cache dtype (issue 20).

  capacity  how many tokens, and how many whole sequences of --context tokens, a fixed KV pool
            holds in each dtype; the pool is allocated on the device to confirm it fits.
  decode    one decode step of a single sequence after --context cached tokens (random cache
            contents, the same positions and shapes as serving): the whole model step under a
            CUDA graph on GPU, and attention alone over every layer, per dtype.
  sessions  long chats whose history exceeds the GPU pool: each turn's time to first token from
            the pool, the host tier or a cold prefill (long_memory_sessions.py; its own flags).

  python benchmarks/long_memory.py capacity --shape default --context 4096 --pool-gib 0.25   # CPU, tiny
  python benchmarks/long_memory.py decode --shape default --context 2048                    # CPU, tiny
  python benchmarks/long_memory.py capacity --shape llama3-8b --context 131072 --pool-gib 96  # H200
  python benchmarks/long_memory.py decode --shape llama3-8b --context 131072                # H200

--shape llama3-8b is the random-weight Llama-3-8B of benchmarks/random_model.py; default is the
built-in SmolLM2-135M. Prints a table and writes JSON (--json).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from random_model import LLAMA3_8B, load_random_model  # noqa: E402

from ropeway.arith import cdiv  # noqa: E402
from ropeway.engine.kv_pool import KVPoolShape, allocate_kv_cache, kv_bytes_per_block  # noqa: E402
from ropeway.kernels import paged_attention  # noqa: E402
from ropeway.kernels.fp8_kv import FP8, cache_views, quantize_fp8  # noqa: E402
from ropeway.models import ForwardBatch, LlamaModel, load_model_files, rope_parameters  # noqa: E402
from ropeway.scheduler import RopePlanner, RopeScaling  # noqa: E402

BLOCK_SIZE = 16


def kv_dtypes(names: str, model_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """--kv-cache-dtypes as {label: what the pool stores}: auto is the model's dtype."""
    labels = {"auto": str(model_dtype).removeprefix("torch."), "fp8": "fp8_e4m3"}
    return {labels[name]: model_dtype if name == "auto" else FP8 for name in names.split(",")}


def load(shape: str, device: torch.device) -> LlamaModel:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if shape == "llama3-8b":
        return load_random_model(LLAMA3_8B, dtype, device).model
    config, weights, _ = load_model_files(None, dtype)
    return LlamaModel(config, weights, device)


def capacity(args, device: torch.device) -> dict:
    model = load(args.shape, device)
    cfg = model.config
    budget = int(args.pool_gib * 2**30)
    rows = {}
    for label, kv_dtype in kv_dtypes(args.kv_cache_dtypes, model.dtype).items():
        bytes_per_block = kv_bytes_per_block(cfg.num_layers, model.num_local_kv_heads, cfg.head_dim, kv_dtype,
                                             BLOCK_SIZE)
        pool = KVPoolShape(budget // bytes_per_block, BLOCK_SIZE, bytes_per_block)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        cache = allocate_kv_cache(model, pool, kv_dtype, device)
        allocated = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else cache.nbytes
        del cache
        rows[label] = {"pool_bytes": allocated, "bytes_per_token": bytes_per_block / BLOCK_SIZE,
                       "tokens": pool.num_tokens, "sequences": pool.num_blocks // cdiv(args.context, BLOCK_SIZE)}
    first = next(iter(rows.values()))
    for row in rows.values():
        row["tokens_vs_first"] = row["tokens"] / first["tokens"]
    print(f"\ncapacity: {args.pool_gib} GiB pool, {cfg.name}, sequences of {args.context} tokens")
    print(f"{'kv dtype':>10}{'pool GiB':>10}{'B/token':>10}{'tokens':>12}{'sequences':>11}{'x tokens':>10}")
    for label, row in rows.items():
        print(f"{label:>10}{row['pool_bytes'] / 2**30:>10.2f}{row['bytes_per_token']:>10.0f}{row['tokens']:>12}"
              f"{row['sequences']:>11}{row['tokens_vs_first']:>10.2f}")
    return rows


def fill_randomly(model: LlamaModel, kv_cache: torch.Tensor, generator: torch.Generator) -> None:
    """Keys and values of the magnitude a model's are, layer by layer (one layer's fp32 at a time)."""
    for layer in range(model.config.num_layers):
        for kind in (0, 1):
            values, scales = cache_views(kv_cache[layer, kind], model.num_local_kv_heads, model.config.head_dim)
            random = torch.randn(values.shape, generator=generator, device=values.device)
            if scales is None:
                values.copy_(random)
            else:
                values[:], scales[:] = quantize_fp8(random)


def decode_batch(model: LlamaModel, context: int, device: torch.device) -> ForwardBatch:
    """One sequence's next token after context cached tokens, its blocks in order."""
    cfg = model.config
    planner = RopePlanner(cfg.rope_theta, cfg.head_dim, cfg.max_position_embeddings,
                          RopeScaling.from_dict(cfg.rope_scaling or None))
    plan = planner.plan(context + 1)
    inv_freq, factor = rope_parameters(plan)
    num_blocks = cdiv(context + 1, BLOCK_SIZE)
    table_width = cdiv(num_blocks, 16) * 16  # as the runner pads block tables
    table = torch.zeros(1, table_width, dtype=torch.int32, device=device)
    table[0, :num_blocks] = torch.arange(num_blocks, dtype=torch.int32, device=device)
    position = torch.tensor([context], device=device)
    return ForwardBatch(
        input_ids=torch.tensor([7], device=device), positions=position,
        seq_index=torch.zeros(1, dtype=torch.int32, device=device), slot_mapping=position.clone(),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([context + 1], dtype=torch.int32, device=device), block_tables=table,
        inv_freq=inv_freq.to(device)[None], attention_factor=torch.tensor([factor], device=device),
        logits_indices=torch.zeros(1, dtype=torch.int64, device=device), max_query_len=1, max_seq_len=context + 1)


def median_ms(run, device: torch.device, repeats: int) -> float:
    """Median wall time of run() in ms, the device synchronized around each call."""
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times[2:])  # the first runs compile and warm up


def as_graph(run, device: torch.device):
    """run captured in a CUDA graph (what serving replays for decode steps); run itself on CPU."""
    if device.type != "cuda":
        return run
    run()  # compile outside the capture
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


@torch.inference_mode()
def decode(args, device: torch.device) -> dict:
    model = load(args.shape, device)
    cfg = model.config
    batch = decode_batch(model, args.context, device)
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, model.num_local_heads, cfg.head_dim, generator=generator, device=device).to(model.dtype)
    rows = {label: time_decode(model, batch, q, kv_dtype, args.context, args.repeats, generator)
            for label, kv_dtype in kv_dtypes(args.kv_cache_dtypes, model.dtype).items()}
    first = next(iter(rows.values()))
    for row in rows.values():
        row["step_speedup"] = first["step_ms"] / row["step_ms"]
        row["attention_speedup"] = first["attention_ms"] / row["attention_ms"]
    print(f"\ndecode: batch 1 after {args.context} cached tokens, {cfg.name}, {device_name(device)}")
    print(f"{'kv dtype':>10}{'step ms':>10}{'x step':>8}{'attn ms':>10}{'x attn':>8}{'KV GiB':>8}{'KV TB/s':>9}")
    for label, row in rows.items():
        print(f"{label:>10}{row['step_ms']:>10.3f}{row['step_speedup']:>8.2f}{row['attention_ms']:>10.3f}"
              f"{row['attention_speedup']:>8.2f}{row['kv_bytes'] / 2**30:>8.2f}{row['kv_read_tb_per_s']:>9.2f}")
    return rows


def time_decode(model: LlamaModel, batch: ForwardBatch, q: torch.Tensor, kv_dtype: torch.dtype, context: int,
                repeats: int, generator: torch.Generator) -> dict:
    """The step and attention-only times on a pool of kv_dtype that holds just the sequence."""
    cfg, device = model.config, q.device
    bytes_per_block = kv_bytes_per_block(cfg.num_layers, model.num_local_kv_heads, cfg.head_dim, kv_dtype,
                                         BLOCK_SIZE)
    pool = KVPoolShape(cdiv(context + 1, BLOCK_SIZE), BLOCK_SIZE, bytes_per_block)
    kv_cache = allocate_kv_cache(model, pool, kv_dtype, device)
    fill_randomly(model, kv_cache, generator)
    layers = [(*cache_views(kv_cache[i, 0], model.num_local_kv_heads, cfg.head_dim),
               *cache_views(kv_cache[i, 1], model.num_local_kv_heads, cfg.head_dim)) for i in range(cfg.num_layers)]

    def attention_only():
        for k_cache, k_scale, v_cache, v_scale in layers:
            paged_attention(q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
                            model.scale, 1, context + 1, k_scale=k_scale, v_scale=v_scale)

    step = median_ms(as_graph(lambda: model.forward(batch, kv_cache), device), device, repeats)
    attention = median_ms(as_graph(attention_only, device), device, repeats)
    return {"step_ms": step, "attention_ms": attention, "kv_bytes": pool.num_bytes,
            "kv_read_tb_per_s": pool.num_bytes / (attention * 1e-3) / 1e12}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def main() -> None:
    if sys.argv[1:2] == ["sessions"]:
        from long_memory_sessions import main as sessions

        sessions(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--shape", choices=["llama3-8b", "default"], default="llama3-8b")
    common.add_argument("--context", type=int, default=131072, help="tokens per sequence (default: 128k)")
    common.add_argument("--kv-cache-dtypes", default="auto,fp8", help="compared in this order (default: auto,fp8)")
    common.add_argument("--json", default=None, help="write the results here")
    subcommand = commands.add_parser("capacity", parents=[common], help="tokens and sequences a fixed pool holds")
    subcommand.add_argument("--pool-gib", type=float, default=96.0)
    subcommand = commands.add_parser("decode", parents=[common], help="a batch-1 decode step at --context")
    subcommand.add_argument("--repeats", type=int, default=20)
    commands.add_parser("sessions", help="time to first token per KV tier (see long_memory_sessions.py --help)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = {"capacity": capacity, "decode": decode}[args.command](args, device)
    if args.json:
        meta = {"command": " ".join(sys.argv), "device": device_name(device), "shape": args.shape,
                "context": args.context}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, args.command: rows}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
