"""The landmark policy on the real default model: sinks, a region of chunk summaries, window."""

import math

import pytest
import torch
from bounded_streams import long_text_ids, run_wrapping_runner, stream_checking_positions

from ropeway import ContextParams, SamplingParams
from ropeway.kernels.rotary import rope_cos_sin, rotate_by
from ropeway.sampling_params import InvalidParameter
from ropeway.scheduler import ContextPolicy
from ropeway.arith import cdiv
from ropeway.models import rope_inv_freq

# Block size 16: one sink block, one landmark block (4 slots used), a 16-token eviction chunk.
LANDMARK = {"type": "landmark", "sinks": 4, "window": 32, "landmarks": 4}


@pytest.mark.parametrize("bad", [{"type": "landmark", "landmarks": 0},
                                 {"type": "landmark", "landmarks": "many"}])
def test_bad_landmark_counts_name_the_field(bad):
    with pytest.raises(InvalidParameter) as error:
        ContextPolicy.from_dict(bad)
    assert error.value.param == "context_policy.landmarks"


@pytest.mark.slow
def test_long_landmark_stream_keeps_blocks_constant_and_fills_its_slots_as_a_ring(make_llm):
    llm = make_llm(prefill_chunk_size=32, max_num_batched_tokens=64)
    engine = llm.engine
    policy = ContextPolicy.from_dict(LANDMARK)
    max_cache = policy.max_cache_tokens(16)
    prompt = long_text_ids(llm.tokenizer, 20 * policy.window)

    def landmark_slots_are_weighted_or_empty(seq):
        if seq.num_region_positions and seq.block_table:  # a finished one's blocks are retained
            region = engine.runner.cache_ops.slot_bias[seq.block_table[1]]
            count = min(seq.num_evicted_tokens // 16, policy.landmarks)
            assert torch.all(region[:count] == math.log(16))
            assert torch.all(region[count:] == float("-inf"))

    seq, seen = stream_checking_positions(llm, LANDMARK, prompt, landmark_slots_are_weighted_or_empty)
    settled = [used for computed, used in seen if computed >= max_cache]
    assert max(settled) - min(settled) <= 1
    assert max(settled) <= cdiv(max_cache, 16)
    assert seq.num_region_positions == 16
    assert engine.scheduler.num_landmark_recomputations == seq.num_evicted_tokens // 16 >= 30
    engine.scheduler.sessions.release_oldest()
    assert engine.block_manager.num_free_blocks == engine.pool.num_blocks


def test_landmark_slot_holds_the_rotated_mean_of_the_chunks_keys_computed_alone(make_llm):
    llm = make_llm()
    engine = llm.engine
    prompt = long_text_ids(llm.tokenizer, 120)
    written = []

    def write_and_read(write, eviction):
        write(eviction)
        for landmark in eviction.landmarks:
            table = eviction.seq.block_table
            block, offset = table[landmark.position // 16], landmark.position % 16
            written.append((landmark, engine.kv_cache[:, :, block, offset].clone()))

    seq = run_wrapping_runner(engine, LANDMARK, prompt, "write_landmarks", write_and_read)
    landmark, slot = written[0]
    assert landmark.token_ids == prompt[16:32] and landmark.position == 16

    # Independently: the chunk as a prompt of its own on a fresh engine, its keys read back
    # from the cache and un-rotated here.
    alone = make_llm().engine
    alone.add_request("chunk", landmark.token_ids, SamplingParams(temperature=0, max_tokens=2))
    alone.step()
    chunk_seq = alone.requests["chunk"].choices[0].seq
    assert rope_inv_freq(chunk_seq.rope_plan).tolist() == rope_inv_freq(seq.rope_plan).tolist()
    n = len(landmark.token_ids)
    slots = torch.tensor([chunk_seq.block_table[p // 16] * 16 + p % 16 for p in range(n)])
    cached = alone.kv_cache.flatten(2, 3)[:, :, slots].double()  # [layers, 2, n, Hkv, D]
    inv_freq = rope_inv_freq(seq.rope_plan).double()
    cos, sin = rope_cos_sin(torch.arange(n), inv_freq.expand(n, -1), torch.ones(n, dtype=torch.float64))
    slot_cos, slot_sin = rope_cos_sin(torch.tensor([16]), inv_freq[None], torch.ones(1, dtype=torch.float64))
    for layer in range(cached.shape[0]):
        mean_key = rotate_by(cached[layer, 0], cos.double(), -sin.double()).mean(0, keepdim=True)
        expected_key = rotate_by(mean_key, slot_cos.double(), slot_sin.double())[0]
        assert torch.allclose(slot[layer, 0].double(), expected_key, atol=1e-4)
        assert torch.allclose(slot[layer, 1].double(), cached[layer, 1].mean(0), atol=1e-5)


def test_landmark_shorter_than_its_window_equals_none(default_llm):
    prompts = [default_llm.tokenizer.encode("The history of the Roman Empire began"),
               default_llm.tokenizer.encode("List three facts about the Moon:\n1.")]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    none = default_llm.generate(prompts, params)
    landmark = default_llm.generate(prompts, params, context=ContextParams(
        context_policy={"type": "landmark", "sinks": 4, "window": 256, "landmarks": 16}))
    for a, b in zip(none, landmark):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [t.logprob for t in a.outputs[0].logprobs] == [t.logprob for t in b.outputs[0].logprobs]
