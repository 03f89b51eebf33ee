"""The serving-speed issue's offline shapes, each against its floor (used by offline_throughput.py).

Floors use the H200's measured ceilings (ENVIRONMENT.md): 4.25 TB/s device copy, 692 TFLOP/s
bf16 matmul. A decode step must read every weight except the embedding table (one row of
it) plus each sequence's KV; a prefill must do 2 FLOPs per weight per token plus causal
attention (2 * L^2 * head_dim * query heads * layers for QK^T and PV together).

Engine rows run real requests through LLMEngine.step (scheduler, graphs, sampler); "model
step" rows time one decode forward (graph replay plus its input copies) with CUDA events on a
synthetic batch whose KV pages hold random values, which is how 128k contexts are measured
without a 128k prefill.
"""

import time

import torch

from ropeway import LLMEngine, SamplingParams
from ropeway.models import ForwardBatch
from ropeway.arith import cdiv

COPY_BYTES_PER_S = 4.25e12
MATMUL_FLOPS_PER_S = 692e12


def weight_bytes_per_step(engine: LLMEngine) -> int:
    model = engine.model
    tensors = [model.norm, model.lm_head]
    for layer in model.layers:
        tensors += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def kv_bytes_per_token(engine: LLMEngine) -> int:
    cache = engine.kv_cache  # [layers, 2, blocks, block_size, kv_heads, head_dim]
    return cache.shape[0] * 2 * cache.shape[4] * cache.shape[5] * cache.element_size()


def prefill_flops(engine: LLMEngine, length: int) -> float:
    cfg = engine.model_config
    linear = 2 * (weight_bytes_per_step(engine) // engine.kv_cache.element_size()) * length
    attention = 2 * length**2 * cfg.head_dim * cfg.num_heads * cfg.num_layers
    return linear + attention


def sync(engine: LLMEngine) -> None:
    torch.cuda.synchronize(engine.device)


def engine_decode(engine: LLMEngine, batch: int, context: int, steps: int, vocab: int) -> float:
    """Seconds per pure-decode step, B requests at `context` tokens of prompt."""
    generator = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True, detokenize=False)
    for i, prompt in enumerate(torch.randint(0, vocab, (batch, context), generator=generator).tolist()):
        engine.add_request(f"decode-{batch}-{context}-{i}-{time.monotonic_ns()}", prompt, params)
    decode_s, decode_steps = 0.0, 0
    sync(engine)
    while engine.has_unfinished_requests():
        # No device sync around a step: with asynchronous scheduling a step launches the
        # next one before reading its own tokens, and a sync here would forbid that overlap.
        # Each step waits for the GPU anyway (it reads the previous step's tokens), so the
        # steady-state step times add up to the wall time.
        started = time.perf_counter()
        engine.step()
        elapsed = time.perf_counter() - started
        plan = engine.scheduler.last_plan
        # Steady state only: all B sequences decoding. The staggered tail (sequences that
        # started decoding later finish later) shrinks the batch through buckets whose graphs
        # would be captured inside the timed steps.
        if plan is not None and len(plan.scheduled) == batch and all(i.num_new_tokens == 1 for i in plan.scheduled):
            decode_s += elapsed
            decode_steps += 1
    return decode_s / decode_steps


def engine_ttft(engine: LLMEngine, length: int, vocab: int, seed: int = 0) -> float:
    prompt = torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(length + seed)).tolist()
    sync(engine)
    started = time.perf_counter()
    engine.add_request(f"ttft-{length}-{time.monotonic_ns()}", prompt,
                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False))
    while engine.has_unfinished_requests():
        engine.step()
    sync(engine)
    return time.perf_counter() - started


def synthetic_decode_batch(engine: LLMEngine, batch: int, context: int) -> ForwardBatch:
    """B sequences of `context` cached tokens each on distinct random-valued pages, one new token each."""
    device, block_size = engine.device, engine.config.block_size
    blocks_per_seq = cdiv(context, block_size)
    total_blocks = batch * blocks_per_seq
    if total_blocks > engine.kv_cache.shape[2]:
        raise ValueError(f"{batch} x {context} tokens do not fit the KV pool")
    engine.kv_cache[:, :, :total_blocks].normal_()
    tables = torch.arange(total_blocks, dtype=torch.int32, device=device).view(batch, blocks_per_seq)
    position = torch.full((batch,), context - 1, dtype=torch.int64, device=device)
    slots = tables[:, -1].to(torch.int64) * block_size + (context - 1) % block_size
    inv_freq, factor = engine.runner.rope_row(engine.default_rope_plan)
    index = torch.arange(batch + 1, device=device)
    return ForwardBatch(
        input_ids=torch.randint(0, 1000, (batch,), device=device), positions=position,
        seq_index=index[:batch].to(torch.int32), slot_mapping=slots,
        query_start_loc=index.to(torch.int32),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device), block_tables=tables,
        inv_freq=inv_freq.expand(batch, -1).contiguous(),
        attention_factor=torch.full((batch,), factor, dtype=torch.float32, device=device),
        logits_indices=index[:batch], max_query_len=1, max_seq_len=context)


def model_step(engine: LLMEngine, batch: ForwardBatch, graphs: bool, repeats: int = 20) -> float:
    """Median seconds of one decode forward, with or without the CUDA graph."""
    runner = engine.runner

    def once():
        if graphs:
            return runner.decode_graphs.run(batch)
        return engine.model.forward(batch, engine.kv_cache)

    once()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        once()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def graph_matches_eager(engine: LLMEngine, batch: ForwardBatch) -> float:
    """Largest |graph - eager| logit difference on one batch (the KV write is idempotent)."""
    eager = engine.model.forward(batch, engine.kv_cache)
    graph = engine.runner.decode_graphs.run(batch).clone()
    return (graph - eager).abs().max().item()


def run_issue_shapes(engine: LLMEngine, vocab: int) -> list[dict]:
    weights = weight_bytes_per_step(engine)
    kv_token = kv_bytes_per_token(engine)

    def decode_floor(batch: int, context: int) -> float:
        return (weights + batch * context * kv_token) / COPY_BYTES_PER_S

    # Capture the buckets used below outside the timed steps.
    for batch in (1, 64):
        engine_decode(engine, batch, 16, 3, vocab)
    rows = []

    def row(name, measured_s, floor_s, target, met, **extra):
        rows.append({"shape": name, "measured_ms": measured_s * 1000, "floor_ms": floor_s * 1000,
                     "x_floor": measured_s / floor_s, "target": target, "met": met, **extra})
        print(f"{name}: {measured_s * 1000:.2f} ms (floor {floor_s * 1000:.2f} ms, "
              f"{measured_s / floor_s:.2f}x) target {target}: {'met' if met else 'MISSED'}", flush=True)

    check = synthetic_decode_batch(engine, 3, 1024)
    rows.append({"shape": "graph vs eager max |logit diff|, B=3 L=1k",
                 "max_abs_diff": graph_matches_eager(engine, check)})
    print(f"graph vs eager max |logit diff|: {rows[-1]['max_abs_diff']:.3g}", flush=True)

    step = engine_decode(engine, 1, 1024, 64, vocab)
    floor = decode_floor(1, 1056)
    row("engine decode B=1 L=1k", step, floor, "<= 4.5 ms and <= 1.2x floor",
        step <= 4.5e-3 and step <= 1.2 * floor)
    step = engine_decode(engine, 64, 1024, 64, vocab)
    floor = decode_floor(64, 1056)
    row("engine decode B=64 L=1k", step, floor, ">= 8500 tok/s", 64 / step >= 8500, tok_s=64 / step)

    for batch, context in ((1, 1024), (64, 1024), (1, 131072)):
        synthetic = synthetic_decode_batch(engine, batch, context)
        graph_s = model_step(engine, synthetic, graphs=True)
        eager_s = model_step(engine, synthetic, graphs=False, repeats=5)
        floor = decode_floor(batch, context)
        target = "<= 1.2x floor" if context > 1024 else "(GPU time of the engine rows)"
        row(f"model step B={batch} L={context // 1024}k", graph_s, floor, target,
            graph_s <= 1.2 * floor, eager_ms=eager_s * 1000)

    # The first long prompt of a process also pays one-off costs (Triton compiles, cuDNN's
    # handle and a plan per chunk shape): the target row is the next prompt of that length,
    # other tokens (no prefix-cache hit).
    first = engine_ttft(engine, 32768, vocab, seed=1)
    ttft = engine_ttft(engine, 32768, vocab)
    flops = prefill_flops(engine, 32768)
    row("engine TTFT 32k prompt", ttft, flops / MATMUL_FLOPS_PER_S, "<= 1.3 s", ttft <= 1.3,
        tflop_s=flops / ttft / 1e12, first_prompt_s=first)
    print(f"  (the process's first 32k prompt: {first:.3f} s)", flush=True)
    return rows
