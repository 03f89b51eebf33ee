"""Continuous batching, chunked prefill, preemption and prefix caching on the real default model:
whatever the batching, every request gets exactly the tokens it gets alone."""

import pytest

from batching_cases import GREEDY, prompts_of_mixed_lengths
from ropeway import SamplingParams, kernels


@pytest.fixture(scope="module")
def alone_outputs(make_llm):
    """Reference: each prompt generated on its own, on a fresh engine."""
    llm = make_llm()
    prompts = prompts_of_mixed_lengths(llm.tokenizer)
    return prompts, [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]


@pytest.mark.slow
def test_mixed_lengths_with_small_chunks_match_one_at_a_time(make_llm, alone_outputs, monkeypatch):
    prompts, expected = alone_outputs
    # Chunks of 16 count as long here (cuDNN's on CUDA), shorter ones not.
    monkeypatch.setattr(kernels, "LONG_CHUNK_MIN_QUERIES", 16)
    llm = make_llm(max_num_batched_tokens=48, prefill_chunk_size=16, max_num_seqs=8)
    runner = llm.engine.runner
    reordered, long_chunks_last, decodes_ascending, decodes_resorted = [], [], [], []
    host_batch = runner.host_batch

    def recording_host_batch(step, logit_rows, previous_rows=None):
        batch = host_batch(step, logit_rows, previous_rows)
        sizes = [item.num_new_tokens for item in step.scheduled]
        chunk_before_decode = any(a > 1 and b == 1 for a, b in zip(sizes, sizes[1:]))
        if chunk_before_decode:
            reordered.append(batch.num_decode_seqs == sizes.count(1))
        scheduled_lens = [item.seq.num_cached_positions + 1 for item in step.scheduled if item.num_new_tokens == 1]
        batch_lens = batch.int32[3][: len(scheduled_lens)].tolist()
        decodes_ascending.append(batch_lens == sorted(scheduled_lens))
        decodes_resorted.append(scheduled_lens != sorted(scheduled_lens))
        if batch.long_chunks:
            _, _, query_start, seq_lens = batch.int32
            starts, seq_lens = query_start.tolist(), seq_lens.tolist()
            rows = range(len(seq_lens) - len(batch.long_chunks), len(seq_lens))
            expected_chunks = [(starts[r], starts[r + 1] - starts[r], seq_lens[r] - (starts[r + 1] - starts[r]))
                               for r in rows]
            long_chunks_last.append([tuple(c) for c in batch.long_chunks] == expected_chunks
                                    and all(n >= 16 for _, n, _ in batch.long_chunks))
        return batch

    runner.host_batch = recording_host_batch
    outputs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # Steps that scheduled a chunk before a decode ran with the decodes moved first (their
    # own attention tiles on the GPU), long chunks last (cuDNN on the GPU), and the logits
    # still reached the right requests.
    assert reordered and all(reordered)
    assert long_chunks_last and all(long_chunks_last)
    # Decodes ran shortest first (the attention kernel starts the longest), including steps
    # whose schedule had them in another order.
    assert all(decodes_ascending) and any(decodes_resorted)


def test_long_prompt_never_stalls_decodes_for_more_than_one_chunk(make_llm, alone_outputs):
    prompts, _ = alone_outputs
    llm = make_llm(max_num_batched_tokens=40, prefill_chunk_size=32, max_num_seqs=8)
    engine = llm.engine
    plans = []
    schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: plans.append(schedule()) or plans[-1]
    engine.add_request("short", prompts[0], GREEDY)
    engine.step()  # the short prompt's prefill; from now on it decodes
    engine.add_request("long", prompts[3], GREEDY)
    while engine.has_unfinished_requests():
        engine.step()
    long_steps = [p for p in plans[1:] if any(i.seq.request_id == "long" and not i.samples for i in p.scheduled)]
    assert len(long_steps) >= len(prompts[3]) // 32
    for plan in long_steps:
        by_request = {item.seq.request_id: item.num_new_tokens for item in plan.scheduled}
        assert by_request["long"] <= 32
        assert by_request.get("short") == 1, "a running decode was left out of a prefill step"


@pytest.mark.slow
def test_pool_pressure_preempts_and_still_matches(make_llm, default_llm, alone_outputs):
    prompts, expected = alone_outputs
    llm = make_llm(kv_cache_memory_bytes=24 * default_llm.engine.pool.bytes_per_block,
                   max_num_batched_tokens=64, prefill_chunk_size=32, max_num_seqs=8)
    engine = llm.engine
    assert engine.pool.num_blocks == 24
    outputs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.pool.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_prefix_cache_hit_gives_identical_output_and_is_counted(make_llm, alone_outputs):
    prompts, expected = alone_outputs
    llm = make_llm()
    bm = llm.engine.block_manager
    first = llm.generate([prompts[3]], GREEDY)[0]
    hits_before = bm.prefix_hits
    second = llm.generate([prompts[3]], GREEDY)[0]
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == expected[3]
    assert first.num_cached_tokens == 0
    # Every full block of the prompt but the one holding its last token is reused.
    assert second.num_cached_tokens == (len(prompts[3]) - 1) // 16 * 16
    assert bm.prefix_hits - hits_before == second.num_cached_tokens


def test_concurrent_requests_share_prefix_blocks(make_llm, alone_outputs):
    prompts, _ = alone_outputs
    llm = make_llm()
    engine = llm.engine
    engine.add_request("a", prompts[3], GREEDY)
    engine.step()
    engine.add_request("b", prompts[3][:200] + prompts[0], GREEDY)
    engine.step()
    table_a = engine.requests["a"].choices[0].seq.block_table
    table_b = engine.requests["b"].choices[0].seq.block_table
    shared = 200 // 16
    assert table_a[:shared] == table_b[:shared]
    assert all(engine.block_manager.ref_counts[b] == 2 for b in table_a[:shared])
    engine.abort_request("a")
    engine.abort_request("b")
    assert engine.block_manager.num_free_blocks == engine.pool.num_blocks


def test_n_choices_share_the_prompt_and_differ(make_llm, alone_outputs):
    prompts, _ = alone_outputs
    llm = make_llm()
    engine = llm.engine
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    # An open question (not the repetitive text above, which the model copies with certainty).
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Write a short poem about the sea, "
                                         "the wind, the harbour lights and the fishing boats at dawn."}])
    engine.add_request("n3", prompt, params)
    while engine.requests["n3"].choices[2].seq.num_computed_tokens == 0:
        engine.step()
    tables = [c.seq.block_table for c in engine.requests["n3"].choices]
    full = (len(prompt) - 1) // 16
    assert full >= 2
    assert tables[0][:full] == tables[1][:full] == tables[2][:full]
    while engine.has_unfinished_requests():
        outputs = engine.step()
    texts = [c.token_ids for c in outputs[0].outputs]
    assert len(set(map(tuple, texts))) == 3
    again = llm.generate([prompt], params)[0]
    assert [c.token_ids for c in again.outputs] == texts
    assert engine.block_manager.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("dtype", ["int64", "int32"])
def test_uploads_are_packed_16_byte_aligned_and_split_back_into_each_array(dtype):
    """What a CUDA upload copies: the step's arrays back to back, each starting 16-byte aligned
    (Triton specializes on pointer alignment), cut back into every array by one split."""
    import numpy as np
    import torch

    from ropeway.engine.model_runner import packed_aligned

    torch_dtype = getattr(torch, dtype)
    arrays = [np.arange(5), np.zeros(0, dtype=np.int64), np.arange(12).reshape(3, 4), np.array(7), np.arange(3) - 9]
    host, parts = packed_aligned(arrays, torch_dtype)
    views = host.split_with_sizes(parts)[::2]
    element = host.element_size()
    for view, a in zip(views, arrays):
        assert (view.data_ptr() - host.data_ptr()) % 16 == 0 and view.numel() == a.size
        assert view.view(a.shape).tolist() == a.tolist()
    assert host.numel() * element % 16 == 0
