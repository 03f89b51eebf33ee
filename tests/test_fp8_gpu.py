"""The fp8 KV cache on CUDA: the Triton kernels in bf16 against the reference, and the engine's
fp8 cache against its bf16 cache (CUDA graphs, cuDNN long chunks). Skipped without CUDA."""

import pytest
import torch

from kernel_cases import paged_case, rope_rows, table_rows
from ropeway import LLM, EngineConfig, LLMEngine, SamplingParams
from ropeway.engine import LoadedModel
from ropeway.kernels import paged_attention, rerotate_keys, rotary_write_kv
from ropeway.kernels.attention import paged_attention_reference
from ropeway.kernels.fp8_kv import dequantize_fp8, quantize_fp8
from ropeway.kernels.rerotate import rerotate_keys_reference
from ropeway.kernels.rotary_write_kv import rotary_write_kv_reference
from test_fp8_engine import assert_parts_only_at_a_near_tie
from test_fp8_kv_cache import RELATIVE_STEP, SUBNORMAL_STEP, fp8_paged_case, fp8_pool

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ATTENTION_ERROR = 1e-2


def relative_error(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any()
    return ((out - ref).norm() / ref.norm()).item()



def assert_within_one_fp8_step(out, ref, scales):
    """Two roundings to e4m3 of inputs a last bit apart: a value near a rounding boundary can land
    one whole fp8 step (twice the rounding's half step) from the other."""
    one_step = ref.abs() * 2 * RELATIVE_STEP + scales[..., None] * SUBNORMAL_STEP
    assert bool(((out - ref).abs() <= one_step * 1.0001).all())

@pytest.mark.parametrize("sequences", [
    [(4000, 1), (70, 1), (131, 1)],                # decodes: split keys
    [(513, 1), (64, 1), (300, 300), (900, 64)],    # prefill chunks after decodes (decodes come first)
    [(6000, 4096)],                                # a long chunk: cuDNN on dequantized pages
])
def test_fp8_attention_in_bf16_against_fp64_on_the_dequantized_cache(sequences):
    seq_lens, query_lens = [s for s, _ in sequences], [n for _, n in sequences]
    case = paged_case(seq_lens, query_lens, 32, 8, 128, 16, torch.bfloat16, "cuda")
    fp8, dequantized = fp8_paged_case(case, 8, 128)
    decodes = sum(1 for n in query_lens if n == 1)
    long_chunks = tuple((sum(query_lens[:-1]), query_lens[-1], seq_lens[-1] - query_lens[-1])
                        for _ in [0] if query_lens[-1] >= 4096)
    out = paged_attention(fp8["q"], fp8["k_cache"], fp8["v_cache"], fp8["block_tables"], fp8["seq_lens"],
                          fp8["query_start_loc"], fp8["scale"], max(query_lens), max(seq_lens),
                          num_decode_seqs=decodes if decodes < len(sequences) else 0, long_chunks=long_chunks,
                          k_scale=fp8["k_scale"], v_scale=fp8["v_scale"])
    ref = paged_attention_reference(**{key: value.double() if torch.is_tensor(value) and value.is_floating_point()
                                       else value for key, value in dequantized.items()})
    assert relative_error(out, ref) < ATTENTION_ERROR


def test_fp8_rotary_write_on_cuda_stores_the_references_values():
    num_tokens, q_heads, kv_heads, dim, page = 700, 32, 8, 128, 16
    inv_freq, factors = rope_rows(3, dim, "cuda")
    q = torch.randn(num_tokens, q_heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(num_tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16) * 3
    v = torch.randn(num_tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 131072, (num_tokens,), device="cuda")
    seq_index = torch.randint(0, 3, (num_tokens,), device="cuda", dtype=torch.int32)
    slots = torch.randperm(64 * page, device="cuda")[:num_tokens]
    slots[::9] = -1
    caches = []
    for write, (qq, kk) in ((rotary_write_kv_reference, (q.clone(), k.clone())), (rotary_write_kv, (q, k))):
        _, (k8, ks, v8, vs) = fp8_pool(1, 64, page, kv_heads, dim, "cuda")
        write(qq, kk, v, k8[0], v8[0], slots, positions, seq_index, inv_freq, factors, ks[0], vs[0])
        caches.append((dequantize_fp8(k8[0], ks[0], torch.float64), dequantize_fp8(v8[0], vs[0], torch.float64),
                       ks[0]))
    (k_ref, v_ref, s_ref), (k_out, v_out, _) = caches
    # Rotations in bf16 may differ by an ulp, and GPU division by a last bit.
    assert_within_one_fp8_step(k_out, k_ref, 2 * s_ref.double())
    assert torch.equal(v_out, v_ref)


def test_fp8_rerotate_on_cuda_is_as_close_to_the_exact_rotation_as_the_reference():
    """Kernel and reference round the fp32 angle difference (positions up to 100k) differently by
    an ulp, a few thousandths of a radian, which moves a near-zero element by many subnormal
    steps: element-wise agreement within one fp8 step cannot hold. What must hold is that each
    lands as close to the exact rotation of the same fp8 keys as the other does."""
    layers, blocks, page, heads, dim = 32, 40, 16, 8, 128
    keys = torch.randn(layers, blocks, page, heads, dim, device="cuda")
    slots = torch.randperm(blocks * page, device="cuda")[:500]
    old_positions = torch.randint(0, 100000, (500,), device="cuda")
    new_positions = old_positions - torch.randint(0, 30000, (500,), device="cuda")
    old_inv_freq, old_factors = rope_rows(500, dim, "cuda")
    new_inv_freq, new_factors = rope_rows(500, dim, "cuda")
    k8_in, ks_in = quantize_fp8(keys)
    exact = dequantize_fp8(k8_in, ks_in, torch.float64)
    rerotate_keys_reference(exact, slots, old_positions, new_positions,
                            *table_rows(old_inv_freq, new_inv_freq, old_factors.double(), new_factors.double()))
    errors = []
    for rerotate in (rerotate_keys_reference, rerotate_keys):
        _, (k8, ks, _, _) = fp8_pool(layers, blocks, page, heads, dim, "cuda")
        k8[:], ks[:] = k8_in, ks_in
        rerotate(k8, slots, old_positions, new_positions, *table_rows(old_inv_freq, new_inv_freq, old_factors,
                                                                      new_factors), ks)
        errors.append(relative_error(dequantize_fp8(k8, ks, torch.float64), exact))
    reference_error, kernel_error = errors
    assert 0 < reference_error < 0.05  # e4m3's rounding, a few percent
    assert kernel_error <= 1.05 * reference_error


PROMPTS = [
    "The history of the Roman Empire began",
    "def quicksort(items):\n",
    "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n",
]


def test_engine_fp8_cache_on_cuda_starts_as_the_bf16_cache_does():
    """Decode steps replay CUDA graphs over the fp8 pool; a 5k-token prompt in 4k chunks goes to
    cuDNN on dequantized pages. Greedy follows the bf16 cache's until a near tie (bf16 rounds
    the activations too, so ties come sooner than in fp32 on CPU); prompt logprobs stay close."""
    config = EngineConfig(dtype="bfloat16", device="cuda", kv_cache_memory_bytes=1 << 30,
                          max_num_batched_tokens=4096)
    bf16 = LLM(engine=LLMEngine(config))
    loaded = LoadedModel(bf16.engine.model, bf16.tokenizer, 0.0)
    fp8 = LLM(engine=LLMEngine(EngineConfig(**{**config.__dict__, "kv_cache_dtype": "fp8"}), loaded=loaded))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    for a, b in zip(fp8.generate(PROMPTS, params), bf16.generate(PROMPTS, params)):
        assert_parts_only_at_a_near_tie(a.outputs[0], b.outputs[0])
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:60])
    long_prompt = bf16.tokenizer.encode(text)[:5000]
    logprob_params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=True)
    a, b = (llm.generate([long_prompt], logprob_params)[0].prompt_logprobs[1:] for llm in (fp8, bf16))
    differences = sorted(abs(x - y) for x, y in zip(a, b))
    assert sum(differences) / len(differences) < 0.15  # as on CPU (tests/test_fp8_engine.py)
