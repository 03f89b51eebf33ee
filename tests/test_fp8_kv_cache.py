"""The fp8 KV cache (kernels/fp8_kv.py): quantization against plain math, the torch reference ops
on fp8 caches against the same ops on the dequantized cache, and the Triton kernels against the
reference under TRITON_INTERPRET=1 (conftest), on small grids."""

import pytest
import torch

from kernel_cases import paged_case, rope_rows, table_rows
from ropeway.kernels.attention import paged_attention_reference
from ropeway.kernels.cpu_attention import paged_attention_cpu, plan_cpu_attention
from ropeway.kernels.fp8_kv import (FP8, allocate_fp8_cache, cache_views, dequantize_fp8, fp8_block_bytes,
                                    quantize_fp8)
from ropeway.kernels.kv_cache import write_kv_reference
from ropeway.kernels.rerotate import rerotate_keys_reference
from ropeway.kernels.rotary_write_kv import rotary_write_kv_reference

# e4m3 keeps 3 mantissa bits: rounding moves a normal number by at most 2**-4 of itself; below
# 2**-6 (subnormal) the spacing is 2**-9, in units of the vector's scale.
RELATIVE_STEP = 2.0 ** -4
SUBNORMAL_STEP = 2.0 ** -9


def assert_within_fp8_rounding(dequantized, exact, scales):
    bound = exact.abs() * RELATIVE_STEP + scales[..., None] * SUBNORMAL_STEP / 2
    assert bool(((dequantized.double() - exact.double()).abs() <= bound.double() * 1.0001).all())


def fp8_pool(num_layers, num_blocks, page_size, num_kv_heads, head_dim, device="cpu"):
    """A zeroed fp8 pool and the views (keys, key scales, values, value scales) of every layer."""
    pool = allocate_fp8_cache(num_layers, num_blocks, page_size, num_kv_heads, head_dim, device)
    return pool, (*cache_views(pool[:, 0], num_kv_heads, head_dim), *cache_views(pool[:, 1], num_kv_heads, head_dim))


def fp8_paged_case(case, num_kv_heads, head_dim):
    """paged_case's caches stored in an fp8 pool (its never-written NaN slots too), and the
    dequantized caches in q's dtype that the fp8 path must attend exactly like."""
    num_blocks, page_size = case["k_cache"].shape[:2]
    pool, (k8, ks, v8, vs) = fp8_pool(1, num_blocks, page_size, num_kv_heads, head_dim, case["q"].device)
    for cache, scales, source in ((k8, ks, case["k_cache"]), (v8, vs, case["v_cache"])):
        cache[0], scales[0] = quantize_fp8(source)
    fp8 = dict(case, k_cache=k8[0], v_cache=v8[0], k_scale=ks[0], v_scale=vs[0])
    dequantized = dict(case, k_cache=dequantize_fp8(k8[0], ks[0], case["q"].dtype),
                       v_cache=dequantize_fp8(v8[0], vs[0], case["q"].dtype))
    return fp8, dequantized


def test_quantize_keeps_each_element_within_one_rounding_of_e4m3():
    gen = torch.Generator().manual_seed(0)
    # Vectors of very different magnitudes, one with an outlier, and an all-zero one.
    x = torch.randn(6, 3, 64, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 1.0, 0.0])[:, None, None]
    x[4, 1, 5] = 200.0
    values, scales = quantize_fp8(x)
    assert values.dtype == FP8 and scales.dtype == torch.float32
    torch.testing.assert_close(scales, x.abs().amax(-1) / 448.0)
    dequantized = dequantize_fp8(values, scales, torch.float32)
    assert_within_fp8_rounding(dequantized, x, scales)
    # Each vector's largest element maps to e4m3's largest value, so it comes back exactly.
    largest = x.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(dequantized.gather(-1, largest), x.gather(-1, largest), rtol=1e-6, atol=0)
    assert bool((dequantized[5] == 0).all()) and bool((scales[5] == 0).all())


def test_a_block_carries_its_scales_when_copied_as_bytes():
    """kv_cache[:, :, blocks] copies whole blocks, fp8 numbers and scales together, and the
    pool's byte size per block is what fp8_block_bytes says."""
    num_layers, num_blocks, page_size, heads, dim = 2, 4, 16, 3, 64
    pool, (k8, ks, v8, vs) = fp8_pool(num_layers, num_blocks, page_size, heads, dim)
    assert pool.shape == (num_layers, 2, num_blocks, fp8_block_bytes(page_size, heads, dim))
    assert fp8_block_bytes(16, 8, 128) / (16 * 8 * 128 * 2) == pytest.approx(132 / 256)
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 20, heads, dim, generator=gen) * 5
    slots = torch.arange(16, 36)  # the whole of block 1, the start of block 2
    for layer in range(num_layers):
        write_kv_reference(k * (layer + 1), v, k8[layer], v8[layer], slots, ks[layer], vs[layer])
    pool[:, :, 3] = pool[:, :, 1]
    for layer in range(num_layers):
        copied = dequantize_fp8(k8[layer, 3], ks[layer, 3], torch.float32)
        assert_within_fp8_rounding(copied, k[:16] * (layer + 1), ks[layer, 3])
        assert torch.equal(vs[layer, 3], vs[layer, 1])
    assert bool((ks[:, 0] == 0).all())  # never written: scale 0, reads as zeros


MIXED = [(37, 37), (50, 13), (29, 1), (32, 1), (20, 0)]
# Decodes at long contexts whose blocks lie in runs (read in place from a plain cache), and a
# chunk: (sequences, block tables).
LONG_DECODES = ([(1100, 1), (1200, 1), (37, 37)], [list(range(3, 72)), list(range(200, 125, -1)), [300, 301, 302]])


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("layout", ["mixed", "long-decodes"])
def test_attention_on_fp8_cache_is_attention_on_its_dequantized_values(layout, with_bias):
    """The reference and the CPU fast path read an fp8 cache as its fp8 numbers times their
    scales: the same output as attending to those values stored in fp32."""
    gen = torch.Generator().manual_seed(2)
    sequences, tables = (MIXED, None) if layout == "mixed" else LONG_DECODES
    case = paged_case([s for s, _ in sequences], [n for _, n in sequences], 6, 2, 64, 16, torch.float32, "cpu", gen,
                      tables)
    if tables is not None:
        plan = plan_cpu_attention(case["block_tables"], case["seq_lens"], case["query_start_loc"], 16)
        assert len(plan.long_decodes) == 2
    if with_bias:
        bias = torch.randn(case["k_cache"].shape[:2], generator=gen)
        bias[0, :3] = float("-inf")
        case["slot_bias"] = bias
    fp8, dequantized = fp8_paged_case(case, 2, 64)
    expected = paged_attention_reference(**dequantized)
    torch.testing.assert_close(paged_attention_reference(**fp8), expected, atol=1e-5, rtol=1e-5)
    fp8_cpu = {key: value for key, value in fp8.items()}
    out = paged_attention_cpu(fp8_cpu.pop("q"), fp8_cpu.pop("k_cache"), fp8_cpu.pop("v_cache"),
                              fp8_cpu.pop("block_tables"), fp8_cpu.pop("seq_lens"), fp8_cpu.pop("query_start_loc"),
                              fp8_cpu.pop("scale"), fp8_cpu.pop("slot_bias", None),
                              k_scale=fp8_cpu.pop("k_scale"), v_scale=fp8_cpu.pop("v_scale"))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rotary_write_quantizes_keys_after_rope_and_values_as_they_are():
    gen = torch.Generator().manual_seed(3)
    num_tokens, q_heads, kv_heads, dim, page = 10, 6, 2, 64, 16
    q = torch.randn(num_tokens, q_heads, dim, generator=gen)
    k = torch.randn(num_tokens, kv_heads, dim, generator=gen) * 4
    v = torch.randn(num_tokens, kv_heads, dim, generator=gen)
    inv_freq, factors = rope_rows(2, dim, "cpu", gen)
    positions = torch.randint(0, 5000, (num_tokens,), generator=gen)
    seq_index = torch.tensor([0] * 6 + [1] * 4, dtype=torch.int32)
    slots = torch.randperm(3 * page, generator=gen)[:num_tokens]
    slots[2] = -1
    _, (k8, ks, v8, vs) = fp8_pool(1, 3, page, kv_heads, dim)
    rotary_write_kv_reference(q, k, v, k8[0], v8[0], slots, positions, seq_index, inv_freq, factors, ks[0], vs[0])
    keep = slots >= 0
    index = (slots[keep] // page, slots[keep] % page)
    # k was rotated in place: the cache holds those rotated keys, rounded to fp8.
    assert_within_fp8_rounding(dequantize_fp8(k8[0][index], ks[0][index], torch.float32), k[keep], ks[0][index])
    assert_within_fp8_rounding(dequantize_fp8(v8[0][index], vs[0][index], torch.float32), v[keep], vs[0][index])
    assert int((ks[0] > 0).sum()) == int(keep.sum()) * kv_heads  # the padding token wrote nothing


def test_rerotating_an_fp8_key_rounds_once_from_the_exact_turn():
    """Dequantize, turn in fp32 by the angle difference (with YaRN's factor ratio), quantize
    with a new scale: within one fp8 rounding of the fp64 turn of the stored key."""
    gen = torch.Generator().manual_seed(4)
    layers, blocks, page, heads, dim = 2, 3, 16, 3, 64
    _, (k8, ks, _, _) = fp8_pool(layers, blocks, page, heads, dim)
    k8[:], ks[:] = quantize_fp8(torch.randn(layers, blocks, page, heads, dim, generator=gen))
    slots = torch.randperm(blocks * page, generator=gen)[:7]
    old_positions = torch.randint(0, 20000, (7,), generator=gen)
    new_positions = old_positions - torch.randint(0, 4000, (7,), generator=gen)
    old_inv_freq, old_factors = rope_rows(7, dim, "cpu", gen)
    new_inv_freq, new_factors = rope_rows(7, dim, "cpu", gen)
    index = (slice(None), slots // page, slots % page)
    before = dequantize_fp8(k8[index], ks[index], torch.float64)
    rerotate_keys_reference(k8, slots, old_positions, new_positions,
                            *table_rows(old_inv_freq, new_inv_freq, old_factors, new_factors), ks)
    delta = (new_positions.double()[:, None] * new_inv_freq.double()
             - old_positions.double()[:, None] * old_inv_freq.double())
    ratio = (new_factors.double() / old_factors.double())[:, None]
    cos, sin = (torch.cos(delta) * ratio)[None, :, None], (torch.sin(delta) * ratio)[None, :, None]
    half = dim // 2
    x1, x2 = before[..., :half], before[..., half:]
    exact = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)
    assert_within_fp8_rounding(dequantize_fp8(k8[index], ks[index], torch.float64), exact, ks[index].double())


def test_long_chunk_gather_dequantizes_pages():
    """cudnn_attention's path gathers an fp8 cache's pages as numbers in q's dtype: same output as
    paged attention over the fp8 cache (a plain-torch attention stands in for cuDNN on CPU)."""
    pytest.importorskip("triton")
    from test_kernels_triton import attention_with_lse

    from ropeway.kernels.cudnn_attention import attend_long_chunk

    gen = torch.Generator().manual_seed(5)
    context_len, num_queries = 1100, 60
    case = paged_case([context_len + num_queries], [num_queries], 4, 2, 16, 16, torch.float32, "cpu", gen)
    fp8, _ = fp8_paged_case(case, 2, 16)
    out = torch.full_like(case["q"], float("nan"))
    assert attend_long_chunk(fp8["q"], fp8["k_cache"], fp8["v_cache"], fp8["block_tables"][0], context_len,
                             fp8["scale"], out, attend=attention_with_lse, k_scale=fp8["k_scale"],
                             v_scale=fp8["v_scale"])
    torch.testing.assert_close(out, paged_attention_reference(**fp8), atol=1e-5, rtol=1e-5)


# Triton under the interpreter: the same fp8 bytes and scales as the reference.

ATTENTION_CASES = [
    # (name, sequences, q heads, kv heads, head dim, page size, config)
    ("mixed-gqa3-small-tiles", MIXED, 6, 2, 64, 16, (16, 16, 1, 4, 1)),
    ("decode-gqa4-split", [(70, 1), (5, 1), (131, 1)], 8, 2, 128, 16, (16, 16, 4, 4, 1)),
    ("decode-gqa4-3-splits", [(70, 1), (5, 1), (131, 1)], 8, 2, 128, 16, (16, 32, 3, 4, 1)),
]


# fp16 queries: "f16" (the interpreter's stand-in for the default "f16_ptx") and "q", the
# queries' own dtype; fp32 queries always take "q".
@pytest.mark.parametrize("dtype,fp8_widen", [(torch.float32, "f16_ptx"), (torch.float16, "f16_ptx"),
                                             (torch.float16, "q")])
@pytest.mark.parametrize("name,sequences,num_q_heads,num_kv_heads,head_dim,page_size,config",
                         ATTENTION_CASES, ids=[case[0] for case in ATTENTION_CASES])
def test_triton_attention_reads_fp8_like_the_reference(dtype, fp8_widen, name, sequences, num_q_heads,
                                                       num_kv_heads, head_dim, page_size, config):
    pytest.importorskip("triton")
    from ropeway.kernels.triton_attention import AttentionConfig, paged_attention_triton

    gen = torch.Generator().manual_seed(6)
    seq_lens, query_lens = [s for s, _ in sequences], [n for _, n in sequences]
    case = paged_case(seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page_size, dtype, "cpu", gen)
    fp8, _ = fp8_paged_case(case, num_kv_heads, head_dim)
    out = paged_attention_triton(**fp8, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
                                 config=AttentionConfig(*config, fp8_widen=fp8_widen))
    expected = paged_attention_reference(**dict(fp8, q=fp8["q"].float()))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rotary_write_kv_stores_the_references_fp8_bytes_and_scales(dtype):
    pytest.importorskip("triton")
    from ropeway.kernels.triton_rotary_write_kv import rotary_write_kv_triton

    gen = torch.Generator().manual_seed(7)
    num_tokens, q_heads, kv_heads, dim, page = 9, 6, 3, 64, 16
    qkv = (torch.randn(num_tokens, (q_heads + 2 * kv_heads) * dim, generator=gen) * 3).to(dtype)
    inv_freq, factors = rope_rows(2, dim, "cpu", gen)
    positions = torch.randint(0, 5000, (num_tokens,), generator=gen)
    seq_index = torch.tensor([0] * 5 + [1] * 4, dtype=torch.int32)
    slots = torch.randperm(3 * page, generator=gen)[:num_tokens]
    slots[4] = -1
    results = []
    for write in (rotary_write_kv_reference, rotary_write_kv_triton):
        fused = qkv.clone()
        q = fused[:, : q_heads * dim].view(num_tokens, q_heads, dim)
        k = fused[:, q_heads * dim : (q_heads + kv_heads) * dim].view(num_tokens, kv_heads, dim)
        v = fused[:, (q_heads + kv_heads) * dim :].view(num_tokens, kv_heads, dim)
        pool, (k8, ks, v8, vs) = fp8_pool(2, 3, page, kv_heads, dim)
        write(q, k, v, k8[1], v8[1], slots, positions, seq_index, inv_freq, factors, ks[1], vs[1])
        results.append((fused, pool))
    (fused_ref, pool_ref), (fused, pool) = results
    # cos/sin from the interpreter's numpy and from torch may differ in the last bit, and its
    # fp32 -> bf16 cast truncates where torch rounds (ENVIRONMENT.md): the rotated keys may be
    # an ulp apart. The cache holds exactly the keys this path left in k, quantized.
    tolerance = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(fused.float(), fused_ref.float(), atol=tolerance, rtol=tolerance)
    keep = slots >= 0
    k_kept = fused[:, q_heads * dim : (q_heads + kv_heads) * dim].view(num_tokens, kv_heads, dim)[keep]
    index = (slots[keep] // page, slots[keep] % page)
    k8, ks = cache_views(pool[1, 0], kv_heads, dim)
    values, scales = quantize_fp8(k_kept)
    assert torch.equal(k8[index].view(torch.uint8), values.view(torch.uint8))
    torch.testing.assert_close(ks[index], scales, rtol=0, atol=0)
    assert torch.equal(pool[:, 1], pool_ref[:, 1])  # values: the same bytes and scales
    assert bool((pool[0] == 0).all())  # the other layer untouched


def test_triton_rerotate_requantizes_like_the_reference():
    pytest.importorskip("triton")
    from ropeway.kernels.triton_rerotate import rerotate_keys_triton

    gen = torch.Generator().manual_seed(8)
    layers, blocks, page, heads, dim = 5, 3, 16, 3, 64  # 5 layers: a partial group of LAYERS_PER_PROGRAM
    slots = torch.randperm(blocks * page, generator=gen)[:6]
    old_positions = torch.randint(0, 20000, (6,), generator=gen)
    new_positions = old_positions - torch.randint(0, 4000, (6,), generator=gen)
    old_inv_freq, old_factors = rope_rows(6, dim, "cpu", gen)
    new_inv_freq, new_factors = rope_rows(6, dim, "cpu", gen)
    keys = torch.randn(layers, blocks, page, heads, dim, generator=gen)
    pools = []
    for rerotate in (rerotate_keys_reference, rerotate_keys_triton):
        pool, (k8, ks, _, _) = fp8_pool(layers, blocks, page, heads, dim)
        k8[:], ks[:] = quantize_fp8(keys)
        rerotate(k8, slots, old_positions, new_positions, *table_rows(old_inv_freq, new_inv_freq, old_factors,
                                                                      new_factors), ks)
        pools.append(pool)
    k_ref, s_ref = cache_views(pools[0][:, 0], heads, dim)
    k_tri, s_tri = cache_views(pools[1][:, 0], heads, dim)
    torch.testing.assert_close(s_tri, s_ref, rtol=1e-6, atol=0)
    # The interpreter's (numpy) and torch's fp32 cos/sin may differ in the last bit, so an
    # element may round to the neighbouring fp8 value: never further.
    reference = dequantize_fp8(k_ref, s_ref, torch.float64)
    assert_within_fp8_rounding(dequantize_fp8(k_tri, s_tri, torch.float64), reference, 2 * s_ref.double())
    assert not torch.equal(k_ref.view(torch.uint8), quantize_fp8(keys)[0].view(torch.uint8))


def test_fp8_decode_config_fills_one_wave_of_resident_programs(monkeypatch):
    """An fp8 decode's split count fits its programs into one wave of FP8_DECODE_PROGRAMS_PER_SM
    per SM (any count, not only powers of two), with slices of at least 2048 keys."""
    pytest.importorskip("triton")
    from ropeway.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "_sm_count", lambda device: 132)
    q = torch.zeros(1, 32, 128, dtype=torch.float16)
    resident = triton_attention.FP8_DECODE_PROGRAMS_PER_SM * 132
    for num_seqs, capacity in ((1, 131072), (8, 131072), (1, 8192)):
        config = triton_attention.choose_config(q.expand(num_seqs, -1, -1), 8, num_seqs, 1, capacity, fp8=True)
        programs = num_seqs * 8 * config.num_splits
        assert programs <= resident and capacity // config.num_splits >= 2048
        assert programs > resident - num_seqs * 8 or capacity // (config.num_splits + 1) < 2048
    assert triton_attention.choose_config(q, 8, 1, 1, 131072).num_splits == 128  # bf16 unchanged
