"""RopePlans in the engine: exactness within the trained context, mixed plans in one batch,
whole-model logits against transformers under scaling, and plan growth mid-generation."""

import pytest
import torch
from tiny_models import save_tiny_model

from ropeway import LLM, ContextParams, SamplingParams
from ropeway.kernels.rotary import rope_cos_sin, rotate_by
from ropeway.models import ForwardBatch
from ropeway.arith import cdiv
from ropeway.models import rope_inv_freq, rope_parameters

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
PROMPTS = ["The history of the Roman Empire began", "List three facts about the Moon:\n1."]


def forward_logits(engine, ids: list[int], plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt logits for every position under `plan`, in a private cache; also the cache."""
    cfg, block_size, n = engine.model_config, engine.config.block_size, len(ids)
    blocks = cdiv(n, block_size)
    kv_cache = torch.zeros(cfg.num_layers, 2, blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    positions = torch.arange(n)
    inv_freq, factor = rope_parameters(plan)
    batch = ForwardBatch(
        input_ids=torch.tensor(ids), positions=positions, seq_index=torch.zeros(n, dtype=torch.int32),
        slot_mapping=positions.clone(), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        seq_lens=torch.tensor([n], dtype=torch.int32),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None], inv_freq=inv_freq[None],
        attention_factor=torch.tensor([factor]), logits_indices=torch.arange(n), max_query_len=n, max_seq_len=n)
    return engine.model.forward(batch, kv_cache), kv_cache


def test_dynamic_within_trained_context_is_bit_identical_to_none(default_llm, make_llm):
    dynamic = make_llm(rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    assert dynamic.engine.max_model_len > default_llm.engine.max_model_len
    for ours, theirs in zip(default_llm.generate(PROMPTS, GREEDY), dynamic.generate(PROMPTS, GREEDY)):
        a, b = ours.outputs[0], theirs.outputs[0]
        assert a.token_ids == b.token_ids
        assert [t.logprob for t in a.logprobs] == [t.logprob for t in b.logprobs]


MIXED_PLANS = [
    None,
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0},
    {"rope_type": "linear", "factor": 2.0},
]


def first_tokens(engine, requests, count: int) -> dict[str, list[int]]:
    """Run the given (id, prompt, max_tokens, context) requests until each has `count` tokens."""
    for request_id, prompt, max_tokens, context in requests:
        engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                              ignore_eos=True), context)
    tokens = {}
    while len(tokens) < len(requests):
        for out in engine.step():
            if len(out.outputs[0].token_ids) >= count:
                tokens.setdefault(out.request_id, out.outputs[0].token_ids[:count])
    for request_id, *_ in requests:
        engine.abort_request(request_id)
    return tokens


@pytest.mark.slow
def test_a_batch_mixing_plans_gives_each_request_its_output_alone(make_llm):
    llm = make_llm(max_model_len=20000)
    engine = llm.engine
    prompt = llm.tokenizer.encode(PROMPTS[0])
    # The dynamic request plans for 12k tokens: past the trained 8k, so its base really changes.
    requests = [(f"r{i}", prompt, 12000 if i == 1 else 64, ContextParams(rope_scaling=s))
                for i, s in enumerate(MIXED_PLANS)]
    together = first_tokens(engine, requests, 12)
    plans = {engine.scheduler.planner.plan(len(prompt) + r[2], r[3].rope_scaling)
             for r in requests}
    assert len(plans) == 4
    for request in requests:
        alone = first_tokens(engine, [(request[0] + "-alone",) + request[1:]], 12)
        assert alone[request[0] + "-alone"] == together[request[0]], request[3]
    assert engine.block_manager.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0},
])
def test_prompt_logits_match_transformers_under_scaling(tmp_path, rope):
    hf_model = save_tiny_model(tmp_path, "llama", max_position_embeddings=64,
                               rope_parameters={**rope, "rope_theta": 10000.0})
    llm = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory_bytes=1 << 22)
    assert llm.engine.max_model_len == min(64 * rope["factor"], llm.engine.pool.num_tokens)
    ids = list(range(3, 114))  # 111 tokens: past the trained 64
    # Our plan is for 112 tokens (prompt + 1 generated); transformers' dynamic NTK takes its base
    # from the sequence it sees, so it gets 112 tokens and we compare the first 111 positions.
    plan = llm.engine.planner.plan(len(ids) + 1)
    ours, _ = forward_logits(llm.engine, ids, plan)
    with torch.no_grad():
        theirs = hf_model(torch.tensor([ids + [7]])).logits[0, : len(ids)].float()
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_plan_growth_rerotates_the_cache_to_the_new_plan(tmp_path):
    save_tiny_model(tmp_path, "llama", max_position_embeddings=64)
    llm = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory_bytes=1 << 22,
              rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    engine, block_size = llm.engine, llm.engine.config.block_size
    prompt = list(b"A prompt of some forty bytes, give or take.")
    short = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)  # 63 tokens: the model's plan
    alone = llm.generate([prompt], short)[0].outputs[0].token_ids

    # "short" runs beside "long" and shares its first prompt blocks (through the prefix cache);
    # "long" has a longer prompt, so it outgrows the trained 64 tokens while "short" still runs.
    engine.add_request("long", prompt + list(b" and more"), SamplingParams(temperature=0, max_tokens=None,
                                                                       ignore_eos=True))
    engine.add_request("short", prompt, short)
    seq = engine.requests["long"].choices[0].seq
    short_seq = engine.requests["short"].choices[0].seq
    assert seq.rope_plan == engine.planner.model_plan  # planned for its prompt only
    while seq.num_computed_tokens < 64:
        engine.step()
    shared = seq.block_table[:2]
    assert short_seq.block_table[:2] == shared
    assert engine.scheduler.num_plan_growths == 0
    n = seq.num_computed_tokens
    slots = torch.tensor([seq.block_table[p // block_size] * block_size + p % block_size for p in range(n)])
    k_before = engine.kv_cache[:, 0].flatten(1, 2)[:, slots].clone()
    old_plan = seq.rope_plan
    engine.step()  # position 64 is past the trained length: the plan grows before this step
    assert engine.scheduler.num_plan_growths == 1
    new_plan = seq.rope_plan
    assert new_plan.planned_length >= 128 and new_plan != old_plan
    slots = torch.tensor([seq.block_table[p // block_size] * block_size + p % block_size for p in range(n)])
    k_after = engine.kv_cache[:, 0].flatten(1, 2)[:, slots]

    # Every layer: the old keys taken back to no rotation and rotated afresh, in fp64.
    positions = torch.arange(n)
    old_cos, old_sin = (t.double() for t in rope_cos_sin(positions, rope_inv_freq(old_plan).double().expand(n, -1),
                                                          torch.ones(n, dtype=torch.float64)))
    new_cos, new_sin = (t.double() for t in rope_cos_sin(positions, rope_inv_freq(new_plan).double().expand(n, -1),
                                                          torch.ones(n, dtype=torch.float64)))
    for layer in range(k_before.shape[0]):
        unrotated = rotate_by(k_before[layer].double(), old_cos, -old_sin)
        expected = rotate_by(unrotated, new_cos, new_sin)
        assert torch.allclose(k_after[layer].double(), expected, atol=1e-4), layer
    # Layer 0's input does not depend on RoPE: there the keys equal a forward pass from scratch.
    _, fresh_cache = forward_logits(engine, seq.token_ids[:n], new_plan)
    assert torch.allclose(k_after[0], fresh_cache[0, 0].flatten(0, 1)[:n], atol=1e-4)

    # The blocks it shared were copied first, not rotated under the short request's feet.
    assert not set(shared) & set(seq.block_table)
    assert short_seq.block_table[:2] == shared
    engine.abort_request("long")
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished["short"].outputs[0].token_ids == alone
    assert engine.block_manager.num_free_blocks == engine.pool.num_blocks
