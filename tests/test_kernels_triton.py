"""Triton kernels against the torch reference, on CPU under TRITON_INTERPRET=1 (conftest).

Grids stay at tens of programs: each costs about a millisecond in the interpreter.
"""

import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from kernel_cases import paged_case, rope_rows, table_rows  # noqa: E402
from ropeway.kernels.attention import paged_attention_reference  # noqa: E402
from ropeway.kernels.kv_cache import write_kv_reference  # noqa: E402
from ropeway.kernels.rerotate import rerotate_keys_reference  # noqa: E402
from ropeway.kernels.rotary import apply_rotary_reference  # noqa: E402
from ropeway.kernels.rotary_write_kv import rotary_write_kv_reference  # noqa: E402
from ropeway.kernels.silu_mul import silu_mul_reference  # noqa: E402
from ropeway.kernels.triton_attention import AttentionConfig, paged_attention_triton  # noqa: E402
from ropeway.kernels.triton_gemv import gemv_triton  # noqa: E402
from ropeway.kernels.triton_kv_cache import write_kv_triton  # noqa: E402
from ropeway.kernels.triton_rerotate import rerotate_keys_triton  # noqa: E402
from ropeway.kernels.triton_rotary import apply_rotary_triton  # noqa: E402
from ropeway.kernels.triton_rotary_write_kv import rotary_write_kv_triton  # noqa: E402
from ropeway.kernels.triton_silu_mul import silu_mul_triton  # noqa: E402
from ropeway.kernels.triton_sampling import _mix32  # noqa: E402

DTYPES = [torch.float32, torch.float16]
# bf16 only for the elementwise kernels (the interpreter's bf16 tl.dot is broken, see
# ENVIRONMENT.md); its fp32 -> bf16 casts truncate where torch rounds: 1 ulp is 2**-7 relative.
ELEMENTWISE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close(actual, expected, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_mixes_rope_rows_on_strided_views(dtype):
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_q_heads, num_kv_heads, head_dim = 12, 9, 3, 64
    inv_freq, factors = rope_rows(3, head_dim, "cpu", gen)
    # q and k are views into one fused projection output, as the model produces them.
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim:(num_q_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 5000, (num_tokens,), generator=gen)
    seq_index = torch.tensor([0] * 5 + [2] * 4 + [1] * 3, dtype=torch.int32)
    q_ref, k_ref = q.clone(), k.clone()
    apply_rotary_reference(q_ref, k_ref, positions, seq_index, inv_freq, factors)
    apply_rotary_triton(q, k, positions, seq_index, inv_freq, factors)
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_scatters_by_slot_and_skips_padding(dtype):
    gen = torch.Generator().manual_seed(1)
    num_blocks, page_size, num_kv_heads, head_dim = 6, 16, 3, 64
    kv = torch.randn(10, 2, num_kv_heads, head_dim, generator=gen).to(dtype)
    k, v = kv[:, 0], kv[:, 1]
    slot_mapping = torch.randperm(num_blocks * page_size, generator=gen)[:10]
    slot_mapping[4] = -1
    caches = [torch.randn(num_blocks, page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
              for _ in range(2)]
    k_ref, v_ref = caches[0].clone(), caches[1].clone()
    write_kv_reference(k, v, k_ref, v_ref, slot_mapping)
    write_kv_triton(k, v, caches[0], caches[1], slot_mapping)
    assert torch.equal(caches[0], k_ref)
    assert torch.equal(caches[1], v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rerotate_moves_keys_across_rope_rows_in_every_layer(dtype):
    gen = torch.Generator().manual_seed(2)
    num_layers, num_blocks, page_size, num_kv_heads, head_dim = 2, 5, 16, 3, 64
    # k_cache is the key half of a [layers, 2, ...] KV tensor: not contiguous.
    kv = torch.randn(num_layers, 2, num_blocks, page_size, num_kv_heads, head_dim, generator=gen)
    k_cache = kv.to(dtype)[:, 0]
    slots = torch.randperm(num_blocks * page_size, generator=gen)[:7]
    old_positions = torch.randint(0, 20000, (7,), generator=gen)
    new_positions = old_positions - torch.randint(0, 4000, (7,), generator=gen)
    old_inv_freq, old_factors = rope_rows(7, head_dim, "cpu", gen)
    new_inv_freq, new_factors = rope_rows(7, head_dim, "cpu", gen)
    expected = k_cache.clone()
    rows = table_rows(old_inv_freq, new_inv_freq, old_factors, new_factors)
    rerotate_keys_reference(expected, slots, old_positions, new_positions, *rows)
    rerotate_keys_triton(k_cache, slots, old_positions, new_positions, *rows)
    assert_close(k_cache, expected, dtype)


def test_rerotate_on_head_major_keys_with_broadcast_rows():
    """Retrieval's rotate-back (a head-major [layers, heads, tokens, dim] buffer seen as blocks,
    turned to the row of a zero inv_freq), with the rows broadcast (stride 0) over the slots: the
    kernel once read such a broadcast vector as if it were whole (garbage on the GPU). The engine
    uploads dense rows; broadcast ones must work as well."""
    gen = torch.Generator().manual_seed(4)
    num_layers, num_kv_heads, capacity, head_dim, page_size = 2, 3, 64, 64, 16
    keys = torch.randn(num_layers, num_kv_heads, capacity, head_dim, generator=gen)
    view = keys.view(num_layers, num_kv_heads, capacity // page_size, page_size, head_dim).permute(0, 2, 3, 1, 4)
    n = 20
    slots = torch.arange(16, 16 + n)
    positions = torch.arange(3000, 3000 + n)
    inv_freq, _ = rope_rows(1, head_dim, "cpu", gen)
    rows = torch.tensor([0, 1])
    args = (slots, positions, positions, rows[0].expand(n), rows[1].expand(n),
            torch.cat([inv_freq, torch.zeros_like(inv_freq)]), torch.tensor([1.3, 1.0]))
    original, expected = keys.clone(), keys.clone()
    rerotate_keys_reference(expected.view(view.shape[:1] + (num_kv_heads, capacity // page_size, page_size, head_dim))
                            .permute(0, 2, 3, 1, 4), *args)
    rerotate_keys_triton(view, *args)
    assert_close(keys, expected, torch.float32)
    # The slots given turned; the others stayed.
    assert not torch.allclose(keys[:, :, 16 : 16 + n], original[:, :, 16 : 16 + n])
    assert torch.equal(keys[:, :, :16], original[:, :, :16]) and torch.equal(keys[:, :, 36:], original[:, :, 36:])


# (seq_len, query_len) per sequence: a full prefill, a chunk after a cached prefix, decodes
# with partial and exactly full last blocks, and a sequence with no queries this step.
MIXED = [(37, 37), (50, 13), (29, 1), (32, 1), (20, 0)]
DECODES = [(70, 1), (5, 1), (131, 1)]

ATTENTION_CASES = [
    # (name, sequences, q heads, kv heads, head dim, page size, config or None for default)
    ("mixed-default", MIXED, 4, 1, 64, 16, None),
    ("mixed-gqa3-small-tiles", MIXED, 6, 2, 64, 16, AttentionConfig(16, 16, 1, 4, 1)),
    ("mixed-gqa1-split", MIXED, 2, 2, 64, 32, AttentionConfig(16, 32, 2, 4, 1)),
    ("decode-gqa4-split", DECODES, 8, 2, 128, 16, AttentionConfig(16, 16, 4, 4, 1)),
    ("decode-gqa3-default", DECODES, 6, 2, 64, 64, None),
    ("one-sequence-chunk-split", [(45, 20)], 4, 1, 64, 16, AttentionConfig(32, 16, 2, 4, 1)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,sequences,num_q_heads,num_kv_heads,head_dim,page_size,config",
                         ATTENTION_CASES, ids=[case[0] for case in ATTENTION_CASES])
def test_paged_attention_matches_reference(dtype, name, sequences, num_q_heads, num_kv_heads,
                                           head_dim, page_size, config):
    gen = torch.Generator().manual_seed(3)
    seq_lens = [s for s, _ in sequences]
    query_lens = [n for _, n in sequences]
    case = paged_case(seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page_size,
                      dtype, "cpu", gen)
    out = paged_attention_triton(**case, max_query_len=max(query_lens),
                                 max_seq_len=max(seq_lens), config=config)
    fp32_case = {key: value.float() if value.is_floating_point() else value
                 for key, value in case.items() if key != "scale"}
    expected = paged_attention_reference(**fp32_case, scale=case["scale"])
    assert_close(out, expected, dtype)


# Decodes first, then prefill chunks (and an idle sequence), as the runner orders a mixed step.
DECODES_THEN_CHUNKS = [(70, 1), (5, 1), (131, 1), (37, 37), (50, 13), (20, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_mixed_step_attends_decodes_and_chunks_in_separate_launches(dtype, with_bias):
    """num_decode_seqs gives the leading decodes a launch with decode tiles (and split keys)
    and the chunks one of their own, starting at sequence 3: same result as one launch."""
    gen = torch.Generator().manual_seed(7)
    seq_lens = [s for s, _ in DECODES_THEN_CHUNKS]
    query_lens = [n for _, n in DECODES_THEN_CHUNKS]
    case = paged_case(seq_lens, query_lens, 8, 2, 64, 16, dtype, "cpu", gen)
    slot_bias = torch.rand(case["k_cache"].shape[:2], generator=gen) if with_bias else None
    split = paged_attention_triton(**case, max_query_len=max(query_lens), max_seq_len=4096,
                                   slot_bias=slot_bias, num_decode_seqs=3)
    fp32_case = {key: value.float() if value.is_floating_point() else value
                 for key, value in case.items() if key != "scale"}
    expected = paged_attention_reference(**fp32_case, scale=case["scale"], slot_bias=slot_bias)
    assert_close(split, expected, dtype)
    whole = paged_attention_triton(**case, max_query_len=max(query_lens), max_seq_len=4096,
                                   slot_bias=slot_bias)
    assert_close(split, whole.float(), dtype)


# Enough sequences that tile numbering's slack (a sequence's tiles start at
# query_start // BLOCK_Q + s) pushes the last ones past num_seqs tiles.
MANY_DECODES = [(20 + 7 * i, 1) for i in range(13)]
TWO_FULL_TILE_CHUNKS = [(30, 8), (16, 8), (9, 1)]


@pytest.mark.parametrize("name,sequences,config", [
    ("13-decodes-default", MANY_DECODES, None),
    ("chunks-filling-whole-tiles", TWO_FULL_TILE_CHUNKS, AttentionConfig(16, 16, 1, 4, 1)),
], ids=["13-decodes-default", "chunks-filling-whole-tiles"])
def test_every_sequence_gets_its_tiles(name, sequences, config):
    gen = torch.Generator().manual_seed(9)
    seq_lens = [s for s, _ in sequences]
    query_lens = [n for _, n in sequences]
    case = paged_case(seq_lens, query_lens, 8, 2, 64, 16, torch.float32, "cpu", gen)
    out = paged_attention_triton(**case, max_query_len=max(query_lens), max_seq_len=max(seq_lens), config=config)
    expected = paged_attention_reference(**case)
    assert_close(out, expected, torch.float32)


def test_short_chunks_after_decodes_beside_a_long_sequence_do_not_split_keys():
    """Chunks of 2 queries x 4 heads fit decode tiles, and a 2.1k-token sequence would have
    them split their keys; a launch that starts after the decodes must not (its partials
    would be indexed from token 0)."""
    gen = torch.Generator().manual_seed(13)
    sequences = [(70, 1), (2100, 2), (40, 2)]
    seq_lens = [s for s, _ in sequences]
    query_lens = [n for _, n in sequences]
    case = paged_case(seq_lens, query_lens, 8, 2, 64, 16, torch.float32, "cpu", gen)
    out = paged_attention_triton(**case, max_query_len=2, max_seq_len=2100, num_decode_seqs=1)
    assert_close(out, paged_attention_reference(**case), torch.float32)


BIAS_CASES = [case for case in ATTENTION_CASES
              if case[0] in ("mixed-gqa3-small-tiles", "decode-gqa4-split", "one-sequence-chunk-split")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,sequences,num_q_heads,num_kv_heads,head_dim,page_size,config",
                         BIAS_CASES, ids=[case[0] for case in BIAS_CASES])
def test_paged_attention_with_slot_bias_matches_reference(dtype, name, sequences, num_q_heads,
                                                          num_kv_heads, head_dim, page_size, config):
    """Landmark slots: a logit bias per cache slot, and whole pages of empty (-inf) slots."""
    gen = torch.Generator().manual_seed(5)
    seq_lens = [s for s, _ in sequences]
    query_lens = [n for _, n in sequences]
    case = paged_case(seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page_size,
                      dtype, "cpu", gen)
    slot_bias = torch.rand(case["k_cache"].shape[:2], generator=gen) * 3
    for row, seq_len in zip(case["block_tables"], seq_lens):
        if seq_len > page_size:
            slot_bias[row[1].long()] = float("-inf")
    out = paged_attention_triton(**case, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
                                 config=config, slot_bias=slot_bias)
    fp32_case = {key: value.float() if value.is_floating_point() else value
                 for key, value in case.items() if key != "scale"}
    expected = paged_attention_reference(**fp32_case, scale=case["scale"], slot_bias=slot_bias)
    assert_close(out, expected, dtype)


def test_cpu_dispatch_never_imports_triton():
    code = ("import sys, torch; from ropeway import kernels; "
            "q = torch.randn(1, 1, 4); kernels.apply_rotary(q, q.clone(), torch.zeros(1), "
            "torch.zeros(1, dtype=torch.int32), torch.ones(1, 2), torch.ones(1)); "
            "cache = torch.zeros(1, 4, 1, 4); kernels.rotary_write_kv(q, q.clone(), q.clone(), "
            "cache, cache.clone(), torch.zeros(1, dtype=torch.long), torch.zeros(1), "
            "torch.zeros(1, dtype=torch.int32), torch.ones(1, 2), torch.ones(1)); "
            "kernels.silu_mul(torch.randn(2, 8)); "
            "assert 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_reference(dtype):
    from ropeway.kernels.rms_norm import add_rms_norm_reference, rms_norm_reference
    from ropeway.kernels.triton_rms_norm import add_rms_norm_triton, rms_norm_triton

    gen = torch.Generator().manual_seed(0)
    # 576 is the default model's hidden size: not a power of two, so the tail is masked.
    residual = torch.randn(5, 576, generator=gen).to(dtype)
    delta = torch.randn(5, 576, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(576, generator=gen)).to(dtype)
    assert_close(rms_norm_triton(residual, weight, 1e-5), rms_norm_reference(residual, weight, 1e-5), dtype)
    residual_ref = residual.clone()
    out = add_rms_norm_triton(delta, residual, weight, 1e-5)
    expected = add_rms_norm_reference(delta, residual_ref, weight, 1e-5)
    assert_close(residual, residual_ref, dtype)
    assert_close(out, expected, dtype)


def fused_qkv_views(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, gen):
    """q, k, v as the model makes them: strided views into one fused projection output."""
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen).to(dtype)
    q = qkv[:, :q_size].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    return qkv, q, k, v


ROTARY_WRITE_KV_CASES = [
    # (name, tokens, q heads, kv heads, head dim, page size)
    ("gqa3-d64", 12, 9, 3, 64, 16),
    ("gqa4-d128", 6, 8, 2, 128, 16),
    ("mha-d96-page8", 7, 4, 4, 96, 8),   # head dim 96: a half of 48 masked in a 64 tile
]


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("name,num_tokens,num_q_heads,num_kv_heads,head_dim,page_size",
                         ROTARY_WRITE_KV_CASES, ids=[case[0] for case in ROTARY_WRITE_KV_CASES])
def test_rotary_write_kv_matches_rotary_then_write(dtype, name, num_tokens, num_q_heads,
                                                   num_kv_heads, head_dim, page_size):
    gen = torch.Generator().manual_seed(7)
    qkv, q, k, v = fused_qkv_views(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, gen)
    # Three sequences with different RoPE rows and attention factors, in runs of tokens.
    inv_freq, factors = rope_rows(3, head_dim, "cpu", gen)
    seq_index = torch.tensor([(3 * t) // num_tokens for t in range(num_tokens)], dtype=torch.int32)
    seq_index = (seq_index + 1) % 3
    positions = torch.randint(0, 5000, (num_tokens,), generator=gen)
    # The KV pair of one layer of a [layers, 2, blocks, page, heads, dim] cache: strided.
    num_blocks = 5
    kv = torch.randn(2, 2, num_blocks, page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    k_cache, v_cache = kv[1, 0], kv[1, 1]
    slot_mapping = torch.randperm(num_blocks * page_size, generator=gen)[:num_tokens]
    slot_mapping[1] = -1                  # padding rows, as CUDA-graph filler tokens are
    slot_mapping[num_tokens - 1] = -1
    written = torch.zeros(num_blocks * page_size, dtype=torch.bool)
    written[slot_mapping[slot_mapping >= 0]] = True
    kv_before = kv.clone()

    qkv_ref, q_ref, k_ref, v_ref = fused_qkv_views(num_tokens, num_q_heads, num_kv_heads,
                                                   head_dim, dtype, torch.Generator())
    qkv_ref.copy_(qkv)
    kv_ref = kv.clone()
    rotary_write_kv_reference(q_ref, k_ref, v_ref, kv_ref[1, 0], kv_ref[1, 1], slot_mapping,
                              positions, seq_index, inv_freq, factors)
    rotary_write_kv_triton(q, k, v, k_cache, v_cache, slot_mapping, positions, seq_index,
                           inv_freq, factors)

    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)
    assert torch.equal(v, v_ref)
    assert_close(k_cache, kv_ref[1, 0], dtype)
    # Values are copied bit for bit; the cache holds exactly the keys left in k.
    assert torch.equal(v_cache, kv_ref[1, 1])
    flat = (-1, num_kv_heads, head_dim)
    keep = slot_mapping >= 0
    assert torch.equal(k_cache.reshape(flat)[slot_mapping[keep]], k[keep])
    # Slots no token writes (padding included) and the other layer stay untouched.
    assert torch.equal(k_cache.reshape(flat)[~written], kv_before[1, 0].reshape(flat)[~written])
    assert torch.equal(v_cache.reshape(flat)[~written], kv_before[1, 1].reshape(flat)[~written])
    assert torch.equal(kv[0], kv_before[0])


def test_rotary_write_kv_keeps_the_captured_queries_before_rope():
    """Retrieval's query capture: tokens with a row store their queries before RoPE there (one
    layer's rows of a [layers, rows, heads, dim] buffer), in the same launch; on CPU the
    dispatcher does the same."""
    from ropeway.kernels import rotary_write_kv
    gen = torch.Generator().manual_seed(11)
    num_tokens, num_q_heads, num_kv_heads, head_dim, page_size = 10, 9, 3, 64, 16
    for implementation in (rotary_write_kv_triton, rotary_write_kv):
        qkv, q, k, v = fused_qkv_views(num_tokens, num_q_heads, num_kv_heads, head_dim, torch.float32, gen)
        q_before = q.clone()
        inv_freq, factors = rope_rows(2, head_dim, "cpu", gen)
        seq_index = (torch.arange(num_tokens) >= 4).to(torch.int32)
        positions = torch.randint(0, 5000, (num_tokens,), generator=gen)
        kv = torch.zeros(2, 3, page_size, num_kv_heads, head_dim)
        slot_mapping = torch.randperm(3 * page_size, generator=gen)[:num_tokens]
        buffer = torch.full((2, 4, num_q_heads, head_dim), 7.0)
        capture_rows = torch.full((num_tokens,), -1, dtype=torch.int64)
        capture_rows[[0, 5, 9]] = torch.tensor([2, 0, 1])
        implementation(q, k, v, kv[0], kv[1], slot_mapping, positions, seq_index, inv_freq, factors,
                       capture=buffer[1], capture_rows=capture_rows)
        assert torch.equal(buffer[1, :3], q_before[[5, 9, 0]])
        assert (buffer[1, 3] == 7.0).all() and (buffer[0] == 7.0).all()
        assert not torch.allclose(q, q_before)  # q itself was still rotated


BLOCK_MAX_LOGITS_CASES = [
    # (name, layers, rows, q heads, kv heads, dim, blocks, block size)
    ("gqa3-d64", 2, 5, 9, 3, 64, 11, 16),        # 15 rows per KV head: one 16-row tile
    ("gqa3-many-rows", 1, 24, 9, 3, 64, 9, 16),  # 72 rows per KV head: two tiles
    ("mha-d96-page8", 2, 4, 4, 4, 96, 21, 8),    # head dim 96 masked in a 128 tile
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,layers,rows,num_heads,num_kv_heads,head_dim,blocks,block_size", BLOCK_MAX_LOGITS_CASES,
                         ids=[case[0] for case in BLOCK_MAX_LOGITS_CASES])
def test_block_max_logits_matches_reference(dtype, name, layers, rows, num_heads, num_kv_heads, head_dim, blocks,
                                            block_size):
    from ropeway.kernels.block_max_logits import block_max_logits_reference
    from ropeway.kernels.triton_block_max_logits import block_max_logits_triton
    gen = torch.Generator().manual_seed(5)
    # Queries as a slice of a wider capture, keys the filled part of a grown archive.
    queries = torch.randn(layers, rows + 3, num_heads, head_dim, generator=gen).to(dtype)[:, 2 : 2 + rows]
    keys = torch.randn(layers, num_kv_heads, (blocks + 5) * block_size, head_dim, generator=gen).to(dtype)
    keys = keys[:, :, : blocks * block_size]
    expected = block_max_logits_reference(queries, keys, block_size, 0.125)
    actual = block_max_logits_triton(queries, keys, block_size, 0.125)
    assert actual.shape == (layers, num_kv_heads, rows, num_heads // num_kv_heads, blocks)
    assert_close(actual, expected, dtype)
    # The max is each block's own: the best key of block 3 of layer 0, head 0, row 0 decides it.
    plain = (queries[0, 0, 0].double() @ keys[0, 0, 3 * block_size : 4 * block_size].double().T).max() * 0.125
    assert abs(actual[0, 0, 0, 0, 3].item() - plain.item()) < TOLERANCE[dtype] * 8


@pytest.mark.parametrize("layers,kv_heads,rows,queries,group,blocks", [
    (2, 3, 7, 4, 3, 45),    # the default model's grouping; 45 blocks over two tiles; a baseline of 3 rows
    (1, 4, 5, 5, 1, 300),   # MHA, no baseline (no division); rows of several stats tiles
    (3, 1, 2, 1, 8, 7),     # one KV head, a group of 8, one scoring and one baseline row
    (1, 8, 12, 6, 8, 37),   # 8 KV heads of 8: a tile of that many rows takes fewer blocks a program
    (1, 3, 80, 64, 3, 21),  # a question's 64 scoring rows and 16 baseline rows (QUESTION_QUERY_TOKENS)
])
def test_block_relevance_matches_reference(layers, kv_heads, rows, queries, group, blocks):
    from ropeway.kernels.block_relevance import block_relevance_reference
    from ropeway.kernels.triton_block_relevance import block_relevance_triton
    gen = torch.Generator().manual_seed(layers * 100 + blocks)
    best = torch.randn(layers, kv_heads, rows, group, blocks, generator=gen) * 4
    best[0, 0, 0, 0, blocks // 2] += 12  # one block far above the rest in one row
    floor = 0.1 * kv_heads * group / blocks
    expected = block_relevance_reference(best, queries, floor, 1 / layers)
    actual = block_relevance_triton(best, queries, floor, 1 / layers)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    assert actual.argmax() == expected.argmax()


def test_rotary_write_kv_with_only_padding_writes_nothing():
    gen = torch.Generator().manual_seed(8)
    _, q, k, v = fused_qkv_views(4, 4, 2, 64, torch.float32, gen)
    inv_freq, factors = rope_rows(2, 64, "cpu", gen)
    positions = torch.arange(4)
    seq_index = torch.tensor([0, 1, 0, 1], dtype=torch.int32)
    k_cache = torch.randn(3, 16, 2, 64, generator=gen)
    v_cache = torch.randn(3, 16, 2, 64, generator=gen)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q_ref, k_ref = q.clone(), k.clone()
    apply_rotary_reference(q_ref, k_ref, positions, seq_index, inv_freq, factors)
    rotary_write_kv_triton(q, k, v, k_cache, v_cache, torch.full((4,), -1), positions, seq_index,
                           inv_freq, factors)
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)
    # q and k are rotated all the same, as apply_rotary does for padding rows.
    assert_close(q, q_ref, torch.float32)
    assert_close(k, k_ref, torch.float32)


SILU_MUL_CASES = [
    # (name, tokens, intermediate, block): 300 and 1536 are not multiples of the block, so
    # the last column block is masked; block None takes the default.
    ("tail-masked", 5, 300, 128),
    ("default-block", 3, 1536, None),
    ("one-block", 4, 64, 1024),
]


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("name,num_tokens,intermediate,block", SILU_MUL_CASES,
                         ids=[case[0] for case in SILU_MUL_CASES])
def test_silu_mul_matches_reference(dtype, name, num_tokens, intermediate, block):
    gen = torch.Generator().manual_seed(9)
    gate_up = (3 * torch.randn(num_tokens, 2 * intermediate, generator=gen)).to(dtype)
    out = silu_mul_triton(gate_up) if block is None else silu_mul_triton(gate_up, block=block)
    assert out.shape == (num_tokens, intermediate) and out.dtype == dtype
    # Against the fp32 value: the reference rounds twice in low precision, the kernel once.
    expected = silu_mul_reference(gate_up.float())
    assert_close(out, expected, dtype)
    assert_close(out, silu_mul_reference(gate_up), dtype)


def test_silu_mul_on_row_strided_input():
    gen = torch.Generator().manual_seed(10)
    wide = torch.randn(6, 2 * 200 + 40, generator=gen)
    gate_up = wide[:, 40:]                # rows 440 apart, columns contiguous
    torch.testing.assert_close(silu_mul_triton(gate_up, block=128), silu_mul_reference(gate_up),
                               atol=1e-5, rtol=1e-5)


def test_silu_mul_with_no_tokens():
    assert silu_mul_triton(torch.empty(0, 128)).shape == (0, 64)


# (name, N, K, BLOCK_N, BLOCK_K): N and K off the blocks mask the last column block and the
# last K slice; "one-slice" runs the loop once (the prefetch of slice 2 is all masked).
GEMV_CASES = [
    ("tails", 40, 100, 16, 32),
    ("one-slice", 24, 64, 8, 64),
    ("many-slices", 16, 256, 16, 32),
]


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("name,n,k,block_n,block_k", GEMV_CASES, ids=[case[0] for case in GEMV_CASES])
def test_gemv_matches_linear(dtype, name, n, k, block_n, block_k):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, k, generator=gen).to(dtype)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    config = (block_n, block_k, 4)
    expected = torch.nn.functional.linear(x.float(), weight.float())
    out = gemv_triton(x, weight, config=config)
    assert out.shape == (1, n) and out.dtype == dtype
    # Sums of k products: the tolerance scales with their size.
    tol = TOLERANCE[dtype] * k ** 0.5
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=TOLERANCE[dtype])
    torch.testing.assert_close(gemv_triton(x, weight, bias, config=config).float(),
                               expected + bias.float(), atol=tol, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_gemv_silu_mul_matches_linear_then_silu_mul(dtype):
    gen = torch.Generator().manual_seed(12)
    intermediate, k = 40, 100
    x = torch.randn(1, k, generator=gen).to(dtype)
    gate_up = (torch.randn(2 * intermediate, k, generator=gen) / 4).to(dtype)
    out = gemv_triton(x, gate_up, silu_mul=True, config=(16, 32, 4))
    assert out.shape == (1, intermediate) and out.dtype == dtype
    # The kernel rounds gate and up to the dtype before the activation, as linear + silu_mul does.
    expected = silu_mul_reference(torch.nn.functional.linear(x.float(), gate_up.float()).to(dtype).float())
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype] * 10, rtol=TOLERANCE[dtype] * 2)


def test_gemv_reads_a_row_of_a_wider_buffer():
    """The model hands it views: one row of a [T, K] buffer, here the second."""
    gen = torch.Generator().manual_seed(13)
    rows = torch.randn(3, 64, generator=gen)
    weight = torch.randn(24, 64, generator=gen)
    torch.testing.assert_close(gemv_triton(rows[1:2], weight, config=(8, 32, 4)),
                               torch.nn.functional.linear(rows[1:2], weight), atol=1e-4, rtol=1e-5)


def attention_with_lse(q, k, v, causal, scale):
    """The reference for cuDNN's call in cudnn_attention: q [T, H, D], k/v [L, Hkv, D] ->
    (out [1, H, T, D], natural-log lse [1, H, T, 1]); causal is the square, top-left mask."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("thd,lhd->htl", q.double(), k) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[1:], dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("htl,lhd->htd", scores.softmax(-1), v)
    return out[None].to(q.dtype), scores.logsumexp(-1)[None, ..., None].float()


@pytest.mark.parametrize("context_len,num_queries", [
    (0, 300),      # the chunk's own square only, its queries padded to 512
    (700, 40),     # a prefix shorter than a key granule: it joins the causal part, in front
    (2048, 256),   # a prefix of whole granules, nothing padded
    (2500, 300),   # both: 2048 keys in the prefix call, 452 in front of the causal part
])
def test_long_chunk_split_pads_and_merges_to_paged_attention(context_len, num_queries):
    """cudnn_attention's two calls (prefix, own causal square) over gathered pages, with the
    shapes rounded to granules, merged by log-sum-exp: the same as paged attention. A plain
    torch attention stands in for cuDNN (CPU); the merge is the Triton kernel."""
    from ropeway.kernels.cudnn_attention import attend_long_chunk

    gen = torch.Generator().manual_seed(21)
    seq_len = context_len + num_queries
    case = paged_case([seq_len], [num_queries], 4, 2, 16, 16, torch.float32, "cpu", gen)
    out = torch.full_like(case["q"], float("nan"))
    assert attend_long_chunk(case["q"], case["k_cache"], case["v_cache"], case["block_tables"][0],
                             context_len, case["scale"], out, attend=attention_with_lse)
    assert_close(out, paged_attention_reference(**case), torch.float32)


def test_filtered_draw_matches_reference_across_chunks():
    """The top-p cut search and the race, each row split over several programs: the same
    tokens as the torch reference, with ties, -inf entries, rows without a top-p, a row whose
    kept set is one token, and chunks of several tiles; rows settled by the first race and rows
    that need the search."""
    from ropeway.engine.random_stream import stream_keys
    from ropeway.kernels.sampling import filtered_draw_reference, top_p_cut_reference
    from ropeway.kernels.triton_sampling import filtered_draw_triton

    generator = torch.Generator().manual_seed(0)
    rows, vocab = 12, 1500
    scaled = torch.randn(rows, vocab, generator=generator) * 2
    scaled[::3, :40] = torch.randint(0, 3, (4, 40), generator=generator).float() + 4.0  # tied heads
    scaled[1::4, 1200:] = float("-inf")  # suppressed tokens (min_tokens, bans)
    scaled[5, 700] = 30.0  # one token holds all the mass
    cut = torch.where(torch.arange(rows) % 2 == 0, float("-inf"), torch.randn(rows, generator=generator) + 2.0)
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.3, 0.97, 0.8] * 2)
    row_max = scaled.amax(dim=-1)
    keys = torch.from_numpy(stream_keys(list(range(rows)), [4] * rows))
    expected = filtered_draw_reference(scaled, cut, top_p, row_max, keys, search=True)
    drawn = filtered_draw_triton(scaled, cut, top_p, row_max, keys, search=True, chunk=512, block=256)
    assert torch.equal(drawn, expected)
    assert drawn[5].item() == 700
    searched_cut = top_p_cut_reference(scaled, cut, top_p, row_max)
    assert (scaled[torch.arange(rows), expected] >= searched_cut).all()
    no_search = filtered_draw_reference(scaled, cut, top_p, row_max, keys, search=False)
    assert torch.equal(filtered_draw_triton(scaled, cut, top_p, row_max, keys, search=False, chunk=512,
                                            block=256), no_search)
    assert not torch.equal(expected, no_search)
    # Both ways to a top-p row's token are taken: the unfiltered race's winner inside the top-p
    # set (it stands), and outside it (the search runs).
    inside = scaled[torch.arange(rows), no_search] >= searched_cut
    assert inside[top_p < 1].any() and not inside[top_p < 1].all()
    # The race over several tiles of a chunk (the default chunks of a large batch).
    assert torch.equal(filtered_draw_triton(scaled[:2], cut[:2], top_p[:2], row_max[:2], keys[:2], search=False,
                                            chunk=512, block=64), no_search[:2])


def _draw_case(rows, vocab, top_p, seed, step=4):
    from ropeway.engine.random_stream import stream_keys

    generator = torch.Generator().manual_seed(seed)
    scaled = torch.randn(rows, vocab, generator=generator) * 1.5
    cut = torch.full((rows,), float("-inf"))
    top_p = torch.as_tensor(top_p, dtype=torch.float32)
    keys = torch.from_numpy(stream_keys(list(range(100, 100 + rows)), [step] * rows))
    return scaled, cut, top_p, scaled.amax(dim=-1), keys


def _unsettled(scaled, cut, top_p, row_max, keys):
    """Rows whose unfiltered race winner lies outside the top-p set: those the search must redo."""
    from ropeway.kernels.sampling import filtered_draw_reference, top_p_cut_reference

    no_search = filtered_draw_reference(scaled, cut, top_p, row_max, keys, search=False)
    searched_cut = top_p_cut_reference(scaled, cut, top_p, row_max)
    return scaled[torch.arange(scaled.shape[0]), no_search] < searched_cut


@pytest.mark.parametrize("chunk, search_chunk, programs", [
    (2048, 256, 7),    # one first-race chunk per row; items split unevenly, programs crossing rows
    (512, 512, 64),    # more programs than items: some take none
    (256, 1024, 2),    # many first-race chunks; two programs walk every item
])
def test_filtered_draw_compacts_the_few_unsettled_rows(chunk, search_chunk, programs):
    """Most rows settled by the first race (or without a top-p), a few searched: the search passes
    and second race run on the unsettled rows' work items only, with bounds and partial sums
    indexed by row, and every token is the reference's."""
    from ropeway.kernels.sampling import filtered_draw_reference
    from ropeway.kernels.triton_sampling import filtered_draw_triton

    rows, vocab = 10, 1800
    case = _draw_case(rows, vocab, [0.95, 1.0, 0.9, 0.95, 1.0, 0.5, 0.95, 0.3, 1.0, 0.8], seed=1)
    unsettled = _unsettled(*case)
    assert 0 < int(unsettled.sum()) < int((case[2] < 1).sum())
    expected = filtered_draw_reference(*case, search=True)
    drawn = filtered_draw_triton(*case, search=True, chunk=chunk, block=64, search_chunk=search_chunk,
                                 programs=programs)
    assert torch.equal(drawn, expected)
    # The searched rows' tokens changed: the second race's result reaches the output.
    no_search = filtered_draw_reference(*case, search=False)
    assert not torch.equal(expected[unsettled], no_search[unsettled])


def test_filtered_draw_when_every_row_is_unsettled():
    """Every row's first winner outside its small top-p set: all rows' work items are shared out,
    several rows to a program, and the tokens are the reference's."""
    from ropeway.kernels.sampling import filtered_draw_reference
    from ropeway.kernels.triton_sampling import filtered_draw_triton

    rows, vocab = 6, 1000
    case = _draw_case(rows, vocab, [0.05] * rows, seed=2)
    assert _unsettled(*case).all()
    expected = filtered_draw_reference(*case, search=True)
    for programs in (3, 1):
        drawn = filtered_draw_triton(*case, search=True, chunk=512, block=64, search_chunk=256, programs=programs)
        assert torch.equal(drawn, expected)


@triton.jit
def _hash_kernel(keys_ptr, out_ptr, start, BLOCK: tl.constexpr):
    tokens = start + tl.arange(0, BLOCK)
    first = tl.load(keys_ptr).to(tl.uint32)
    second = tl.load(keys_ptr + 1).to(tl.uint32)
    out = _mix32(_mix32(tokens.to(tl.uint32) ^ first) ^ second)
    tl.store(out_ptr + tl.arange(0, BLOCK), out.to(tl.int64))


def test_race_hash_matches_the_reference_bits_on_high_keys():
    """The kernel's uint32 hash against the reference's int64 one, on keys with the top bit set and
    tokens past 2^16 (the products' wrapping is where they could differ)."""
    from ropeway.kernels.sampling import token_bits

    keys = torch.tensor([0xFFFFFFFF, 0x80000001], dtype=torch.int64)
    out = torch.empty(64, dtype=torch.int64)
    _hash_kernel[(1,)](keys, out, 128200, BLOCK=64)
    tokens = torch.arange(128200, 128264)
    expected = token_bits(tokens, keys[0], keys[1])
    assert torch.equal(out, expected)
    assert (expected >= 1 << 31).any()  # the top bit comes through unsigned


@pytest.mark.parametrize("target_chunk, k", [(256, 20), (128, 5), (1024, 3), (256, 0)])
def test_logprob_terms_give_log_softmax_and_its_top(target_chunk, k):
    """(x - row max) - log_sum equals log_softmax to fp32 rounding, and the top k logits and tokens
    are torch.topk's, on a strided view (rows of a wider buffer), with -inf entries, a chunk of only
    -inf, the maximum in a late chunk, tied values, and a row with fewer than k finite logits."""
    from ropeway.kernels.triton_sampling import logprob_terms_triton

    generator = torch.Generator().manual_seed(7)
    buffer = torch.randn(6, 1100, generator=generator) * 4
    logits = buffer[:, :1000]
    logits[1, :300] = float("-inf")   # grammar-masked tokens, whole chunks of them
    logits[2, 900] = 40.0             # the maximum far from the first chunk
    logits[3] = logits[3] * 0.01      # a flat row: the sum is large
    logits[4, [10, 500, 999]] = 50.0  # a three-way tie at the top, across chunks
    logits[5, 3:] = float("-inf")     # three tokens allowed
    row_max, log_sum, top_values, top_ids = logprob_terms_triton(logits, k, target_chunk=target_chunk)
    assert torch.equal(row_max, logits.amax(-1))
    expected = logits.log_softmax(-1)
    got = (logits - row_max[:, None]) - log_sum[:, None]
    finite = expected.isfinite()
    assert torch.equal(finite, got.isfinite())
    torch.testing.assert_close(got[finite], expected[finite], rtol=0, atol=4e-6)
    values, ids = logits.topk(k, dim=-1)
    assert top_values.shape == top_ids.shape == (6, k)
    assert torch.equal(top_values, values)
    assert torch.equal(logits.gather(1, top_ids), top_values)  # each token holds its value
    untied = [0, 1, 2, 3]
    assert torch.equal(top_ids[untied], ids[untied])
    if k >= 3:
        assert sorted(top_ids[4, :3].tolist()) == [10, 500, 999]
        assert top_ids[5, :3].tolist() == ids[5, :3].tolist()
    assert all(len(set(row)) == k for row in top_ids.tolist())  # distinct tokens, -inf ones too


def test_logprob_terms_on_a_vocabulary_too_small_for_k_per_chunk():
    """Chunks shorter than k (a toy vocabulary): the top k come from torch.topk, the log-sum-exp still
    from the kernel."""
    from ropeway.kernels.triton_sampling import logprob_terms_triton

    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(2)) * 3
    row_max, log_sum, values, ids = logprob_terms_triton(logits, 20, target_chunk=8)
    expected_values, expected_ids = logits.topk(20, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(ids, expected_ids)
    torch.testing.assert_close((values - row_max[:, None]) - log_sum[:, None],
                               logits.log_softmax(-1).topk(20, dim=-1).values, rtol=0, atol=4e-6)


def test_race_skips_tiles_without_changing_the_winner():
    """The race skips tiles whose bound (largest kept value minus ln(-ln u) of the largest kept hash)
    can't reach the chunk's best or the row's floor: peaked rows (the floor skips nearly every tile),
    flat rows (the running best does), large offsets (the margin scales with the row maximum),
    a small kept set, and the winner in the last tile of its chunk; the reference's tokens in all."""
    from ropeway.engine.random_stream import stream_keys
    from ropeway.kernels.sampling import filtered_draw_reference
    from ropeway.kernels.triton_sampling import filtered_draw_triton

    generator = torch.Generator().manual_seed(11)
    rows, vocab = 8, 1536
    scaled = torch.randn(rows, vocab, generator=generator)
    scaled[0] *= 20.0                   # peaked: a few tokens within 23 of the maximum
    scaled[1] *= 0.01                   # flat: every token near the maximum
    scaled[2] = scaled[2] * 3 - 1.0e4   # far from zero
    scaled[3] = scaled[3] * 3 + 5.0e3
    scaled[4, 1535] = 40.0              # the winner in the last tile, after tiles far below it
    scaled[5, :1400] = float("-inf")    # only the last tiles keep anything
    scaled[6] *= 8.0
    row_max = scaled.amax(dim=-1)
    cut = torch.full((rows,), float("-inf"))
    cut[6] = row_max[6] - 6.0           # a small kept set (min-p)
    cut[7] = row_max[7]                 # the maximum alone
    top_p = torch.tensor([0.9, 0.9, 0.7, 1.0, 0.5, 0.95, 0.8, 0.9])
    keys = torch.from_numpy(stream_keys(list(range(rows)), [2] * rows))
    for search in (False, True):
        expected = filtered_draw_reference(scaled, cut, top_p, row_max, keys, search=search)
        for chunk in (256, 2048):
            drawn = filtered_draw_triton(scaled, cut, top_p, row_max, keys, search=search, chunk=chunk, block=16,
                                         search_chunk=128, programs=5)
            assert torch.equal(drawn, expected), (search, chunk)
    assert expected[4].item() == 1535 and expected[7].item() == int(scaled[7].argmax())
