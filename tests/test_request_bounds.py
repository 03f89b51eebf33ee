"""The one bounds table (ropeway/request_bounds.py): SamplingParams, ContextPolicy and RopeScaling
refuse a value just outside each bound, naming the field, and accept the bound itself; at the
largest RoPE factor every type's parameters stay finite and non-zero."""

import math

import pytest

from ropeway import InvalidParameter, SamplingParams
from ropeway.models import effective_base, rope_parameters
from ropeway.request_bounds import (CONTEXT_POLICY_BOUNDS, MAX_ROPE_SCALING_VALUE, MAX_STOP_STRING_CHARS,
                                   MAX_STOP_TOKEN_IDS, SAMPLING_BOUNDS, Bound)
from ropeway.scheduler import ContextPolicy, RopePlanner, RopeScaling

SAMPLING_FIELDS = [name for name in SAMPLING_BOUNDS if hasattr(SamplingParams(), name)]


def outside(bound: Bound) -> list:
    """Values just past each end, and values no number field may take."""
    step = 1 if bound.integer else 1e-3
    values = [bound.high + step, float("nan"), float("inf"), "1", True]
    values.append(bound.low if bound.low_open else bound.low - step)
    if bound.integer:
        values += [1.5] + [huge for huge in (2**63, 2**64) if huge > bound.high]
    return values


def inside(bound: Bound) -> list:
    low = bound.low + (1e-3 if bound.low_open else 0)
    return [int(low) if bound.integer else low, int(bound.high) if bound.integer else bound.high]


@pytest.mark.parametrize("name", SAMPLING_FIELDS)
def test_sampling_params_refuse_values_outside_the_table_naming_the_field(name):
    bound = SAMPLING_BOUNDS[name]
    for value in outside(bound):
        with pytest.raises(InvalidParameter) as refused:
            SamplingParams(**{name: value})
        assert refused.value.param == name, value
        assert bound.describe() in str(refused.value)
    for value in inside(bound):
        assert getattr(SamplingParams(**{name: value}), name) in (value, 0)  # top_k -1 reads as 0 (off)


def test_stop_strings_and_stop_token_ids_are_bounded():
    SamplingParams(stop=["x" * MAX_STOP_STRING_CHARS], stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)))
    with pytest.raises(InvalidParameter, match="characters") as refused:
        SamplingParams(stop=["x" * (MAX_STOP_STRING_CHARS + 1)])
    assert refused.value.param == "stop"
    with pytest.raises(InvalidParameter) as refused:
        SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))
    assert refused.value.param == "stop_token_ids"
    with pytest.raises(InvalidParameter):
        SamplingParams(stop_token_ids=[True])


@pytest.mark.parametrize("name", list(CONTEXT_POLICY_BOUNDS))
def test_context_policy_refuses_values_outside_the_table(name):
    kind = "landmark" if name in ("landmarks", "retrieve") else "sink_window"
    for value in outside(CONTEXT_POLICY_BOUNDS[name]):
        with pytest.raises(InvalidParameter) as refused:
            ContextPolicy.from_dict({"type": kind, name: value})
        assert refused.value.param == f"context_policy.{name}"


@pytest.mark.parametrize("value", [1e35, 1e305, 1e309, MAX_ROPE_SCALING_VALUE + 1, 0.5, float("nan"), "2", [2]])
def test_rope_scaling_factors_outside_the_table_are_refused(value):
    for kind in ("linear", "ntk", "dynamic", "yarn"):
        with pytest.raises(InvalidParameter) as refused:
            RopeScaling.from_dict({"rope_type": kind, "factor": value})
        assert refused.value.param == "rope_scaling.factor"


@pytest.mark.parametrize("rope_type", [["ntk"], {"a": 1}, 7])
def test_a_rope_type_that_is_not_a_string_is_refused(rope_type):
    with pytest.raises(InvalidParameter) as refused:
        RopeScaling.from_dict({"rope_type": rope_type, "factor": 2})
    assert refused.value.param == "rope_scaling.rope_type"


MAXIMAL = {
    "linear": {}, "ntk": {}, "dynamic": {}, "yarn": {"beta_fast": 32, "beta_slow": 1},
    "dynamic-yarn": {}, "llama3": {"low_freq_factor": 1, "high_freq_factor": 4},
}


@pytest.mark.parametrize("rope_type", list(MAXIMAL))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("base", [1e4, 1e5, 5e5, 1e6])
def test_plans_stay_finite_up_to_the_largest_factor(rope_type, head_dim, base):
    trained = 8192
    scaling = RopeScaling.from_dict({"rope_type": rope_type, "factor": MAX_ROPE_SCALING_VALUE, **MAXIMAL[rope_type]})
    plan = RopePlanner(base, head_dim, trained, scaling).plan(int(trained * MAX_ROPE_SCALING_VALUE), scaling)
    inv_freq, attention_factor = rope_parameters(plan)
    assert bool((inv_freq > 0).all()) and bool(inv_freq.isfinite().all())
    assert math.isfinite(attention_factor) and attention_factor > 0
    assert math.isfinite(effective_base(plan))
