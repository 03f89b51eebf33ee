"""Bounded caches on the real default model: sink + window eviction (StreamingLLM) and sessions."""

import pytest
import torch

from bounded_streams import long_text_ids, run_wrapping_runner, stream_checking_positions

from ropeway import ContextParams, SamplingParams
from ropeway.kernels.rotary import rope_cos_sin, rotate_by
from ropeway.sampling_params import InvalidParameter
from ropeway.scheduler import ContextPolicy
from ropeway.arith import cdiv
from ropeway.models import rope_inv_freq

WINDOW = {"type": "sink_window", "sinks": 4, "window": 32}


@pytest.mark.parametrize("bad, param", [
    ({"type": "sliding"}, "context_policy.type"),
    ({"type": "sink_window", "window": 8}, "context_policy.window"),
    ({"type": "sink_window", "sinks": -1}, "context_policy.sinks"),
    ({"type": "sink_window", "window": "big"}, "context_policy.window"),
    ({"type": "sink_window", "size": 3}, "context_policy.size"),
    ({"type": "sink_window", "landmarks": 8}, "context_policy.landmarks"),
])
def test_bad_policies_name_the_field(bad, param):
    with pytest.raises(InvalidParameter) as error:
        ContextPolicy.from_dict(bad)
    assert error.value.param == param


def test_stream_of_twenty_windows_keeps_blocks_constant_and_positions_contiguous(make_llm):
    llm = make_llm(prefill_chunk_size=32, max_num_batched_tokens=64)
    engine = llm.engine
    policy = ContextPolicy.from_dict(WINDOW)
    max_cache = policy.max_cache_tokens(16)
    prompt = long_text_ids(llm.tokenizer, 20 * policy.window)
    seq, seen = stream_checking_positions(llm, WINDOW, prompt)
    assert len(seen) >= 20
    settled = [used for computed, used in seen if computed >= max_cache]
    assert max(settled) - min(settled) <= 1  # constant memory, whatever the stream length
    assert max(settled) <= cdiv(max_cache, 16)
    assert engine.scheduler.num_evicted_tokens >= len(prompt) - max_cache
    assert seq.num_evicted_tokens == engine.scheduler.num_evicted_tokens
    engine.scheduler.sessions.release_oldest()
    assert engine.block_manager.num_free_blocks == engine.pool.num_blocks


def test_evicted_window_keys_equal_keys_rotated_afresh_at_their_new_positions(make_llm):
    llm = make_llm()
    engine, size = llm.engine, 16
    prompt = long_text_ids(llm.tokenizer, 200)
    applied = []

    def capture_and_apply(apply, eviction):
        # The kept window keys, read at their old positions before they move.
        old = torch.arange(eviction.first_position, eviction.first_position + eviction.num_tokens) + eviction.shift
        table = list(eviction.seq.block_table)
        evicted_blocks = eviction.shift // size
        kept_from = eviction.first_position // size
        old_table = table[:kept_from] + [None] * evicted_blocks + table[kept_from:]
        slots = torch.tensor([old_table[p // size] * size + p % size for p in old.tolist()])
        before = engine.kv_cache[:, 0].flatten(1, 2)[:, slots].clone()
        apply(eviction)
        applied.append((eviction, slots, before))

    seq = run_wrapping_runner(engine, WINDOW, prompt, "apply_eviction", capture_and_apply)
    assert applied
    inv_freq = rope_inv_freq(seq.rope_plan).double()
    for eviction, slots, before in applied:
        n = eviction.num_tokens
        new = torch.arange(eviction.first_position, eviction.first_position + n)
        after = engine.kv_cache[:, 0].flatten(1, 2)[:, slots]  # same slots: blocks stay put
        ones = torch.ones(n, dtype=torch.float64)
        old_cos, old_sin = rope_cos_sin(new + eviction.shift, inv_freq.expand(n, -1), ones)
        new_cos, new_sin = rope_cos_sin(new, inv_freq.expand(n, -1), ones)
        for layer in range(before.shape[0]):
            expected = rotate_by(rotate_by(before[layer].double(), old_cos.double(), -old_sin.double()),
                                 new_cos.double(), new_sin.double())
            assert torch.allclose(after[layer].double(), expected, atol=1e-4)
        break  # the first eviction: later ones overwrite these slots' contents with newer tokens


def test_sink_window_shorter_than_its_window_equals_none(default_llm):
    prompts = [default_llm.tokenizer.encode("The history of the Roman Empire began"),
               default_llm.tokenizer.encode("List three facts about the Moon:\n1.")]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1)
    none = default_llm.generate(prompts, params)
    windowed = default_llm.generate(prompts, params, context=ContextParams(
        context_policy={"type": "sink_window", "sinks": 4, "window": 256}))
    for a, b in zip(none, windowed):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [t.logprob for t in a.outputs[0].logprobs] == [t.logprob for t in b.outputs[0].logprobs]


def test_next_turn_continues_from_the_retained_session(make_llm):
    llm = make_llm()
    engine = llm.engine
    store = engine.scheduler.sessions
    history = long_text_ids(llm.tokenizer, 300)
    context = ContextParams(context_policy=WINDOW)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = llm.generate([history], params, context=context)[0]
    assert store.num_blocks > 0 and store.misses == 1
    # All but the last sampled token were computed; the cache kept sinks + at most the window (at
    # least the window less one eviction chunk).
    policy = ContextPolicy.from_dict(WINDOW)
    in_cache = len(history) + len(first.outputs[0].token_ids) - 1 - first.num_evicted_tokens
    assert policy.kept_tokens(16) <= in_cache <= policy.max_cache_tokens(16)
    turn_two = history + first.outputs[0].token_ids[:-1]  # the last sampled token was never computed
    turn_two = turn_two + first.outputs[0].token_ids[-1:] + llm.tokenizer.encode(" And then?")
    second = llm.generate([turn_two], params, context=context)[0]
    assert store.hits == 1
    assert second.num_cached_tokens == len(history) + len(first.outputs[0].token_ids) - 1
    assert len(second.outputs[0].token_ids) == 6
    assert second.num_evicted_tokens >= first.num_evicted_tokens > 0  # counted on from the session, not anew
    while store.release_oldest():
        pass
    assert engine.block_manager.num_free_blocks == engine.pool.num_blocks


def test_an_aborted_request_still_reports_the_tokens_its_cache_evicted(make_llm):
    engine = make_llm().engine
    prompt = long_text_ids(engine.tokenizer, 200)
    engine.add_request("cut", prompt, SamplingParams(temperature=0, max_tokens=50),
                       ContextParams(context_policy=WINDOW))
    outputs = []
    while not outputs:  # the prompt's chunks, then the first token
        outputs = engine.step()
    assert outputs[0].num_evicted_tokens > 0
    # Aborting frees the cache (not retained), and the last output keeps the count.
    assert engine.abort_request("cut").num_evicted_tokens == outputs[0].num_evicted_tokens
