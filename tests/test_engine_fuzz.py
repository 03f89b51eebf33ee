"""Fuzzing the engine's request types (hypothesis): random SamplingParams and ContextParams,
extreme values included, through the real engine core in this process (default model). Each is
either refused with InvalidParameter naming one of the fields it was given, or served to its end;
the engine never stops and never leaks a block."""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ropeway import ContextParams, InvalidParameter, SamplingParams
from ropeway.request_bounds import CONTEXT_POLICY_BOUNDS, ROPE_SCALING_BOUNDS, SAMPLING_BOUNDS
from ropeway.scheduler import POLICY_TYPES, ROPE_TYPES

MAX_MODEL_LEN = 24
PROMPT = [1, 2, 3, 4, 5, 6]

# Values no field should choke on: the ends of int64 and past them, non-finite floats, wrong types.
HOSTILE = st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 0.5, -0.0, 1e-320,
                           1e308, math.inf, -math.inf, math.nan, "1", True, False, None, [], {}])


def near(bound) -> st.SearchStrategy:
    """Values at and around a bound's ends, and inside it."""
    low, high = bound.low, bound.high
    if bound.integer:
        inside = st.integers(int(low), int(min(high, low + 8)))
        return st.one_of(inside, st.sampled_from([int(low), int(low) - 1, int(high), int(high) + 1]))
    return st.one_of(st.floats(low, high, allow_nan=False),
                     st.sampled_from([low, high, low - 1e-6, high + 1e-6, math.nextafter(low, math.inf)]))


def field_values(bounds: dict) -> st.SearchStrategy:
    return st.dictionaries(st.sampled_from(sorted(bounds)),
                           st.one_of(*(near(b) for b in bounds.values()), HOSTILE), max_size=4)


def cheap(draw_value, name):
    # Served requests must stay small: many choices or long waits would make each example slow.
    return draw_value if name != "n" or not isinstance(draw_value, int) or draw_value > 128 else min(draw_value, 3)


@st.composite
def sampling_kwargs(draw) -> dict:
    sampling_fields = {name: bound for name, bound in SAMPLING_BOUNDS.items() if hasattr(SamplingParams(), name)}
    kwargs = {name: cheap(value, name) for name, value in draw(field_values(sampling_fields)).items()}
    if draw(st.booleans()):
        kwargs["stop"] = draw(st.lists(st.text(max_size=4), max_size=3))
    if draw(st.booleans()):
        kwargs["stop_token_ids"] = draw(st.lists(st.one_of(st.integers(0, 60_000), HOSTILE), max_size=3))
    return kwargs


@st.composite
def context_kwargs(draw) -> dict:
    kwargs = {}
    if draw(st.booleans()):
        scaling = draw(field_values(ROPE_SCALING_BOUNDS))
        scaling["rope_type"] = draw(st.one_of(st.sampled_from(ROPE_TYPES), HOSTILE))
        kwargs["rope_scaling"] = scaling
    if draw(st.booleans()):
        policy = draw(field_values(CONTEXT_POLICY_BOUNDS))
        policy["type"] = draw(st.one_of(st.sampled_from(POLICY_TYPES), HOSTILE))
        kwargs["context_policy"] = policy
    return kwargs


@pytest.fixture(scope="module")
def engine(make_llm):
    return make_llm(max_model_len=MAX_MODEL_LEN, max_num_seqs=4, kv_cache_memory_bytes=8 << 20).engine


def named_field(error: InvalidParameter, given: dict) -> bool:
    root = error.param.split(".")[0]
    return root in given or root == "prompt"  # prompt: the request cannot fit the context


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(sampling=sampling_kwargs(), context=context_kwargs())
def test_random_params_are_refused_naming_a_field_or_served_and_never_stop_the_engine(engine, sampling, context):
    try:
        params = SamplingParams(**{**sampling, "max_tokens": sampling.get("max_tokens", 4)})
        ctx = ContextParams(**context)
        engine.add_request("fuzz", PROMPT, params, ctx)
    except InvalidParameter as error:
        assert named_field(error, {**sampling, **context}), (error.param, str(error))
        assert error.args[0]
    else:
        steps = 0
        while engine.has_unfinished_requests():
            outputs = engine.step()  # raises for a failed request: a 500 would be an engine bug
            steps += 1
            assert steps < 10 * MAX_MODEL_LEN * max(1, params.n)
        assert all(output.finished for output in outputs if output.request_id == "fuzz")
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_used_blocks == engine.scheduler.sessions.num_blocks
