"""Asynchronous scheduling on the real default model (forced on here; on by default on CUDA):
step N+1 is launched before step N's tokens are read, and every request still gets exactly
what the synchronous engine gives it."""

import pytest

from batching_cases import GREEDY, prompts_of_mixed_lengths
from ropeway import ContextParams, SamplingParams
from ropeway.engine.core import PLACEHOLDER


def run(llm, prompts, params_list, contexts=None):
    """Generate, counting the steps that left their tokens in flight."""
    engine = llm.engine
    in_flight = 0
    contexts = contexts or [None] * len(prompts)
    for i, (prompt, params, context) in enumerate(zip(prompts, params_list, contexts)):
        engine.add_request(f"r{i}", prompt, params, context)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
        in_flight += engine._in_flight is not None
    return [finals[f"r{i}"] for i in range(len(prompts))], in_flight


@pytest.fixture(scope="module")
def prompts(default_llm):
    return prompts_of_mixed_lengths(default_llm.tokenizer)


@pytest.mark.slow
def test_greedy_batch_with_chunked_prefill_matches_synchronous(make_llm, prompts):
    options = dict(max_num_batched_tokens=48, prefill_chunk_size=16, max_num_seqs=8)
    expected, none_in_flight = run(make_llm(async_scheduling=False, **options), prompts, [GREEDY] * len(prompts))
    llm = make_llm(async_scheduling=True, **options)
    got, in_flight = run(llm, prompts, [GREEDY] * len(prompts))
    assert none_in_flight == 0 and in_flight > 20
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in expected]
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.pool.num_blocks - engine.scheduler.sessions.num_blocks
    assert engine.stats_totals.generation_tokens == 24 * len(prompts)


@pytest.mark.slow
def test_stops_mid_flight_drop_the_extra_token(make_llm, prompts, default_llm):
    """Stop strings, stop tokens and EOS are seen only when a token is read, a step after it
    was computed: the extra step's token must not leak into the output."""
    reference = make_llm(async_scheduling=False)
    free_run = reference.generate([prompts[3]], GREEDY)[0].outputs[0]
    stop_text = free_run.text[len(free_run.text) // 3 : len(free_run.text) // 3 + 6]
    stop_token = free_run.token_ids[7]
    params = [SamplingParams(temperature=0, max_tokens=24, stop=[stop_text]),
              SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_token]),
              SamplingParams(temperature=0, max_tokens=24),
              GREEDY]
    chosen = [prompts[3], prompts[3], prompts[1], prompts[2]]
    expected, _ = run(make_llm(async_scheduling=False), chosen, params)
    llm = make_llm(async_scheduling=True)
    got, in_flight = run(llm, chosen, params)
    assert in_flight > 0
    for g, e in zip(got, expected):
        assert (g.outputs[0].token_ids, g.outputs[0].text, g.outputs[0].finish_reason, g.outputs[0].stop_reason) == \
            (e.outputs[0].token_ids, e.outputs[0].text, e.outputs[0].finish_reason, e.outputs[0].stop_reason)
    assert got[0].outputs[0].finish_reason == "stop" and got[1].outputs[0].stop_reason == stop_token
    for seq_owner in got:
        assert PLACEHOLDER not in seq_owner.outputs[0].token_ids
    engine = llm.engine
    assert engine.block_manager.num_free_blocks == engine.pool.num_blocks - engine.scheduler.sessions.num_blocks


@pytest.mark.slow
def test_every_kind_of_request_pipelines_and_matches_synchronous(make_llm, prompts):
    """Seeded sampling with filters, penalties, logprobs, prompt logprobs and a bounded cache: every
    step leaves its results in flight, and each request gets what the synchronous engine gives."""
    long = dict(max_tokens=24, ignore_eos=True)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=11, **long),
              SamplingParams(temperature=1.0, top_k=20, min_p=0.05, seed=3, logprobs=5, **long),
              SamplingParams(temperature=0.7, seed=5, presence_penalty=0.5, frequency_penalty=0.3,
                             repetition_penalty=1.2, **long),
              SamplingParams(temperature=0, prompt_logprobs=True, prompt_top_logprobs=2, logprobs=1, **long),
              SamplingParams(temperature=0.9, seed=8, max_tokens=64, ignore_eos=True),  # past its window of 32
              GREEDY]
    window = ContextParams(context_policy={"type": "sink_window", "sinks": 4, "window": 32})
    contexts = [None, None, None, None, window, None]
    options = dict(max_num_batched_tokens=48, prefill_chunk_size=16, max_num_seqs=8)
    expected, _ = run(make_llm(async_scheduling=False, **options), prompts, params, contexts)
    llm = make_llm(async_scheduling=True, **options)
    got, in_flight = run(llm, prompts, params, contexts)
    assert in_flight >= llm.engine.stats_totals.steps - 1  # every step but the last left its results in flight
    for g, e in zip(got, expected):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
    assert [t.logprob for t in got[1].outputs[0].logprobs] == pytest.approx(
        [t.logprob for t in expected[1].outputs[0].logprobs])
    assert [t.top for t in got[1].outputs[0].logprobs] == [t.top for t in expected[1].outputs[0].logprobs]
    prompt_logprobs, top = got[3].prompt_logprobs, got[3].prompt_top_logprobs
    assert len(prompt_logprobs) == len(prompts[3]) and prompt_logprobs[0] is None
    assert prompt_logprobs[1:] == pytest.approx(expected[3].prompt_logprobs[1:])
    expected_top = expected[3].prompt_top_logprobs
    assert [[t for t, _ in entry] for entry in top] == [[t for t, _ in entry] for entry in expected_top]
    assert llm.engine.scheduler.num_evictions > 0
    assert not llm.engine.penalty_state._rows  # every penalty row given back


@pytest.mark.slow
def test_pool_pressure_preemption_matches_synchronous(make_llm, default_llm, prompts):
    options = dict(kv_cache_memory_bytes=24 * default_llm.engine.pool.bytes_per_block,
                   max_num_batched_tokens=64, prefill_chunk_size=32, max_num_seqs=8)
    expected, _ = run(make_llm(async_scheduling=False, **options), prompts, [GREEDY] * len(prompts))
    llm = make_llm(async_scheduling=True, **options)
    got, in_flight = run(llm, prompts, [GREEDY] * len(prompts))
    assert in_flight > 0 and llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.pool.num_blocks


@pytest.mark.slow
def test_abort_while_a_step_is_in_flight_frees_blocks_and_leaks_nothing(make_llm, prompts):
    llm = make_llm(async_scheduling=True)
    engine = llm.engine
    engine.add_request("gone", prompts[2], GREEDY)
    engine.add_request("stays", prompts[1], GREEDY)
    while not engine.requests["gone"].choices[0].seq.output_token_ids:
        engine.step()
    engine.step()
    assert engine._in_flight is not None
    aborted = engine.abort_request("gone")
    assert aborted.outputs[0].finish_reason == "abort"
    assert PLACEHOLDER not in aborted.outputs[0].token_ids + aborted.outputs[0].delta_token_ids
    # The same id again, at once: the in-flight token of the aborted sequence must not reach it.
    engine.add_request("gone", prompts[4], GREEDY)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    alone = make_llm(async_scheduling=False)
    assert finals["gone"].outputs[0].token_ids == alone.generate([prompts[4]], GREEDY)[0].outputs[0].token_ids
    assert finals["stays"].outputs[0].token_ids == alone.generate([prompts[1]], GREEDY)[0].outputs[0].token_ids
    assert engine.block_manager.num_free_blocks == engine.pool.num_blocks - engine.scheduler.sessions.num_blocks


@pytest.mark.slow
def test_a_lone_chunked_prompt_with_prompt_logprobs_pipelines(make_llm, prompts):
    """Steps that sample nothing (a prompt's first chunks) are in flight too, and leave no
    tokens for the next step to take."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=True)
    options = dict(max_num_batched_tokens=16, prefill_chunk_size=16, max_num_seqs=2)
    prompt = prompts[3]
    assert len(prompt) > 32
    expected, _ = run(make_llm(async_scheduling=False, **options), [prompt], [params])
    got, in_flight = run(make_llm(async_scheduling=True, **options), [prompt], [params])
    assert in_flight > 2
    assert got[0].outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert got[0].prompt_logprobs[1:] == pytest.approx(expected[0].prompt_logprobs[1:])
