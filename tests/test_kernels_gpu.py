"""Triton kernels in bf16 on CUDA against an fp64 reference, on fresh random inputs.

Skipped without CUDA. Also runs as `python tests/test_kernels_gpu.py` on a machine with
pytest installed. Errors are ||out - ref|| / ||ref||; bf16 keeps 8 bits of mantissa, so
rounding alone gives a few 1e-3.
"""

import sys

import pytest
import torch

from kernel_cases import paged_case, rope_rows, table_rows
from ropeway.kernels import (apply_rotary, linear, linear_silu_mul, paged_attention, rerotate_keys,
                             rotary_write_kv, silu_mul, write_kv)
from ropeway.kernels.attention import paged_attention_reference
from ropeway.kernels.rerotate import rerotate_keys_reference
from ropeway.kernels.rotary import apply_rotary_reference
from ropeway.kernels.silu_mul import silu_mul_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16_ROUNDING = 5e-3
ATTENTION_ERROR = 1e-2


def relative_error(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any()
    return ((out - ref).norm() / ref.norm()).item()


def test_rotary_bf16_with_long_positions():
    num_tokens, num_q_heads, num_kv_heads, head_dim = 600, 32, 8, 128
    inv_freq, factors = rope_rows(4, head_dim, "cuda")
    q = torch.randn(num_tokens, num_q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    # Positions up to 128k: the angle's range reduction must be exact, not approximate.
    positions = torch.randint(0, 131072, (num_tokens,), device="cuda")
    seq_index = torch.randint(0, 4, (num_tokens,), device="cuda", dtype=torch.int32)
    q_ref, k_ref = q.double(), k.double()
    # The specified function: fp32 angles, then exact trigonometry.
    apply_rotary_reference(q_ref, k_ref, positions, seq_index, inv_freq.double(), factors.double())
    apply_rotary(q, k, positions, seq_index, inv_freq, factors)
    assert relative_error(q, q_ref) < BF16_ROUNDING
    assert relative_error(k, k_ref) < BF16_ROUNDING


def test_write_kv_bf16_is_exact():
    num_blocks, page_size, num_kv_heads, head_dim = 64, 16, 8, 128
    k = torch.randn(500, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slot_mapping = torch.randperm(num_blocks * page_size, device="cuda")[:500]
    slot_mapping[::7] = -1
    k_cache = torch.randn(num_blocks, page_size, num_kv_heads, head_dim, device="cuda",
                          dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    keep = slot_mapping >= 0
    k_ref.view(-1, num_kv_heads, head_dim)[slot_mapping[keep]] = k[keep]
    v_ref.view(-1, num_kv_heads, head_dim)[slot_mapping[keep]] = v[keep]
    write_kv(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_rerotate_bf16_by_fp32_angle_difference():
    num_layers, num_blocks, page_size, num_kv_heads, head_dim = 4, 32, 16, 8, 128
    k_cache = torch.randn(num_layers, num_blocks, page_size, num_kv_heads, head_dim, device="cuda",
                          dtype=torch.bfloat16)
    n = 300
    slots = torch.randperm(num_blocks * page_size, device="cuda")[:n]
    old_positions = torch.randint(0, 131072, (n,), device="cuda")
    new_positions = old_positions - torch.randint(0, 30000, (n,), device="cuda")
    old_inv_freq, old_factors = rope_rows(n, head_dim, "cuda")
    new_inv_freq, new_factors = rope_rows(n, head_dim, "cuda")
    expected = k_cache.double()
    rerotate_keys_reference(expected, slots, old_positions, new_positions,
                            *table_rows(old_inv_freq, new_inv_freq, old_factors.double(), new_factors.double()))
    rerotate_keys(k_cache, slots, old_positions, new_positions,
                  *table_rows(old_inv_freq, new_inv_freq, old_factors, new_factors))
    assert relative_error(k_cache, expected) < BF16_ROUNDING


def test_block_max_logits_bf16_within_a_rounding_of_the_reference():
    """Retrieval's block scores: the kernel's best logits are the reference's (a bf16 product's
    rounding apart: the two sum the dot products in different orders), at the default model's
    head layout over 1,000 blocks."""
    from ropeway.kernels import block_max_logits
    from ropeway.kernels.block_max_logits import block_max_logits_reference
    queries = torch.randn(30, 32, 9, 64, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(30, 3, 1100 * 16, 64, device="cuda", dtype=torch.bfloat16)[:, :, : 1000 * 16]
    expected = block_max_logits_reference(queries, keys, 16, 0.125)
    actual = block_max_logits(queries, keys, 16, 0.125)
    # One bf16 ulp of logits of ~8 (2**-7 relative) at most, and nearly all equal.
    assert ((actual - expected).abs() <= expected.abs() * 2 ** -7 + 1e-6).all()
    assert (actual == expected).float().mean() > 0.95


def test_block_relevance_equals_the_reference_at_the_default_models_layout():
    """Retrieval's ranking from best logits: the kernel against the torch reference at the default
    model's layout (30 layers, 3 KV heads of 3, 16 scoring + 16 baseline rows, and a question's
    64 + 16) over 2,000 and 8,000 blocks (32k and 128k archived tokens): fp32 sums in other orders,
    the same best blocks."""
    from ropeway.kernels import block_relevance
    from ropeway.kernels.block_relevance import block_relevance_reference
    for blocks, scoring in ((2000, 16), (8000, 16), (8000, 64)):
        best = torch.randn(30, 3, scoring + 16, 3, blocks, device="cuda") * 3
        best[:, :, :scoring, :, 1234] += 4  # a block the scoring rows like
        expected = block_relevance_reference(best, scoring, 0.9 / blocks, 1 / 30)
        actual = block_relevance(best, scoring, 0.9 / blocks, 1 / 30)
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
        assert actual.topk(16).indices.tolist() == expected.topk(16).indices.tolist()
        assert actual.argmax().item() == 1234


@pytest.mark.parametrize("pool_dtype", [torch.bfloat16, torch.uint8])  # the model's dtype, fp8 bytes
def test_blocks_from_host_copies_what_the_staged_copies_do(pool_dtype):
    """Archived blocks read from pinned host memory by the kernel, by address: the same pool, byte
    for byte, as the torch version's staged copies, runs from several host chunks (one block past
    a chunk's start among them), and every other block untouched."""
    from ropeway.kernels import blocks_from_host
    from ropeway.kernels.host_blocks import blocks_from_host_reference
    shape = (30, 2, 40, 16, 3, 64) if pool_dtype == torch.bfloat16 else (30, 2, 40, 16 * 3 * 68)
    def host_chunk(n: int) -> torch.Tensor:  # n blocks, block-major, pinned
        block_shape = (n, *shape[:2], *shape[3:])
        if pool_dtype == torch.uint8:
            return torch.randint(0, 255, block_shape, dtype=torch.uint8).pin_memory()
        return torch.randn(block_shape).to(pool_dtype).pin_memory()

    pool = host_chunk(40).movedim(0, 2).contiguous().cuda()
    chunks = [host_chunk(5), host_chunk(3)]
    runs = [chunks[0][1:4], chunks[1][0:3], chunks[0][4:5]]
    destinations = torch.tensor([20, 3, 31, 9, 10, 11, 39], device="cuda")
    addresses = torch.tensor([run.data_ptr() + i * run[0].nbytes for run in runs for i in range(len(run))],
                             device="cuda")
    expected = pool.clone()
    blocks_from_host_reference(expected, destinations, runs)
    blocks_from_host(pool, destinations, runs, addresses)
    torch.cuda.synchronize()
    assert torch.equal(pool.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(pool[:, :, 20].cpu().view(torch.uint8), chunks[0][1].view(torch.uint8))


def test_rotary_write_kv_capture_bf16_is_exact():
    num_tokens, num_q_heads, num_kv_heads, head_dim = 300, 9, 3, 64
    q = torch.randn(num_tokens, num_q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q_before = q.clone()
    k_cache = torch.zeros(32, 16, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(32 * 16, device="cuda")[:num_tokens]
    inv_freq, factors = rope_rows(1, head_dim, "cuda")
    capture = torch.zeros(2, 20, num_q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    rows = torch.full((num_tokens,), -1, device="cuda")
    tokens = torch.randperm(num_tokens, device="cuda")[:20]
    rows[tokens] = torch.arange(20, device="cuda")
    rotary_write_kv(q, k, v, k_cache, v_cache, slots, torch.arange(num_tokens, device="cuda"),
                    torch.zeros(num_tokens, device="cuda", dtype=torch.int32), inv_freq, factors,
                    capture=capture[1], capture_rows=rows)
    assert torch.equal(capture[1], q_before[tokens]) and not capture[0].any()


ATTENTION_CASES = [
    # (sequences as (seq_len, query_len), q heads, kv heads, head dim, page size)
    ([(1000, 1000), (2100, 300), (517, 1), (4096, 1), (33, 0), (77, 77)], 32, 8, 128, 16),
    ([(700, 200), (1500, 1), (64, 1), (300, 300)], 9, 3, 64, 64),
    ([(3000, 1), (45, 1), (1025, 1), (16, 1)], 8, 8, 128, 256),
    ([(20000, 1)], 32, 8, 128, 16),
    ([(5000, 5000)], 16, 4, 64, 32),
    # A full 64-decode batch and two chunks filling whole tiles: tile numbering's slack once
    # left the last sequences without tiles (rows 52-63 here).
    ([(100 + 13 * i, 1) for i in range(64)], 32, 8, 128, 16),
    ([(512, 512), (1024, 512), (90, 1)], 32, 8, 128, 16),
]


def fp64_attention(case: dict) -> torch.Tensor:
    """paged_attention_reference on the case's tensors in fp64."""
    fp64_case = {key: value.double() if value.is_floating_point() else value
                 for key, value in case.items() if key != "scale"}
    return paged_attention_reference(**fp64_case, scale=case["scale"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sequences,num_q_heads,num_kv_heads,head_dim,page_size", ATTENTION_CASES)
def test_paged_attention_against_fp64(dtype, sequences, num_q_heads, num_kv_heads, head_dim,
                                      page_size):
    seq_lens = [s for s, _ in sequences]
    query_lens = [n for _, n in sequences]
    case = paged_case(seq_lens, query_lens, num_q_heads, num_kv_heads, head_dim, page_size,
                      dtype, "cuda")
    out = paged_attention(**case, max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    assert relative_error(out, fp64_attention(case)) < ATTENTION_ERROR


def test_mixed_step_split_launches_against_fp64():
    """Decodes first with decode tiles, then chunks (some short, beside a long sequence) in a
    launch of their own, as the runner orders a mixed step."""
    sequences = [(100 + 37 * i, 1) for i in range(20)] + [(4100, 2), (2048, 512), (300, 3)]
    seq_lens = [s for s, _ in sequences]
    query_lens = [n for _, n in sequences]
    case = paged_case(seq_lens, query_lens, 32, 8, 128, 16, torch.bfloat16, "cuda")
    out = paged_attention(**case, max_query_len=max(query_lens), max_seq_len=max(seq_lens), num_decode_seqs=20)
    assert relative_error(out, fp64_attention(case)) < ATTENTION_ERROR


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_chunks_through_cudnn_against_fp64(dtype):
    """A mixed step as the runner orders it: decodes, a short chunk in Triton, then long
    chunks through cuDNN: one from scratch, one after a prefix of whole key granules, one
    after a prefix that is not (its last keys join the causal part)."""
    from ropeway.kernels.cudnn_attention import cudnn_prefill_usable

    if not cudnn_prefill_usable(torch.empty(1, device="cuda", dtype=dtype)):
        pytest.skip("cuDNN attention is not available")
    sequences = [(100 + 37 * i, 1) for i in range(6)] + [(700, 300), (3000, 3000), (6144, 2048), (7000, 1500)]
    seq_lens = [s for s, _ in sequences]
    query_lens = [n for _, n in sequences]
    case = paged_case(seq_lens, query_lens, 32, 8, 128, 16, dtype, "cuda")
    starts = case["query_start_loc"].tolist()
    long_chunks = tuple((starts[r], query_lens[r], seq_lens[r] - query_lens[r]) for r in range(7, 10))
    out = paged_attention(**case, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
                          num_decode_seqs=6, long_chunks=long_chunks)
    assert cudnn_prefill_usable(case["q"]), "cuDNN refused the chunks: they ran in Triton"
    assert relative_error(out, fp64_attention(case)) < ATTENTION_ERROR


def test_add_rms_norm_bf16_against_fp64():
    from ropeway.kernels import add_rms_norm
    from ropeway.kernels.rms_norm import add_rms_norm_reference

    residual = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn(300, 4096, device="cuda", dtype=torch.bfloat16)
    weight = 1 + 0.1 * torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    residual_ref = residual.double()
    expected = add_rms_norm_reference(delta.double(), residual_ref, weight.double(), 1e-5)
    out = add_rms_norm(delta, residual, weight, 1e-5)
    assert relative_error(residual, residual_ref) < BF16_ROUNDING
    assert relative_error(out, expected) < BF16_ROUNDING


def fused_qkv_views(num_tokens, num_q_heads, num_kv_heads, head_dim):
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, :q_size].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    return q, k, v


def test_rotary_write_kv_bf16_against_fp64_on_qkv_views():
    num_tokens, num_q_heads, num_kv_heads, head_dim = 256, 32, 8, 128
    num_blocks, page_size = 64, 16
    q, k, v = fused_qkv_views(num_tokens, num_q_heads, num_kv_heads, head_dim)
    inv_freq, factors = rope_rows(4, head_dim, "cuda")
    positions = torch.randint(0, 131072, (num_tokens,), device="cuda")
    seq_index = torch.randint(0, 4, (num_tokens,), device="cuda", dtype=torch.int32)
    slot_mapping = torch.randperm(num_blocks * page_size, device="cuda")[:num_tokens]
    slot_mapping[::9] = -1
    kv = torch.randn(2, 2, num_blocks, page_size, num_kv_heads, head_dim, device="cuda",
                     dtype=torch.bfloat16)
    kv_before = kv.clone()
    k_cache, v_cache = kv[1, 0], kv[1, 1]
    q_ref, k_ref = q.double(), k.double()
    apply_rotary_reference(q_ref, k_ref, positions, seq_index, inv_freq.double(), factors.double())
    v_before = v.clone()
    rotary_write_kv(q, k, v, k_cache, v_cache, slot_mapping, positions, seq_index, inv_freq, factors)
    assert relative_error(q, q_ref) < BF16_ROUNDING
    assert relative_error(k, k_ref) < BF16_ROUNDING
    assert torch.equal(v, v_before)
    keep = slot_mapping >= 0
    flat = (-1, num_kv_heads, head_dim)
    assert torch.equal(k_cache.reshape(flat)[slot_mapping[keep]], k[keep])
    assert torch.equal(v_cache.reshape(flat)[slot_mapping[keep]], v[keep])
    untouched = torch.ones(num_blocks * page_size, dtype=torch.bool, device="cuda")
    untouched[slot_mapping[keep]] = False
    assert torch.equal(k_cache.reshape(flat)[untouched], kv_before[1, 0].reshape(flat)[untouched])
    assert torch.equal(v_cache.reshape(flat)[untouched], kv_before[1, 1].reshape(flat)[untouched])
    assert torch.equal(kv[0], kv_before[0])


def test_silu_mul_bf16_against_fp64():
    gate_up = 3 * torch.randn(300, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    out = silu_mul(gate_up)
    assert out.shape == (300, 14336) and out.dtype == torch.bfloat16
    assert relative_error(out, silu_mul_reference(gate_up.double())) < BF16_ROUNDING


def test_fused_kernels_replay_in_a_cuda_graph():
    """Decode-step shapes captured once and replayed on new inputs, as the runner does."""
    num_tokens, num_q_heads, num_kv_heads, head_dim = 8, 32, 8, 128
    q, k, v = fused_qkv_views(num_tokens, num_q_heads, num_kv_heads, head_dim)
    gate_up = torch.randn(num_tokens, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    inv_freq, factors = rope_rows(2, head_dim, "cuda")
    positions = torch.zeros(num_tokens, device="cuda", dtype=torch.long)
    seq_index = torch.zeros(num_tokens, device="cuda", dtype=torch.int32)
    slot_mapping = torch.full((num_tokens,), -1, device="cuda", dtype=torch.long)
    k_cache = torch.zeros(4, 16, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)

    def step():
        rotary_write_kv(q, k, v, k_cache, v_cache, slot_mapping, positions, seq_index, inv_freq,
                        factors)
        return silu_mul(gate_up)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()                                  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    q_new, k_new, v_new = (torch.randn_like(x) for x in (q, k, v))
    for view, new in ((q, q_new), (k, k_new), (v, v_new)):
        view.copy_(new)
    gate_up.normal_()
    positions.copy_(torch.arange(num_tokens, device="cuda") * 1000)
    seq_index.copy_(torch.arange(num_tokens, device="cuda", dtype=torch.int32) % 2)
    slot_mapping.copy_(torch.tensor([5, -1, 17, 30, -1, 63, 0, 40], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    q_ref, k_ref = q_new.double(), k_new.double()
    apply_rotary_reference(q_ref, k_ref, positions, seq_index, inv_freq.double(), factors.double())
    assert relative_error(q, q_ref) < BF16_ROUNDING
    assert relative_error(k, k_ref) < BF16_ROUNDING
    keep = slot_mapping >= 0
    flat = (-1, num_kv_heads, head_dim)
    assert torch.equal(k_cache.reshape(flat)[slot_mapping[keep]], k[keep])
    assert torch.equal(v_cache.reshape(flat)[slot_mapping[keep]], v_new[keep])
    assert int((k_cache.reshape(flat).abs().sum((1, 2)) != 0).sum()) == int(keep.sum())
    assert relative_error(out, silu_mul_reference(gate_up.double())) < BF16_ROUNDING


@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336), (128256, 4096), (1000, 100)],
                         ids=["qkv", "o", "down", "lm_head", "tails"])
def test_one_token_linear_bf16_against_fp64(n, k):
    """Batch-1 decode's GEMMs (the Triton GEMV) at Llama-3-8B shapes, and a batch of 3 (cuBLAS)."""
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for rows in (1, 3):
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ weight.double().T
        assert relative_error(linear(x, weight), ref) < BF16_ROUNDING
        assert relative_error(linear(x, weight, bias), ref + bias.double()) < BF16_ROUNDING


def test_one_token_linear_silu_mul_bf16_against_fp64():
    weight = torch.randn(2 * 14336, 4096, device="cuda", dtype=torch.bfloat16) / 64
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    out = linear_silu_mul(x, weight)
    assert out.shape == (1, 14336)
    assert relative_error(out, silu_mul_reference(x.double() @ weight.double().T)) < BF16_ROUNDING


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_sampler_on_cuda_draws_the_cpu_tokens_without_synchronizing():
    """The whole sampler on CUDA (Triton draw, topk, penalties, logprobs): no host
    synchronization until read(), and the same seeded tokens as on CPU."""
    from ropeway.engine.sampler import SamplingRow, sample
    from ropeway.engine.sampling_state import PenaltyState
    from ropeway.sampling_params import SamplingParams

    vocab, batch = 128256, 64
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 4
    settings = [{"temperature": 0.8, "top_p": 0.95}, {"temperature": 0.8, "top_k": 50},
                {"temperature": 1.0, "min_p": 0.05, "top_p": 0.9}, {"temperature": 0.0, "logprobs": 5},
                {"temperature": 0.7, "presence_penalty": 1.0, "repetition_penalty": 1.2, "logit_bias": {7: 5.0}}]
    tokens = {}
    for device in ("cpu", "cuda"):
        state = PenaltyState(vocab, torch.device(device))
        rows = []
        for i in range(batch):
            params = SamplingParams(seed=i, **settings[i % len(settings)])
            penalty_row = state.row(i, [1, 2, 3], [4, 4]) if params.presence_penalty else -1
            rows.append(SamplingRow(params, seed=i, step=3, penalty_row=penalty_row))
        on_device = logits.to(device)
        sample(on_device, rows, state)  # compiles the kernels before the check
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            sampled = sample(on_device, rows, state)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        tokens[device] = sampled.read().token_ids
    assert tokens["cuda"] == tokens["cpu"]


def test_sampler_parameter_upload_is_one_asynchronous_copy_of_aligned_columns():
    """The sampler's per-row parameters (int64, fp32 and bool, odd lengths) reach the device unchanged,
    each 16-byte aligned (Triton specializes on it), without synchronizing the host."""
    import numpy as np

    from ropeway.engine.sampler import upload

    arrays = [np.arange(7, dtype=np.int64).reshape(7, 1) * 3, np.linspace(0, 1, 5, dtype=np.float32),
              np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int64), np.array([True, False, True]),
              np.full(3, -np.inf, np.float32)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tensors = upload(arrays, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for tensor, array in zip(tensors, arrays):
        assert tensor.is_cuda and tensor.data_ptr() % 16 == 0 and tensor.is_contiguous()
        assert tensor.cpu().numpy().tolist() == array.tolist()


@pytest.mark.parametrize("rows", [1, 64, 256])
def test_filtered_draw_at_full_vocabulary_matches_the_cpu_reference(rows):
    """The split-row search and race at the Llama-3 vocabulary, with the default chunking of the
    first race (batch 1: 126 chunks of 1k; batch 64: 16 chunks of 8k, 8 race tiles each; batch
    256: 4 of 32k) and the search's work items of 1k on the unsettled rows."""
    from ropeway.engine.random_stream import stream_keys
    from ropeway.kernels.sampling import filtered_draw_reference
    from ropeway.kernels.triton_sampling import filtered_draw_triton

    generator = torch.Generator().manual_seed(rows)
    scaled = torch.randn(rows, 128256, generator=generator) * 5
    scaled[:, 1000:1100] = 12.0  # a tied head across chunk boundaries
    cut = torch.where(torch.arange(rows) % 3 == 0, float("-inf"), scaled.amax(-1) - 15.0)
    top_p = torch.tensor([0.95, 1.0, 0.6, 0.999])[torch.arange(rows) % 4]
    row_max = scaled.amax(-1)
    keys = torch.from_numpy(stream_keys(list(range(rows)), [9] * rows))
    expected = filtered_draw_reference(scaled, cut, top_p, row_max, keys, search=True)
    drawn = filtered_draw_triton(*(t.cuda() for t in (scaled, cut, top_p, row_max, keys)), search=True)
    assert drawn.cpu().tolist() == expected.tolist()


def test_filtered_draw_warm_up_compiles_every_variant():
    """After warm_up_filtered_draw, batches of any size up to its max, with no row, some rows or
    every row unsettled, and their logprobs' log-sum-exp, launch no kernel Triton has not
    compiled yet."""
    from ropeway.engine.random_stream import stream_keys
    from ropeway.kernels import triton_sampling

    vocab, max_rows = 128256, 96
    device = torch.device("cuda")
    kernels = (triton_sampling._race_kernel, triton_sampling._mass_above_kernel,
               triton_sampling._top_p_pass_kernel, triton_sampling._search_race_kernel,
               triton_sampling._logprob_kernel)

    def compiled() -> int:
        return sum(len(kernel.device_caches[torch.cuda.current_device()][0]) for kernel in kernels)

    triton_sampling.warm_up_filtered_draw(vocab, max_rows, device)
    warmed = compiled()
    assert warmed >= len(kernels)
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 2, 5, 16, 17, 33, 64, 96):
        scaled = (torch.randn(rows, vocab, generator=generator) * 3).cuda()
        for top_p in (1.0, 0.95, 0.05):
            keys = torch.from_numpy(stream_keys(list(range(rows)), [rows] * rows)).cuda()
            triton_sampling.filtered_draw_triton(scaled, torch.full((rows,), float("-inf"), device=device),
                                                 torch.full((rows,), top_p, device=device), scaled.amax(-1), keys,
                                                 search=top_p < 1.0)
        for k in (0, 1, 5, 20):
            triton_sampling.logprob_terms_triton(scaled, k)
    torch.cuda.synchronize()
    assert compiled() == warmed


@pytest.mark.parametrize("rows", [1, 256])
def test_logprob_terms_at_full_vocabulary(rows):
    """The logprobs' one-read log-sum-exp and top 20 against torch's log_softmax and topk on the GPU:
    the same tokens, values to fp32 rounding, at the Llama-3 vocabulary with grammar-masked tokens."""
    from ropeway.kernels import logprob_terms

    logits = (torch.randn(rows, 128256, generator=torch.Generator().manual_seed(rows)) * 6).cuda()
    logits[::3, 5000:90000] = float("-inf")
    row_max, log_sum, values, ids = logprob_terms(logits, 20)
    expected_values, expected_ids = logits.log_softmax(-1).topk(20, dim=-1)
    assert torch.equal(ids, expected_ids)
    assert torch.equal(values, logits.topk(20, dim=-1).values)
    torch.testing.assert_close((values - row_max[:, None]) - log_sum[:, None], expected_values, rtol=0, atol=1e-5)
