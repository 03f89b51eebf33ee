"""Kernel benchmark on the GPU machine: each row against its bound and its peer.

Shapes follow a Llama-3-8B-like layer: GQA 32 query / 8 KV heads, head dim 128, bf16, KV
pages of 16 tokens with shuffled block tables. Bounds are bytes over the measured copy
bandwidth (4.25 TB/s, read plus write) or FLOPs over SDPA's own rate; peers are torch SDPA
on contiguous KV for attention and the torch reference ops for the rest.

    python benchmarks/kernels.py [--out results/kernels.json] [--sweep]

--sweep also times alternative attention tile configurations (for tuning choose_config)
and the fused decode kernels' launch parameters.

The fused decode-step kernels (rotary + KV write, SiLU·up) are timed at decode batch sizes
inside a CUDA graph, as the engine runs them (outside one, launch overhead is all one
measures); their peer is what they replace.
"""

import argparse
import json
import math
import os
import platform
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ropeway.kernels import (apply_rotary, paged_attention, rerotate_keys,  # noqa: E402
                             rotary_write_kv, silu_mul, write_kv)
from ropeway.kernels.kv_cache import write_kv_reference  # noqa: E402
from ropeway.kernels.rerotate import rerotate_keys_reference  # noqa: E402
from ropeway.kernels.rotary import apply_rotary_reference  # noqa: E402
from ropeway.kernels.silu_mul import silu_mul_reference  # noqa: E402
from ropeway.kernels.triton_rotary import apply_rotary_triton  # noqa: E402
from ropeway.kernels.triton_rotary_write_kv import rotary_write_kv_triton  # noqa: E402
from ropeway.kernels.triton_silu_mul import silu_mul_triton  # noqa: E402
from ropeway.kernels.triton_attention import (AttentionConfig, choose_config,  # noqa: E402
                                              paged_attention_triton)

COPY_BANDWIDTH = 4.25e12
Q_HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 128, 16
INTERMEDIATE = 14336
DTYPE = torch.bfloat16


def median_seconds(fn):
    return do_bench(fn, warmup=50, rep=300, return_mode="median") * 1e-3


def graph_seconds(fn):
    """Median time of fn replayed in a CUDA graph: GPU time without launch overhead."""
    return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e-3


def shuffled_cache(num_seqs, seq_len):
    """Paged K/V for num_seqs sequences of seq_len tokens in shuffled pages, and the same
    keys and values laid out contiguously [B, Hkv, L, D] for the peer."""
    pages_per_seq = math.ceil(seq_len / PAGE)
    num_pages = num_seqs * pages_per_seq
    k_cache = torch.randn(num_pages, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_pages, device="cuda").to(torch.int32).view(num_seqs, -1)
    k = k_cache[block_tables.long()].reshape(num_seqs, -1, KV_HEADS, HEAD_DIM)[:, :seq_len]
    v = v_cache[block_tables.long()].reshape(num_seqs, -1, KV_HEADS, HEAD_DIM)[:, :seq_len]
    return k_cache, v_cache, block_tables, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


def decode_row(num_seqs, seq_len, target, sweep_configs):
    k_cache, v_cache, block_tables, k, v = shuffled_cache(num_seqs, seq_len)
    q = torch.randn(num_seqs, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    seq_lens = torch.full((num_seqs,), seq_len, device="cuda", dtype=torch.int32)
    query_start_loc = torch.arange(num_seqs + 1, device="cuda", dtype=torch.int32)
    scale = HEAD_DIM ** -0.5
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    ours = median_seconds(lambda: paged_attention(*args, max_query_len=1, max_seq_len=seq_len))
    q4 = q.view(num_seqs, Q_HEADS, 1, HEAD_DIM)
    peer = median_seconds(lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True))
    kv_bytes = 2 * k.numel() * k.element_size()
    config = choose_config(q, KV_HEADS, num_seqs, 1, seq_len)
    row = {
        "row": f"decode B={num_seqs} L={seq_len // 1024}k", "time_us": ours * 1e6,
        "rate": kv_bytes / ours / 1e12, "unit": "TB/s KV read",
        "bound_us": kv_bytes / COPY_BANDWIDTH * 1e6, "peer": "SDPA contiguous",
        "peer_us": peer * 1e6, "vs_peer": ours / peer, "config": config.__dict__,
    }
    row.update(target(row))
    if sweep_configs:
        row["sweep"] = []
        for cfg in sweep_configs(config):
            t = median_seconds(lambda: paged_attention_triton(*args, 1, seq_len, config=cfg))
            row["sweep"].append({"config": cfg.__dict__, "time_us": t * 1e6})
    return row


def prefill_row(seq_len, target, sweep_configs):
    k_cache, v_cache, block_tables, k, v = shuffled_cache(1, seq_len)
    q = torch.randn(seq_len, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    seq_lens = torch.tensor([seq_len], device="cuda", dtype=torch.int32)
    query_start_loc = torch.tensor([0, seq_len], device="cuda", dtype=torch.int32)
    scale = HEAD_DIM ** -0.5
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    ours = median_seconds(lambda: paged_attention(*args, max_query_len=seq_len, max_seq_len=seq_len))
    # KV expanded to the query heads so SDPA takes its flash kernel.
    q4 = q.transpose(0, 1).unsqueeze(0)
    k4 = k.repeat_interleave(Q_HEADS // KV_HEADS, dim=1)
    v4 = v.repeat_interleave(Q_HEADS // KV_HEADS, dim=1)
    peer = median_seconds(lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale))
    flops = 4 * Q_HEADS * HEAD_DIM * seq_len * (seq_len + 1) / 2
    row = {
        "row": f"prefill L={seq_len // 1024}k", "time_us": ours * 1e6,
        "rate": flops / ours / 1e12, "unit": "TFLOP/s",
        "bound_us": None, "peer": "SDPA causal contiguous", "peer_us": peer * 1e6,
        "peer_rate": flops / peer / 1e12, "vs_peer": ours / peer,
        "config": choose_config(q, KV_HEADS, 1, seq_len, seq_len).__dict__,
    }
    row.update(target(row))
    if sweep_configs:
        row["sweep"] = []
        for cfg in sweep_configs(None):
            t = median_seconds(lambda: paged_attention_triton(*args, seq_len, seq_len, config=cfg))
            row["sweep"].append({"config": cfg.__dict__, "time_us": t * 1e6,
                                 "rate": flops / t / 1e12})
    return row


def bandwidth_row(name, nbytes, ours_fn, peer_fn, peer_name):
    ours = median_seconds(ours_fn)
    peer = median_seconds(peer_fn)
    rate = nbytes / ours
    return {
        "row": name, "time_us": ours * 1e6, "rate": rate / 1e12, "unit": "TB/s",
        "bound_us": nbytes / COPY_BANDWIDTH * 1e6, "peer": peer_name, "peer_us": peer * 1e6,
        "vs_peer": ours / peer, "target": ">= 80% of copy bandwidth",
        "met": rate >= 0.8 * COPY_BANDWIDTH,
        "gap": f"{rate / COPY_BANDWIDTH:.0%} of copy bandwidth",
    }


def rotary_row(sweep):
    tokens = 32768
    q = torch.randn(tokens, Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    positions = torch.randint(0, 131072, (tokens,), device="cuda")
    seq_index = torch.randint(0, 8, (tokens,), device="cuda", dtype=torch.int32)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM)
    inv_freq = inv_freq.expand(8, -1).contiguous()
    # Factor 1 so that repeated in-place rotation keeps the values' scale.
    factors = torch.ones(8, device="cuda")
    args = (q, k, positions, seq_index, inv_freq, factors)
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
    row = bandwidth_row(f"rotary T={tokens}", nbytes, lambda: apply_rotary(*args),
                        lambda: apply_rotary_reference(*args), "torch reference")
    if sweep:
        row["sweep"] = [{"num_warps": warps, "time_us": 1e6 * median_seconds(
            lambda: apply_rotary_triton(*args, num_warps=warps))} for warps in (2, 4, 8, 16)]
    return row


def write_kv_row():
    tokens = 32768
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    num_pages = 4 * tokens // PAGE
    k_cache = torch.empty(num_pages, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.empty_like(k_cache)
    slot_mapping = torch.randperm(num_pages * PAGE, device="cuda")[:tokens]
    args = (k, v, k_cache, v_cache, slot_mapping)
    nbytes = 2 * 2 * k.numel() * k.element_size()
    return bandwidth_row(f"KV write T={tokens}", nbytes, lambda: write_kv(*args),
                         lambda: write_kv_reference(*args), "torch reference")


def rerotate_row():
    layers, num_pages, slots_count = 32, 2048, 8192
    k_cache = torch.randn(layers, num_pages, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    slots = torch.randperm(num_pages * PAGE, device="cuda")[:slots_count]
    old_positions = torch.randint(4096, 131072, (slots_count,), device="cuda")
    new_positions = old_positions - 4096
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM)
    rows = torch.zeros(slots_count, dtype=torch.int64, device="cuda")  # one plan: the engine's moves name its row
    args = (k_cache, slots, old_positions, new_positions, rows, rows, inv_freq[None], torch.ones(1, device="cuda"))
    nbytes = 2 * layers * slots_count * KV_HEADS * HEAD_DIM * k_cache.element_size()
    return bandwidth_row(f"re-rotate {layers} layers x {slots_count} slots", nbytes,
                         lambda: rerotate_keys(*args), lambda: rerotate_keys_reference(*args),
                         "torch reference")


def fused_decode_row(name, nbytes, ours_fn, peer_fn, peer_name):
    ours = graph_seconds(ours_fn)
    peer = graph_seconds(peer_fn)
    return {
        "row": name, "time_us": ours * 1e6, "rate": nbytes / ours / 1e12, "unit": "TB/s",
        "bound_us": nbytes / COPY_BANDWIDTH * 1e6, "peer": peer_name, "peer_us": peer * 1e6,
        "vs_peer": ours / peer, "target": f"faster than {peer_name}", "met": ours < peer,
        "gap": f"{ours / peer:.2f}x {peer_name}",
    }


def rotary_write_kv_row(tokens, sweep):
    """One decode step's RoPE + KV write for one layer, q/k/v as views of the fused qkv."""
    q_size, kv_size = Q_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    qkv = torch.randn(tokens, q_size + 2 * kv_size, device="cuda", dtype=DTYPE)
    q = qkv[:, :q_size].view(tokens, Q_HEADS, HEAD_DIM)
    k = qkv[:, q_size:q_size + kv_size].view(tokens, KV_HEADS, HEAD_DIM)
    v = qkv[:, q_size + kv_size:].view(tokens, KV_HEADS, HEAD_DIM)
    num_pages = 4 * max(tokens, 64) // PAGE
    k_cache = torch.empty(num_pages, PAGE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.empty_like(k_cache)
    slot_mapping = torch.randperm(num_pages * PAGE, device="cuda")[:tokens]
    positions = torch.randint(0, 131072, (tokens,), device="cuda")
    seq_index = torch.arange(tokens, device="cuda", dtype=torch.int32)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda") / HEAD_DIM)
    inv_freq = inv_freq.expand(tokens, -1).contiguous()
    factors = torch.ones(tokens, device="cuda")   # repeated in-place rotation keeps the scale
    rope = (positions, seq_index, inv_freq, factors)
    args = (q, k, v, k_cache, v_cache, slot_mapping, *rope)
    # q, k read and written in place, k and v written to the cache, v read.
    nbytes = (2 * q.numel() + 3 * k.numel() + 2 * v.numel()) * q.element_size()

    def pair():
        apply_rotary(q, k, *rope)
        write_kv(k, v, k_cache, v_cache, slot_mapping)

    row = fused_decode_row(f"rotary + KV write T={tokens}", nbytes, lambda: rotary_write_kv(*args),
                           pair, "rotary, write_kv")
    if sweep:
        row["sweep"] = [{"num_warps": warps, "time_us": 1e6 * graph_seconds(
            lambda warps=warps: rotary_write_kv_triton(*args, num_warps=warps))}
            for warps in (1, 2, 4, 8)]
    return row


def silu_mul_row(tokens, sweep):
    gate_up = torch.randn(tokens, 2 * INTERMEDIATE, device="cuda", dtype=DTYPE)
    nbytes = 3 * tokens * INTERMEDIATE * gate_up.element_size()
    row = fused_decode_row(f"silu*up T={tokens} I={INTERMEDIATE}", nbytes,
                           lambda: silu_mul(gate_up), lambda: silu_mul_reference(gate_up),
                           "torch silu(gate) * up")
    if sweep:
        row["sweep"] = [{"block": block, "num_warps": warps, "time_us": 1e6 * graph_seconds(
            lambda block=block, warps=warps: silu_mul_triton(gate_up, block=block, num_warps=warps))}
            for block in (512, 1024, 2048, 4096) for warps in (2, 4, 8)]
    return row


def within_peer(limit):
    def target(row):
        return {"target": f"<= {limit}x SDPA", "met": row["vs_peer"] <= limit,
                "gap": f"{row['vs_peer']:.2f}x SDPA"}
    return target


def at_least_rate(minimum):
    def target(row):
        return {"target": f">= {minimum} TB/s", "met": row["rate"] >= minimum,
                "gap": f"{row['rate'] / minimum:.0%} of target"}
    return target


def share_of_peer_rate(share):
    def target(row):
        ratio = row["rate"] / row["peer_rate"]
        return {"target": f">= {share:.0%} of SDPA TFLOP/s", "met": ratio >= share,
                "gap": f"{ratio:.0%} of SDPA"}
    return target


def decode_sweep(default):
    tiles = [AttentionConfig(16, block_n, default.num_splits, 4, 2) for block_n in (32, 64, 128)]
    splits = [AttentionConfig(16, default.block_n, n, default.num_warps, default.num_stages)
              for n in (default.num_splits // 2, default.num_splits * 2) if n >= 1]
    return tiles + splits


def prefill_sweep(_):
    return [AttentionConfig(block_m, block_n, 1, warps, stages)
            for block_m, block_n, warps, stages in (
                (128, 128, 8, 3), (256, 64, 8, 3), (256, 64, 8, 4), (256, 32, 8, 3),
                (256, 32, 8, 4), (256, 64, 16, 3), (256, 128, 16, 3))]


def print_table(rows):
    header = (f"{'row':34} {'time us':>10} {'rate':>8} {'unit':14} {'bound us':>9} {'peer us':>9} {'vs peer':>8}"
              "  target (met)")
    print(header)
    print("-" * len(header))
    for r in rows:
        bound = f"{r['bound_us']:9.1f}" if r["bound_us"] is not None else f"{'-':>9}"
        print(f"{r['row']:34} {r['time_us']:10.1f} {r['rate']:8.2f} {r['unit']:14} {bound} "
              f"{r['peer_us']:9.1f} {r['vs_peer']:7.2f}x  {r['target']} "
              f"({'yes' if r['met'] else 'NO: ' + r['gap']})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/kernels.json")
    parser.add_argument("--sweep", action="store_true")
    options = parser.parse_args()
    torch.manual_seed(0)
    sweep_decode = decode_sweep if options.sweep else None
    sweep_prefill = prefill_sweep if options.sweep else None
    rows = [
        decode_row(8, 32768, within_peer(1.1), sweep_decode),
        decode_row(16, 65536, within_peer(1.1), sweep_decode),
        decode_row(1, 131072, at_least_rate(3.5), sweep_decode),
        prefill_row(8192, share_of_peer_rate(0.75), sweep_prefill),
        prefill_row(32768, share_of_peer_rate(0.75), sweep_prefill),
        rotary_row(options.sweep),
        write_kv_row(),
        rerotate_row(),
        *[rotary_write_kv_row(tokens, options.sweep) for tokens in (1, 64, 256)],
        *[silu_mul_row(tokens, options.sweep) for tokens in (1, 64, 256)],
    ]
    print_table(rows)
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(),
        "copy_bandwidth_tb_s": COPY_BANDWIDTH / 1e12, "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(options.out)), exist_ok=True)
    with open(options.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
