"""RopePlan formulas against transformers' ROPE_INIT_FUNCTIONS, bucketing, planning and growth."""

import random

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ropeway.sampling_params import InvalidParameter
from ropeway.scheduler import RopePlanner, RopeScaling, bucket_length
from ropeway.models import rope_parameters


def hf_config(head_dim, trained, rope_parameters):
    return transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                    max_position_embeddings=trained, rope_parameters=dict(rope_parameters))


def hf_parameters(kind, head_dim, trained, base, scaling, planned):
    """What transformers computes for the same settings (ntk and dynamic-yarn expressed in its terms)."""
    params = {k: v for k, v in scaling.items() if k != "rope_type"}
    if kind == "none":
        cfg = hf_config(head_dim, trained, {"rope_type": "default", "rope_theta": base})
        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    if kind == "ntk":  # static NTK-aware: the default init at base * factor^(d/(d-2))
        scaled = base * params["factor"] ** (head_dim / (head_dim - 2))
        cfg = hf_config(head_dim, trained, {"rope_type": "default", "rope_theta": scaled})
        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    if kind == "dynamic-yarn":  # YaRN with s = L / L_train
        original = params.get("original_max_position_embeddings", trained)
        params["factor"] = planned / original
        params["original_max_position_embeddings"] = original
        kind = "yarn"
    cfg = hf_config(head_dim, trained, {"rope_type": kind, "rope_theta": base, **params})
    return ROPE_INIT_FUNCTIONS[kind](cfg, None, seq_len=planned)


def random_scaling(kind, rng: random.Random, trained: int) -> dict:
    scaling = {"rope_type": kind}
    if kind in ("linear", "ntk", "dynamic", "yarn", "llama3"):
        scaling["factor"] = rng.choice([1.5, 2.0, 3.0, 4.0, 8.0, 16.0, 5.5])
    if kind in ("yarn", "dynamic-yarn", "llama3") and rng.random() < 0.7:
        scaling["original_max_position_embeddings"] = rng.choice([trained, trained // 2, trained // 4])
    if kind in ("yarn", "dynamic-yarn"):
        if rng.random() < 0.5:
            scaling["beta_fast"] = rng.choice([8.0, 16.0, 32.0, 64.0])
            scaling["beta_slow"] = rng.choice([0.5, 1.0, 2.0])
        if rng.random() < 0.4:
            scaling["truncate"] = rng.random() < 0.5
        if rng.random() < 0.3:
            scaling["mscale"], scaling["mscale_all_dim"] = rng.choice([(1.0, 0.5), (0.707, 0.707), (1.0, 1.0)])
        elif rng.random() < 0.2:
            scaling["attention_factor"] = rng.choice([1.0, 1.2])
    if kind == "llama3":
        scaling["low_freq_factor"], scaling["high_freq_factor"] = rng.choice([(1.0, 4.0), (2.0, 8.0), (0.5, 2.0)])
    return scaling


@pytest.mark.parametrize("kind", ["none", "linear", "ntk", "dynamic", "yarn", "dynamic-yarn", "llama3"])
def test_parameters_equal_transformers_over_random_configs(kind):
    rng = random.Random(hash(kind) % 1000)
    for _ in range(25):
        head_dim = rng.choice([32, 64, 80, 128])
        trained = rng.choice([2048, 4096, 8192])
        base = rng.choice([10000.0, 100000.0, 500000.0, 1e6])
        scaling = random_scaling(kind, rng, trained)
        planner = RopePlanner(base, head_dim, trained, RopeScaling.from_dict(scaling))
        planned_length = rng.randint(trained + 1, 8 * trained)
        plan = planner.plan(planned_length)
        inv_freq, factor = rope_parameters(plan)
        expected_inv_freq, expected_factor = hf_parameters(kind, head_dim, trained, base, scaling,
                                                           plan.planned_length or planned_length)
        assert torch.equal(inv_freq, expected_inv_freq), (kind, scaling, head_dim, base)
        assert factor == pytest.approx(expected_factor, rel=1e-12), (kind, scaling)


@pytest.mark.parametrize("kind", ["dynamic", "dynamic-yarn"])
def test_length_dependent_plans_within_the_trained_context_are_the_models_own(kind):
    planner = RopePlanner(10000.0, 64, 4096, RopeScaling.from_dict({"rope_type": kind, "factor": 4.0}))
    assert planner.plan(4096) is planner.model_plan
    assert planner.plan(10) is planner.model_plan
    assert planner.plan(4097) != planner.model_plan


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0}, {"rope_type": "ntk", "factor": 4.0},
                                     {"rope_type": "yarn", "factor": 4.0},
                                     {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0}],
                         ids=lambda scaling: scaling["rope_type"])
def test_static_plans_change_even_short_prompts(scaling):
    """What docs/server.md tells users: a static type rotates a 10-token prompt differently from
    the model's own RoPE (its outputs change), unlike dynamic and dynamic-yarn above."""
    planner = RopePlanner(10000.0, 64, 4096, RopeScaling.from_dict(scaling))
    plan = planner.plan(10)
    own_inv_freq, own_factor = rope_parameters(planner.model_plan)
    inv_freq, factor = rope_parameters(plan)
    assert plan.cache_key != planner.model_plan.cache_key
    assert not torch.equal(inv_freq, own_inv_freq) or factor != own_factor


def test_buckets_are_eighths_of_a_power_of_two_and_shared():
    assert [bucket_length(n) for n in (1, 8, 9, 16, 17, 100, 1000, 8193, 9000, 12289)] == \
        [1, 8, 9, 16, 18, 104, 1024, 9216, 9216, 13312]
    for n in range(1, 5000):
        b = bucket_length(n)
        assert n <= b <= n * 1.125 + 1
    planner = RopePlanner(10000.0, 64, 4096, RopeScaling.from_dict({"rope_type": "dynamic", "factor": 8.0}))
    assert planner.plan(9000) == planner.plan(9100)
    assert planner.plan(9000).cache_key == planner.plan(9100).cache_key
    assert planner.plan(9000).cache_key != planner.plan(9300).cache_key


def test_growth_doubles_and_static_plans_never_grow():
    dynamic = RopeScaling.from_dict({"rope_type": "dynamic", "factor": 8.0})
    planner = RopePlanner(10000.0, 64, 4096, dynamic)
    plan = planner.model_plan
    growths = 0
    for length in range(4000, 32768, 97):
        grown = planner.grow(plan, length, None, 32768)
        if grown is not None:
            assert grown.planned_length >= length
            plan, growths = grown, growths + 1
    assert growths <= 4  # 4096 -> 8192 -> 16384 -> 32768: logarithmic in the length
    linear = RopePlanner(10000.0, 64, 4096, RopeScaling.from_dict({"rope_type": "linear", "factor": 2.0}))
    assert linear.grow(linear.plan(100), 30000, None, 32768) is None


@pytest.mark.parametrize("bad, param", [
    ({"rope_type": "spiral", "factor": 2}, "rope_scaling.rope_type"),
    ({"rope_type": "linear"}, "rope_scaling.factor"),
    ({"rope_type": "dynamic", "factor": 0.5}, "rope_scaling.factor"),
    ({"rope_type": "dynamic", "factor": "4"}, "rope_scaling.factor"),
    ({"rope_type": "yarn", "factor": 4, "beta_fast": -1}, "rope_scaling.beta_fast"),
    ({"rope_type": "yarn", "factor": 4, "truncate": "yes"}, "rope_scaling.truncate"),
    ({"rope_type": "yarn", "factor": 4, "colour": 1}, "rope_scaling.colour"),
    ({"rope_type": "llama3", "factor": 8}, "rope_scaling"),
    ({"rope_type": "linear", "factor": 2, "original_max_position_embeddings": 0},
     "rope_scaling.original_max_position_embeddings"),
])
def test_bad_scaling_settings_name_the_field(bad, param):
    with pytest.raises(InvalidParameter) as error:
        RopeScaling.from_dict(bad)
    assert error.value.param == param


def test_model_config_sections_are_accepted_as_written():
    llama31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3", "rope_theta": 500000.0}
    scaling = RopeScaling.from_dict(llama31)
    assert scaling.rope_type == "llama3"
    assert scaling.context_limit(131072) == 131072
    assert RopeScaling.from_dict({"type": "linear", "factor": 2.0}).context_limit(4096) == 8192
    assert RopeScaling.from_dict({"rope_type": "default"}).is_none
