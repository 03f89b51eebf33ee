"""The engine on CUDA (Triton kernels) against the CPU path (torch reference ops)."""

import pytest
import torch

from ropeway import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [
    "The history of the Roman Empire began",
    "def quicksort(items):\n",
    "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
    "List three facts about the Moon:\n1.",
]


def test_cuda_greedy_equals_cpu_over_32_tokens():
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    cpu = LLM(dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 28)
    expected = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, params)]
    gpu = LLM(dtype="float32", device="cuda", kv_cache_memory_bytes=1 << 28)
    # Mixed in one batch with small chunks, so prefill chunks and decodes share launches.
    gpu_chunked = LLM(engine=type(gpu.engine)(
        gpu.engine.config.__class__(dtype="float32", device="cuda", kv_cache_memory_bytes=1 << 28,
                                    max_num_batched_tokens=64, prefill_chunk_size=8),
        loaded=_loaded(gpu)))
    assert [o.outputs[0].token_ids for o in gpu.generate(PROMPTS, params)] == expected
    assert [o.outputs[0].token_ids for o in gpu_chunked.generate(PROMPTS, params)] == expected


def _loaded(llm):
    from ropeway.engine import LoadedModel

    return LoadedModel(llm.engine.model, llm.tokenizer, 0.0)


def test_cuda_bf16_agrees_with_cpu_fp32_at_first():
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    cpu = LLM(dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 28)
    gpu = LLM(dtype="bfloat16", device="cuda", kv_cache_memory_bytes=1 << 28)
    expected = [o.outputs[0].token_ids for o in cpu.generate(PROMPTS, params)]
    got = [o.outputs[0].token_ids for o in gpu.generate(PROMPTS, params)]
    # bf16 rounds differently; the first greedy tokens must still agree.
    assert sum(e[0] == g[0] for e, g in zip(expected, got)) >= len(PROMPTS) - 1


def test_cuda_graph_decode_equals_eager():
    # Different lengths, so the batch shrinks through several padded buckets (5 -> 1).
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (8, 16, 24, 32, 40)]
    prompts = PROMPTS + ["Once upon a time"]
    graphs = LLM(dtype="float32", device="cuda", kv_cache_memory_bytes=1 << 28)
    eager = LLM(engine=type(graphs.engine)(graphs.engine.config, loaded=_loaded(graphs)))
    eager.engine.runner.decode_graphs = None
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in graphs.generate(prompts, params)]
    assert sorted(graphs.engine.runner.decode_graphs.graphs) == [(1, False), (2, False), (4, False), (8, False)]
    assert got == expected


def test_cuda_sink_window_stream_equals_cpu():
    """Eviction and re-rotation through the Triton kernels give the CPU path's tokens."""
    from ropeway import ContextParams

    policy = ContextParams(context_policy={"type": "sink_window", "sinks": 4, "window": 64})
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=True)
    cpu = LLM(dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 28, max_num_batched_tokens=64)
    gpu = LLM(dtype="float32", device="cuda", kv_cache_memory_bytes=1 << 28, max_num_batched_tokens=64)
    prompt = cpu.tokenizer.encode(" ".join(PROMPTS) * 12)
    assert len(prompt) > 4 * 64
    expected = cpu.generate([prompt], params, context=policy)[0]
    got = gpu.generate([prompt], params, context=policy)[0]
    assert gpu.engine.scheduler.num_evictions > 0
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids
    diffs = [abs(a - b) for a, b in zip(got.prompt_logprobs[1:], expected.prompt_logprobs[1:])]
    assert max(diffs) < 1e-2


@pytest.mark.parametrize("landmarks", [16, 0])
def test_cuda_retrieving_landmark_stream_equals_cpu(landmarks):
    """Landmark summaries (or none: the question's recalled blocks are then computed afresh where
    they sit), recall from host memory and bias-reading decode graphs on the GPU give the CPU
    path's tokens."""
    from ropeway import ContextParams

    policy = ContextParams(context_policy={"type": "landmark", "sinks": 4, "window": 64, "landmarks": landmarks,
                                           "retrieve": 32})
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    cpu = LLM(dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 28, max_num_batched_tokens=64)
    gpu = LLM(dtype="float32", device="cuda", kv_cache_memory_bytes=1 << 28, max_num_batched_tokens=64)
    prompt = cpu.tokenizer.encode(" ".join(PROMPTS) * 12)
    expected = cpu.generate([prompt], params, context=policy)[0]
    got = gpu.generate([prompt], params, context=policy)[0]
    runner = gpu.engine.runner
    # Re-selection before every prompt chunk past the first eviction (issue 19): several recalls.
    assert runner.cache_ops.num_recalls >= 1 and runner.cache_ops.num_recalled_blocks >= 2
    assert (1, True) in runner.decode_graphs.graphs
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids


def test_start_up_capture_covers_every_bucket_and_decodes_as_eager():
    graphs = LLM(dtype="float32", device="cuda", kv_cache_memory_bytes=1 << 28, max_num_seqs=20)
    graphs.engine.capture_decode_graphs()
    assert sorted(graphs.engine.runner.decode_graphs.graphs) == [(b, False) for b in (1, 2, 4, 8, 16, 24)]
    eager = LLM(engine=type(graphs.engine)(graphs.engine.config, loaded=_loaded(graphs)))
    eager.engine.runner.decode_graphs = None
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, params)]
    assert [o.outputs[0].token_ids for o in graphs.generate(PROMPTS, params)] == expected
    assert len(graphs.engine.runner.decode_graphs.graphs) == 6  # nothing captured mid-stream


def test_cuda_long_chunks_through_cudnn_as_accurate_as_triton(monkeypatch):
    """A 7k-token prompt in 2k chunks, long chunks made to take cuDNN (kernels/cudnn_attention:
    a chunk from scratch, then chunks after whole and split key granules): its bf16 prompt
    logprobs are as close to an fp32 run (Triton throughout) as the bf16 Triton path's are."""
    from ropeway import kernels
    from ropeway.kernels import cudnn_attention, triton_attention

    monkeypatch.setattr(kernels, "LONG_CHUNK_MIN_QUERIES", 2000)
    calls = []
    attend = triton_attention.attend_long_chunk
    monkeypatch.setattr(triton_attention, "attend_long_chunk", lambda *a, **k: calls.append(a[4]) or attend(*a, **k))
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=True)
    config = {"device": "cuda", "kv_cache_memory_bytes": 1 << 29, "max_num_batched_tokens": 2000,
              "enable_prefix_caching": False}
    fp32 = LLM(dtype="float32", **config)
    prompt = fp32.tokenizer.encode(" ".join(PROMPTS) * 160)[:7000]
    reference = torch.tensor(fp32.generate([prompt], params)[0].prompt_logprobs[1:])
    bf16 = LLM(dtype="bfloat16", **config)
    through_cudnn = torch.tensor(bf16.generate([prompt], params)[0].prompt_logprobs[1:])
    layers = bf16.engine.model_config.num_layers
    assert calls == [context for context in (0, 2000, 4000) for _ in range(layers)]
    monkeypatch.setattr(cudnn_attention, "_DISABLED", True)
    through_triton = torch.tensor(bf16.generate([prompt], params)[0].prompt_logprobs[1:])
    assert len(calls) == 3 * layers
    cudnn_error = (through_cudnn - reference).abs().mean().item()
    triton_error = (through_triton - reference).abs().mean().item()
    assert cudnn_error <= 1.25 * triton_error + 1e-3, (cudnn_error, triton_error)
