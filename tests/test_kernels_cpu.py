"""The CPU fast paths (paged attention; RoPE + KV write) against the torch references they
replace in the model."""

import pytest
import torch

from kernel_cases import paged_case, rope_rows
from ropeway.kernels import cpu_attention, cpu_threads
from ropeway.kernels.attention import paged_attention_reference
from ropeway.kernels.cpu_attention import paged_attention_cpu
from ropeway.kernels.cpu_rotary_write_kv import plan_cpu_rotary, rotary_write_kv_cpu
from ropeway.kernels.rotary_write_kv import rotary_write_kv_reference

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# (seq_len, query_len) per sequence, in the orders a step may hold them.
CASES = {
    # decodes in three length buckets (1, 2-4 and 5-16 blocks), partial and exactly full last blocks
    "decodes": [(70, 1), (5, 1), (131, 1), (16, 1), (64, 1), (250, 1)],
    # a whole prompt, a chunk after a cached prefix longer than itself, an idle sequence
    "chunks": [(37, 37), (300, 45), (20, 0)],
    "decodes-then-chunks": [(70, 1), (5, 1), (131, 1), (37, 37), (50, 13), (20, 0)],
    "interleaved": [(50, 13), (29, 1), (37, 37), (32, 1)],
    "one-decode": [(9, 1)],
    "two-query-chunk": [(2, 2)],
}
HEADS = [(9, 3, 64), (4, 4, 32)]  # (q heads, kv heads, head dim): the default model's GQA, and MHA


def run_both(sequences, heads, dtype, with_bias, seed=0, tables=None):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [s for s, _ in sequences]
    query_lens = [n for _, n in sequences]
    case = paged_case(seq_lens, query_lens, *heads, 16, dtype, "cpu", gen, tables)
    slot_bias = None
    if with_bias:
        # Landmark caches: a logit bias per slot, and whole pages of empty (-inf) slots.
        slot_bias = torch.rand(case["k_cache"].shape[:2], generator=gen) * 3
        for row, seq_len in zip(case["block_tables"], seq_lens):
            if seq_len > 32:
                slot_bias[row[1].long()] = float("-inf")
    fast = paged_attention_cpu(**case, slot_bias=slot_bias)
    fp32_case = {key: value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                 for key, value in case.items()}
    expected = paged_attention_reference(**fp32_case, slot_bias=slot_bias)
    return fast, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "slot-bias"])
@pytest.mark.parametrize("heads", HEADS, ids=["gqa3", "mha"])
@pytest.mark.parametrize("name", CASES)
def test_cpu_fast_path_matches_reference(name, heads, with_bias, dtype):
    fast, expected = run_both(CASES[name], heads, dtype, with_bias)
    assert fast.dtype == dtype
    assert not fast.isnan().any()
    torch.testing.assert_close(fast.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_long_prefix_chunk_matches_reference():
    """A 512-query chunk after a 1.5k-token prefix: the merge of prefix and chunk attention."""
    fast, expected = run_both([(2048, 512), (700, 1)], (9, 3, 64), torch.float32, with_bias=False, seed=1)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)


# Decodes at long contexts, with their blocks laid out as a pool hands them out:
# (seq_len, block table, how each call's keys are read: view, blocks or slots).
LONG_DECODES = {
    # a fresh pool: one ascending run; two calls of four and one 512-key pieces, then 40 keys
    "ascending": (2600, list(range(3, 166)), ["view", "view", "view"]),
    # a freed sequence's blocks come back tail first: descending, gathered (whole blocks, then
    # the last 476 keys by slot)
    "descending": (1500, list(range(299, 205, -1)), ["blocks", "slots"]),
    # two prefill chunks, each one ascending run of 128 blocks, the second below the first
    "chunks": (4100, list(range(500, 628)) + list(range(300, 428)) + [700], ["view", "view", "view"]),
    # every other block
    "scattered": (1100, list(range(1000, 1138, 2)), ["blocks", "slots"]),
}


def how_calls_read(decode):
    return ["view" if call.start is not None else "blocks" if call.blocks is not None else "slots"
            for call in decode.calls]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "slot-bias"])
@pytest.mark.parametrize("heads", HEADS, ids=["gqa3", "mha"])
def test_long_decodes_match_reference(heads, with_bias, dtype):
    """Decodes at long contexts, read in place or gathered in pieces merged by log-sum-exp, in
    one step with a short decode and a chunk: the reference's output."""
    sequences = [(seq_len, 1) for seq_len, _, _ in LONG_DECODES.values()] + [(70, 1), (300, 45)]
    tables = [table for _, table, _ in LONG_DECODES.values()] + [list(range(1200, 1205)), list(range(1300, 1319))]
    case = paged_case([s for s, _ in sequences], [n for _, n in sequences], *heads, 16, dtype, "cpu",
                      torch.Generator(), tables)
    plan = cpu_attention.plan_cpu_attention(case["block_tables"], case["seq_lens"], case["query_start_loc"], 16)
    assert [decode.row for decode in plan.long_decodes] == [0, 1, 2, 3]
    assert [how_calls_read(decode) for decode in plan.long_decodes] == [how for _, _, how in LONG_DECODES.values()]
    fast, expected = run_both(sequences, heads, dtype, with_bias, tables=tables)
    assert not fast.isnan().any()
    torch.testing.assert_close(fast.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def one_sequence(seq_len, table, keys, values, query, slot_bias=None):
    """A cache holding one sequence's keys and values at the blocks of table (NaN elsewhere),
    its attention output for one query by paged_attention_cpu."""
    cache_shape = (max(table) + 2, 16, *keys.shape[1:])
    k_cache, v_cache = torch.full(cache_shape, float("nan")), torch.full(cache_shape, float("nan"))
    blocks = torch.tensor(table)
    positions = torch.arange(seq_len)
    slots = blocks[positions // 16] * 16 + positions % 16
    k_cache.view(-1, *keys.shape[1:])[slots] = keys
    v_cache.view(-1, *keys.shape[1:])[slots] = values
    bias = None
    if slot_bias is not None:
        bias = torch.zeros(cache_shape[:2])
        bias.view(-1)[slots] = slot_bias
    return paged_attention_cpu(query[None], k_cache, v_cache, blocks.int()[None], torch.tensor([seq_len]),
                               torch.tensor([0, 1]), 0.125, slot_bias=bias)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "slot-bias"])
def test_long_decode_gives_the_same_bits_wherever_its_blocks_lie(threads, with_bias):
    """One sequence's keys in blocks laid out four ways (read in place, as whole blocks, by slot):
    bit-identical outputs, as a prefix taken back from the host tier into other blocks needs."""
    gen = torch.Generator().manual_seed(6)
    seq_len = 4100
    keys, values = torch.randn(2, seq_len, 3, 64, generator=gen)
    query = torch.randn(9, 64, generator=gen)
    bias = torch.rand(seq_len, generator=gen) if with_bias else None
    count = -(-seq_len // 16)
    layouts = [list(range(count)), list(range(2 * count, count - 1, -1))[:count],
               list(range(600, 728)) + list(range(300, 428)) + [900], list(range(0, 2 * count, 2))]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outputs = [one_sequence(seq_len, table, keys, values, query, bias) for table in layouts]
    finally:
        torch.set_num_threads(saved)
    assert not outputs[0].isnan().any()
    for other in outputs[1:]:
        assert torch.equal(other, outputs[0])


def test_a_long_decodes_piece_with_every_key_masked_weighs_nothing():
    """A landmark cache's empty slots (-inf bias) may fill a whole piece: its output and
    log-sum-exp, whatever the kernel leaves there, must not reach the result."""
    seq_len, table, _ = LONG_DECODES["ascending"]
    case = paged_case([seq_len], [1], 9, 3, 64, 16, torch.float32, "cpu", torch.Generator().manual_seed(3), [table])
    bias = torch.zeros(case["k_cache"].shape[:2])
    bias[table[32] : table[64]] = float("-inf")  # the second piece of the first call
    bias[table[128] : table[160]] = float("-inf")  # the second call, a single piece
    bias[table[0], :5] = float("-inf")
    plan = cpu_attention.plan_cpu_attention(case["block_tables"], case["seq_lens"], case["query_start_loc"], 16, bias)
    masked = [None if call.masked is None else call.masked.flatten().tolist() for call in plan.long_decodes[0].calls]
    assert masked == [[False, True, False, False], [True], None]
    fast = paged_attention_cpu(**case, slot_bias=bias, plan=plan)
    torch.testing.assert_close(fast, paged_attention_reference(**case, slot_bias=bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hidden", ["prefix", "first-own-keys"])
def test_a_chunk_whose_prefix_or_own_keys_are_all_masked_matches_reference(hidden):
    """A chunk after a prefix whose every key is masked sees only its own keys; queries whose
    own keys so far are all masked see only the prefix."""
    case = paged_case([300], [45], 9, 3, 64, 16, torch.float32, "cpu", torch.Generator().manual_seed(4))
    table = case["block_tables"][0].long()
    positions = torch.arange(255) if hidden == "prefix" else torch.arange(255, 262)
    bias = torch.zeros(case["k_cache"].shape[:2])
    bias.view(-1)[table[positions // 16] * 16 + positions % 16] = float("-inf")
    fast = paged_attention_cpu(**case, slot_bias=bias)
    torch.testing.assert_close(fast, paged_attention_reference(**case, slot_bias=bias), atol=1e-5, rtol=1e-5)


def test_keys_and_values_of_one_pool_are_gathered_together():
    """K and V caches that are one layer's slices of a pool (kv[0], kv[1]) are gathered in one
    index_select: the same result as from two separate caches."""
    gen = torch.Generator().manual_seed(2)
    sequences = CASES["decodes-then-chunks"]
    case = paged_case([s for s, _ in sequences], [n for _, n in sequences], 9, 3, 64, 16, torch.float32, "cpu", gen)
    separate = paged_attention_cpu(**case)
    pool = torch.stack([case["k_cache"], case["v_cache"]])
    assert cpu_attention._kv_rows(pool[0], pool[1]) is not None
    assert cpu_attention._kv_rows(case["k_cache"], case["v_cache"]) is None
    together = paged_attention_cpu(**{**case, "k_cache": pool[0], "v_cache": pool[1]})
    assert torch.equal(separate, together)


def test_attention_on_one_thread_matches_the_pool(monkeypatch):
    """Small attentions run on one thread: the pool's result to rounding, and the caller's
    thread count is back afterwards, also when the block raises."""
    threads = torch.get_num_threads()
    sequences = CASES["decodes-then-chunks"]
    monkeypatch.setattr(cpu_threads, "SINGLE_THREAD_MACS", 1 << 62)
    alone, _ = run_both(sequences, (9, 3, 64), torch.float32, with_bias=False)
    assert torch.get_num_threads() == threads
    monkeypatch.setattr(cpu_threads, "SINGLE_THREAD_MACS", 0)
    pooled, _ = run_both(sequences, (9, 3, 64), torch.float32, with_bias=False)
    torch.testing.assert_close(alone, pooled, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(cpu_threads, "SINGLE_THREAD_MACS", 1 << 62)
    with pytest.raises(RuntimeError), cpu_threads.one_thread(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == threads



def qkv_views(qkv, num_q_heads, num_kv_heads, head_dim):
    """q, k, v as the model makes them: strided views into one fused projection output."""
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    num_tokens = qkv.shape[0]
    return (qkv[:, :q_size].view(num_tokens, num_q_heads, head_dim),
            qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim),
            qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "padding"])
def test_cpu_rotary_write_kv_equals_reference(dtype, padding):
    """Bit for bit: q and k rotated in place, the whole cache (only the mapped slots written)."""
    gen = torch.Generator().manual_seed(3)
    num_tokens, num_q_heads, num_kv_heads, head_dim, page_size, num_blocks = 23, 9, 3, 64, 16, 5
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    # Three sequences with their own RoPE rows and attention factors, in runs of tokens.
    inv_freq, factors = rope_rows(3, head_dim, "cpu", gen)
    seq_index = torch.tensor([(3 * t) // num_tokens for t in range(num_tokens)], dtype=torch.int32)
    positions = torch.randint(0, 5000, (num_tokens,), generator=gen)
    slot_mapping = torch.randperm(num_blocks * page_size, generator=gen)[:num_tokens]
    if padding:  # CUDA-graph filler tokens carry slot -1; the CPU contract allows them too
        slot_mapping[[1, num_tokens - 1]] = -1
    # The KV pair of one layer of a [layers, 2, blocks, page, heads, dim] cache.
    kv = torch.randn(2, 2, num_blocks, page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    qkv_ref, kv_ref, kv_before = qkv.clone(), kv.clone(), kv.clone()

    q, k, v = qkv_views(qkv, num_q_heads, num_kv_heads, head_dim)
    plan = plan_cpu_rotary(positions, seq_index, inv_freq, factors, slot_mapping)
    rotary_write_kv_cpu(q, k, v, kv[1, 0], kv[1, 1], plan)
    rotary_write_kv_reference(*qkv_views(qkv_ref, num_q_heads, num_kv_heads, head_dim), kv_ref[1, 0], kv_ref[1, 1],
                              slot_mapping, positions, seq_index, inv_freq, factors)

    assert torch.equal(qkv, qkv_ref)
    assert torch.equal(kv, kv_ref)
    assert not torch.equal(kv, kv_before)  # something was written, and rotated the same way
