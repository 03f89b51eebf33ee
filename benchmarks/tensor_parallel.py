"""Decode step time of a Llama-3-8B- or 70B-shaped model (random bf16 weights) at tensor-parallel
size N, one process per GPU (issue 21):

  torchrun --nproc-per-node 8 benchmarks/tensor_parallel.py --shape llama3-70b
  torchrun --nproc-per-node 2 benchmarks/tensor_parallel.py --shape llama3-8b
  python benchmarks/tensor_parallel.py --tiny     # CPU, world size 1: a check that the script runs

Each rank builds its shard of the model (every weight generated on its GPU, sliced, the rest
dropped), a paged KV cache of its local KV heads holding random values, and one synthetic
decode batch per batch size: B sequences of `--context` cached tokens, one new token each. On
CUDA the step is the engine's decode CUDA graph (engine/cuda_graphs.py, the all-reduces and
the logits all-gather captured in it), replayed by every rank in lockstep and timed with CUDA
events; --eager times model.forward instead, as the CPU always does. Reported: the slowest
rank's median step, tokens per second, and the step's floor, this rank's weights (embedding
table aside) and KV read once at the H200's 4.25 TB/s device copy. The graph's logits are also
checked against the eager forward on the same batch.

Writes benchmarks/results/tensor_parallel_<shape>_tp<N>[_eager].{json,md} (or --out .json).
"""

import argparse
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_model import LLAMA3_8B, LLAMA3_70B, RandomWeights  # noqa: E402

from ropeway.arith import cdiv  # noqa: E402
from ropeway.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from ropeway.models import ForwardBatch, LlamaModel, ModelConfig, TensorParallel  # noqa: E402

TINY = ModelConfig(
    architecture="llama", vocab_size=510, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
    head_dim=16, intermediate_size=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192, tie_word_embeddings=False, name="tiny-random-llama",
)
SHAPES = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B, "tiny": TINY}
COPY_BYTES_PER_S = 4.25e12  # H200 device copy, ENVIRONMENT.md
BLOCK_SIZE = 16
RESULTS = Path(__file__).resolve().parent / "results"


def join_group() -> tuple[TensorParallel, torch.device]:
    """Under torchrun: this process's rank (NCCL on GPUs, gloo on CPU). Run plainly: world size 1."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return TensorParallel(), torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return TensorParallel.from_process_group(), device


def decode_batch(model: LlamaModel, kv_cache: torch.Tensor, batch: int, context: int) -> ForwardBatch:
    """B sequences of `context` cached tokens on their own pages, one new token each."""
    device = model.device
    blocks_per_seq = cdiv(context, BLOCK_SIZE)
    tables = torch.arange(batch * blocks_per_seq, dtype=torch.int32, device=device).view(batch, blocks_per_seq)
    slots = tables[:, -1].to(torch.int64) * BLOCK_SIZE + (context - 1) % BLOCK_SIZE
    cfg = model.config
    # The model's own RoPE (no scaling): the step's cost does not depend on the angles.
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim)
    index = torch.arange(batch + 1, device=device)
    # The same token ids on every rank: the ranks run one batch.
    ids = torch.randint(0, cfg.vocab_size, (batch,), generator=torch.Generator().manual_seed(batch)).to(device)
    return ForwardBatch(
        input_ids=ids, positions=torch.full((batch,), context - 1, dtype=torch.int64, device=device),
        seq_index=index[:batch].to(torch.int32), slot_mapping=slots, query_start_loc=index.to(torch.int32),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device), block_tables=tables,
        inv_freq=inv_freq.to(device).expand(batch, -1).contiguous(),
        attention_factor=torch.ones(batch, dtype=torch.float32, device=device),
        logits_indices=index[:batch], max_query_len=1, max_seq_len=context)


def median_step_s(step, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def slowest_rank(tp: TensorParallel, seconds: float, device: torch.device) -> float:
    if tp.world_size == 1:
        return seconds
    value = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=tp.group)
    return value.item()


def weight_bytes_read_per_step(model: LlamaModel) -> int:
    """This rank's weights that every decode step reads (the embedding table: one row each)."""
    tensors = {id(t): t for t in [model.norm, model.lm_head]}
    for layer in model.layers:
        tensors.update({id(t): t for t in vars(layer).values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="llama3-70b")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer shape, to check the script on CPU")
    parser.add_argument("--batches", default="1,64", help="decode batch sizes (comma-separated)")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens of every sequence")
    parser.add_argument("--eager", action="store_true", help="time model.forward, not the CUDA graph")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, help="JSON path (a .md table is written next to it)")
    args = parser.parse_args()

    tp, device = join_group()
    shape = "tiny" if args.tiny else args.shape
    config = SHAPES[shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    graphs = device.type == "cuda" and not args.eager
    batches = [int(b) for b in args.batches.split(",")]
    loaded = time.perf_counter()
    model = LlamaModel(config, RandomWeights(config, dtype, device), device, tp)
    load_s = time.perf_counter() - loaded
    num_blocks = max(batches) * cdiv(args.context, BLOCK_SIZE)
    kv_cache = torch.empty(config.num_layers, 2, num_blocks, BLOCK_SIZE, model.num_local_kv_heads, config.head_dim,
                           dtype=dtype, device=device).normal_()
    decode_graphs = (DecodeGraphs(model, kv_cache, BLOCK_SIZE, torch.zeros(num_blocks, BLOCK_SIZE, device=device))
                     if graphs else None)
    weight_bytes = weight_bytes_read_per_step(model)
    kv_bytes_per_token = model.kv_elements_per_token * kv_cache.element_size()
    rows = []
    for batch in batches:
        inputs = decode_batch(model, kv_cache, batch, args.context)
        graph_vs_eager = None
        if graphs:
            # The KV write of the step is idempotent: both passes see the same cache.
            graph_logits = decode_graphs.run(inputs).clone()
            graph_vs_eager = (graph_logits - model.forward(inputs, kv_cache)).abs().max().item()
        step = partial(decode_graphs.run, inputs) if graphs else partial(model.forward, inputs, kv_cache)
        rank_s = median_step_s(step, device, args.repeats)
        step_s = slowest_rank(tp, rank_s, device)
        # The floor is the H200's: on a CPU it stays empty.
        floor_s = ((weight_bytes + batch * args.context * kv_bytes_per_token) / COPY_BYTES_PER_S
                   if device.type == "cuda" else None)
        rows.append({"batch": batch, "context": args.context, "step_ms": step_s * 1e3, "rank0_step_ms": rank_s * 1e3,
                     "tok_s": batch / step_s, "floor_ms": floor_s and floor_s * 1e3,
                     "x_floor": floor_s and step_s / floor_s, "graph_vs_eager_max_abs_logit_diff": graph_vs_eager})
    if tp.rank == 0:
        report(args, tp, device, shape, config, model, graphs, load_s, weight_bytes, rows)
    if dist.is_initialized():
        dist.destroy_process_group()


def report(args, tp: TensorParallel, device: torch.device, shape: str, config: ModelConfig, model: LlamaModel,
           graphs: bool, load_s: float, weight_bytes: int, rows: list[dict]) -> None:
    mode = "CUDA graph" if graphs else "eager"
    title = (f"{config.name} at TP={tp.world_size} ({model.num_local_heads} query / {model.num_local_kv_heads} KV "
             f"heads per rank), {mode}, {device.type}")
    lines = [f"# {title}", "", "| batch | context | step ms (slowest rank) | tok/s | floor ms | x floor |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        floor = "- | -" if r["floor_ms"] is None else f"{r['floor_ms']:.3f} | {r['x_floor']:.2f}"
        lines.append(f"| {r['batch']} | {r['context']} | {r['step_ms']:.3f} | {r['tok_s']:.1f} | {floor} |")
    table = "\n".join(lines) + "\n"
    print(table, flush=True)
    out = args.out or RESULTS / f"tensor_parallel_{shape}_tp{tp.world_size}{'' if graphs else '_eager'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.write_text(json.dumps({
        "model": config.name, "tensor_parallel_size": tp.world_size, "mode": mode, "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "host": platform.node(),
        "torch": torch.__version__, "weights_load_s_rank0": load_s, "weight_bytes_per_rank": weight_bytes,
        "local_heads": model.num_local_heads, "local_kv_heads": model.num_local_kv_heads, "rows": rows,
    }, indent=2))
    print(f"wrote {out} and {out.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    main()
