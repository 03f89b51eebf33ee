"""Landmark caches that retrieve: evicted blocks kept in host memory, the best brought back."""

import random

import numpy as np
import pytest
import torch
from bounded_streams import long_text_ids, stream_checking_positions

from ropeway.arith import cdiv
from ropeway import ContextParams, SamplingParams
from ropeway.engine import recall as recall_module
from ropeway.engine.recall import ArchiveBudget, RecallArchive
from ropeway.sampling_params import InvalidParameter
from ropeway.scheduler import ContextPolicy, SchedulerOutput
from ropeway.models import rope_parameters
from ropeway.kernels.rerotate import rerotate_keys_reference

# Block size 16: one sink block, one landmark block, two recall blocks, window 64.
RETRIEVING = {"type": "landmark", "sinks": 4, "window": 64, "landmarks": 4, "retrieve": 32}
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.mark.parametrize("bad", [{"type": "sink_window", "retrieve": 16},
                                 {"type": "landmark", "retrieve": -1},
                                 {"type": "landmark", "retrieve": 1.5},
                                 {"type": "landmark", "window": 64, "landmarks": 16, "retrieve": 64}])
def test_bad_retrieve_names_the_field(bad):
    with pytest.raises(InvalidParameter) as error:
        ContextPolicy.from_dict(bad)
    assert error.value.param == "context_policy.retrieve"


def test_retrieve_comes_without_landmark_summaries_unless_they_are_asked_for():
    retrieving = ContextPolicy.from_dict({"type": "landmark", "window": 64, "retrieve": 32})
    assert (retrieving.landmarks, retrieving.landmark_blocks(16), retrieving.recall_blocks(16)) == (0, 0, 2)
    assert ContextPolicy(type="landmark", retrieve=32).landmarks == 0
    assert ContextPolicy.from_dict({"type": "landmark"}).landmarks == 64
    assert ContextPolicy.from_dict({"type": "landmark", "landmarks": 2, "retrieve": 32}).landmarks == 2
    for bad in ({"type": "landmark", "landmarks": 0}, {"type": "landmark", "landmarks": 0, "retrieve": 0}):
        with pytest.raises(InvalidParameter) as error:
            ContextPolicy.from_dict(bad)
        assert error.value.param == "context_policy.landmarks" and "retrieve" in str(error.value)


def test_recall_region_sits_between_landmarks_and_window():
    policy = ContextPolicy.from_dict(RETRIEVING)
    assert (policy.sink_blocks(16), policy.landmark_blocks(16), policy.recall_blocks(16)) == (1, 1, 2)
    # The window is a ceiling: sink, landmark and recall blocks, then at most 64 window tokens.
    assert policy.max_cache_tokens(16) == 4 * 16 + 64
    assert policy.kept_tokens(16) == policy.max_cache_tokens(16) - policy.eviction_chunk(16)


def passkey_prompt(tokenizer, rng: random.Random) -> tuple[list[int], str]:
    """About 900 tokens: the passkey early (far outside a 256-token window), the question last."""
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    text = FILLER * 4 + needle + FILLER * 36 + " What is the pass key? The pass key is"
    return tokenizer.encode(text), key


@pytest.mark.slow
def test_retrieval_finds_a_passkey_long_evicted_that_landmarks_alone_lose(make_llm):
    llm = make_llm(max_num_batched_tokens=512)
    rng = random.Random(7)
    prompts, keys = zip(*(passkey_prompt(llm.tokenizer, rng) for _ in range(1)))
    params = SamplingParams(temperature=0, max_tokens=8)
    landmark = {"type": "landmark", "sinks": 4, "window": 256, "landmarks": 64}

    def found(policy: dict) -> int:
        outputs = llm.generate(list(prompts), params, context=ContextParams(context_policy=policy))
        return sum(key in out.outputs[0].text for out, key in zip(outputs, keys))

    assert found(landmark) < len(keys)
    recalls_before = llm.engine.runner.cache_ops.num_recalls
    summaries_before = llm.engine.stats().landmark_recomputations
    assert found({**landmark, "retrieve": 64}) == len(keys)
    assert llm.engine.runner.cache_ops.num_recalls >= recalls_before + len(keys)  # at least once per prompt
    assert llm.engine.stats().landmark_recomputations > summaries_before  # landmarks asked for: summaries too
    while llm.engine.scheduler.sessions.release_oldest():
        pass
    assert llm.engine.block_manager.num_free_blocks == llm.engine.pool.num_blocks


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "yarn", "factor": 4.0}])
def test_recalled_blocks_hold_archived_keys_rerotated_to_their_slots(make_llm, rope_scaling):
    """A stream of 10x the window in constant blocks; at the end of the prompt the recall
    region holds archived blocks: values as archived, keys moved from their eviction
    position to their slot (fp64 re-derivation), scoring keys the keys before RoPE (YaRN's
    attention factor undone)."""
    llm = make_llm(prefill_chunk_size=48, max_num_batched_tokens=64)
    engine = llm.engine
    policy = ContextPolicy.from_dict(RETRIEVING)
    prompt = long_text_ids(llm.tokenizer, 10 * policy.window)
    recalled = []
    recall = engine.runner.cache_ops.recall

    def recall_and_read(item):
        recall(item)
        seq = item.seq
        if item.samples:
            return  # the question's recall computes its blocks afresh (the next test)
        recalled.clear()  # the prompt's last recall before the question is checked
        for slot in range(2):
            block = seq.block_table[2 + slot]
            bias = engine.runner.cache_ops.slot_bias[block].clone()
            recalled.append((slot, engine.kv_cache[:, :, block].clone(), bias))

    engine.runner.cache_ops.recall = recall_and_read
    seq, seen = stream_checking_positions(llm, RETRIEVING, prompt, rope_scaling=rope_scaling)
    settled = [used for computed, used in seen if computed >= policy.max_cache_tokens(16)]
    assert len(settled) > 10 and max(settled) <= cdiv(policy.max_cache_tokens(16), 16)

    archive = seq.archive
    factor = engine.runner.rope_row(seq.rope_plan)[1]
    assert (factor != 1.0) == (rope_scaling is not None)
    assert archive.num_blocks == seq.num_evicted_tokens // 16 >= 20
    assert len(recalled) == 2 and all(torch.all(bias == 0) for _, _, bias in recalled)
    inv_freq = engine.runner.rope_row(seq.rope_plan)[0].double()
    chosen = []
    for slot, kv, _ in recalled:
        # Find the archived block by its values (exact copies), then check its keys.
        index = next(i for i in range(archive.num_blocks) if torch.equal(archive.block(i)[0][:, 1], kv[:, 1]))
        chosen.append(index)
        archived, old_position, _ = archive.block(index)
        new_position = (2 + slot) * 16
        delta = (new_position - old_position) * inv_freq  # the same for every token of the block
        cos, sin = torch.cos(delta), torch.sin(delta)
        k = archived[:, 0].double()
        half = k.shape[-1] // 2
        expected = torch.cat((k[..., :half] * cos - k[..., half:] * sin, k[..., half:] * cos + k[..., :half] * sin), -1)
        torch.testing.assert_close(kv[:, 0].double(), expected, atol=1e-4, rtol=1e-4)
    assert chosen == sorted(chosen)  # oldest first, as they stood in the stream

    # Scoring keys: every archived key before RoPE, rotated back in fp64; blocks know their tokens.
    archived, old_position, _ = archive.block(3)
    angles = torch.arange(old_position, old_position + 16, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cos(angles)[None, :, None], torch.sin(angles)[None, :, None]
    k = archived[:, 0].double()
    half = k.shape[-1] // 2
    unrotated = torch.cat((k[..., :half] * cos + k[..., half:] * sin, k[..., half:] * cos - k[..., :half] * sin), -1)
    unrotated /= factor
    assert archive.scoring_keys.shape[1] == archive.num_blocks * 16
    torch.testing.assert_close(archive.scoring_keys[:, 3 * 16 : 4 * 16].double(), unrotated, atol=1e-5, rtol=1e-5)
    assert archive.first_token(3) == 16 + 3 * 16  # after the sink block
    assert engine.runner.cache_ops.archive_budget.num_bytes == archive.num_bytes > 0


def test_the_questions_recalled_blocks_are_computed_afresh_where_they_sit(make_llm):
    """At a prompt's last chunk the recalled blocks' keys and values are those a plain prompt of
    the sink block and the recalled tokens gives at the same positions (not the archived ones,
    computed deep in the stream's past): what the oracle of benchmarks/needle.py shows the model."""
    llm = make_llm(prefill_chunk_size=48, max_num_batched_tokens=64)
    engine, size = llm.engine, 16
    policy = {"type": "landmark", "sinks": 4, "window": 64, "retrieve": 32}
    prompt = long_text_ids(llm.tokenizer, 600)
    seen = {}
    recall = engine.runner.cache_ops.recall

    def recall_and_note(item):
        recall(item)
        if item.samples:
            seq = item.seq
            seen.update(tokens=list(seq.archive.recalled_tokens),
                        blocks=seq.block_table[1:3],  # after the sink block: the recall region
                        archived=[seq.archive.block(i)[0].clone() for i in range(seq.archive.num_blocks)])

    engine.runner.cache_ops.recall = recall_and_note
    try:
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=1),
                     context=ContextParams(context_policy=policy))
    finally:
        engine.runner.cache_ops.recall = recall
    # The region is computed in the step's own pass, beside the question's chunk: read after it.
    seen["kv"] = engine.kv_cache[:, :, seen["blocks"]].clone()
    assert len(seen["tokens"]) == 2
    ids = prompt[:size] + [t for first in seen["tokens"] for t in prompt[first : first + size]]
    plain = plain_prefill_kv(engine, ids)  # [layers, 2, 3 blocks, 16, Hkv, D]
    torch.testing.assert_close(seen["kv"], plain[:, :, 1:3], atol=1e-4, rtol=1e-4)
    # And not merely the archived values brought back: those were computed in another context.
    assert not any(torch.allclose(seen["kv"][:, 1, 0], archived[:, 1], atol=1e-3) for archived in seen["archived"])


def test_the_region_computed_in_the_questions_own_pass_gives_what_a_pass_of_its_own_first_gives(make_llm):
    """The recalled region's tokens run in the question chunk's forward pass, as a sequence of
    their own: the question must read the region exactly as if it had been computed in a pass
    before the step (what the engine did before, one pass more)."""
    llm = make_llm(prefill_chunk_size=48, max_num_batched_tokens=64)
    runner = llm.engine.runner
    ops = runner.cache_ops
    policy = {"type": "landmark", "sinks": 4, "window": 64, "retrieve": 32}
    prompt = long_text_ids(llm.tokenizer, 600)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5)
    merged = llm.generate([prompt], params, context=ContextParams(context_policy=policy))[0].outputs[0]
    passes = []
    merge = ops.with_region_recomputes

    def region_first(step, logit_rows):
        recomputes, ops.region_recomputes = ops.region_recomputes, []
        if recomputes:
            passes.append(len(recomputes))
            runner.run(runner.build_batch(SchedulerOutput(scheduled=recomputes), [0] * len(recomputes)))
        return step, logit_rows

    ops.with_region_recomputes = region_first
    try:
        separate = llm.generate([prompt], params, context=ContextParams(context_policy=policy))[0].outputs[0]
    finally:
        ops.with_region_recomputes = merge
    assert passes == [1]  # the question recalled, and its region was computed on its own
    assert merged.token_ids == separate.token_ids
    for ours, theirs in zip(merged.logprobs, separate.logprobs, strict=True):
        assert [t for t, _, _ in ours.top] == [t for t, _, _ in theirs.top]
        np.testing.assert_allclose([p for _, _, p in ours.top], [p for _, _, p in theirs.top], atol=1e-4)


def plain_prefill_kv(engine, ids: list[int]) -> torch.Tensor:
    """The K/V cache [layers, 2, blocks, block_size, Hkv, D] of one plain prefill of ids at
    positions 0.. under the model's own RoPE, in a private contiguous cache."""
    from ropeway.engine.kv_pool import KVPoolShape, allocate_kv_cache
    from ropeway.models import ForwardBatch

    size, n = engine.config.block_size, len(ids)
    blocks = cdiv(n, size)
    cache = allocate_kv_cache(engine.model, KVPoolShape(blocks, size, engine.pool.bytes_per_block), engine.kv_dtype,
                              engine.device)
    inv_freq, factor = rope_parameters(engine.planner.plan(n))
    positions = torch.arange(n)
    engine.model.forward(ForwardBatch.one_sequence(torch.tensor(ids), positions, positions,
                                                   torch.arange(16, dtype=torch.int32), n, inv_freq.float(), factor,
                                                   positions[-1:]), cache)
    return cache


def archive_under(archive: RecallArchive, kv: torch.Tensor, position: int, first_token: int, plan) -> None:
    """archive.add as the engine calls it: keys turned back from plan to angle 0 (RoPE table rows
    0 and 1 here) by the re-rotation reference."""
    inv_freq, factor = rope_parameters(plan)
    n = kv.shape[2] * kv.shape[3]
    slots, positions = torch.arange(archive.num_tokens, archive.num_tokens + n), torch.arange(position, position + n)
    tables = torch.stack([inv_freq.float(), torch.zeros_like(inv_freq.float())]), torch.tensor([factor, 1.0])

    def turn_back(view, first):
        assert first == slots[0]
        rerotate_keys_reference(view, slots, positions, positions, torch.zeros(n, dtype=torch.int64),
                                torch.ones(n, dtype=torch.int64), *tables)
    archive.add(kv.movedim(2, 0).contiguous(), kv[:, 0], position, first_token, plan, turn_back)


def test_archive_budget_makes_the_largest_archive_forget_its_oldest_blocks(default_llm):
    plan = default_llm.engine.default_rope_plan
    budget_archives = [RecallArchive(), RecallArchive()]
    kv = torch.randn(2, 2, 1, 16, 3, 64)
    one_chunk = None
    budget = ArchiveBudget(max_bytes=0)
    for archive, chunks in zip(budget_archives, (3, 1)):
        for position in range(chunks):
            archive_under(archive, kv, 16 * position, 16 * position, plan)
        one_chunk = archive.num_bytes // chunks
    budget.max_bytes = 3 * one_chunk
    for archive in budget_archives:
        budget.track(archive)
    first, second = budget_archives
    assert (first.num_blocks, second.num_blocks) == (2, 1)
    assert first.block(0)[1] == 16  # the block archived at position 0 went first
    assert first.scoring_keys.shape[1] == first.num_tokens == 2 * 16
    assert budget.num_bytes == 3 * one_chunk
    assert budget.num_forgotten_blocks == 1  # counted for the metric


def test_keys_archived_after_the_oldest_are_forgotten_are_turned_back_in_place(default_llm):
    """drop_oldest replaces the scoring keys' buffer (a tight copy, so the next chunk grows it):
    keys archived after it land after the kept ones, turned back to angle 0 at their own slots,
    and the kept ones stay as they were."""
    plan = default_llm.engine.default_rope_plan
    inv_freq, factor = rope_parameters(plan)
    generator = torch.Generator().manual_seed(5)
    kvs = [torch.randn(2, 2, 1, 16, 3, 64, generator=generator) for _ in range(4)]
    archive = RecallArchive()
    for chunk, kv in enumerate(kvs[:3]):
        archive_under(archive, kv, 16 * chunk, 16 * chunk, plan)
    kept = archive.scoring_keys[:, 16:].clone()
    archive.drop_oldest()
    archive_under(archive, kvs[3], 48, 48, plan)
    angles = torch.arange(48, 64, dtype=torch.float64)[:, None] * inv_freq.double()
    cos, sin = torch.cos(angles)[None, :, None], torch.sin(angles)[None, :, None]
    k = kvs[3][:, 0, 0].double()
    half = k.shape[-1] // 2
    unrotated = torch.cat((k[..., :half] * cos + k[..., half:] * sin, k[..., half:] * cos - k[..., :half] * sin),
                          -1) / factor
    assert archive.num_blocks == 3 and archive.scoring_keys.shape[1] == 48
    assert torch.equal(archive.scoring_keys[:, :32], kept)
    torch.testing.assert_close(archive.scoring_keys[:, 32:].double(), unrotated, atol=1e-5, rtol=1e-5)


def test_archive_budget_takes_from_idle_archives_before_the_long_prompt_in_use(default_llm):
    """A finished request's archive (kept by the session store) is given up before the distant
    past of a larger archive still being filled, though that one is the largest."""
    plan = default_llm.engine.default_rope_plan
    kv = torch.randn(2, 2, 1, 16, 3, 64)
    budget = ArchiveBudget(max_bytes=1 << 40)
    finished, running = RecallArchive(), RecallArchive()
    for position in range(2):
        archive_under(finished, kv, 16 * position, 16 * position, plan)
    budget.track(finished)
    one_chunk = finished.num_bytes // 2
    for _ in range(ArchiveBudget.IDLE_STEPS + 1):
        budget.next_step()
    for position in range(4):
        archive_under(running, kv, 16 * position, 16 * position, plan)
        budget.track(running)
    budget.max_bytes = 5 * one_chunk
    budget.next_step()
    archive_under(running, kv, 64, 64, plan)
    budget.track(running)
    assert (finished.num_blocks, running.num_blocks) == (0, 5)  # the idle archive went whole
    assert running.block(0)[1] == 0
    assert (budget.num_forgotten_blocks, budget.num_forgotten_in_use_blocks) == (2, 0)
    archive_under(running, kv, 80, 80, plan)
    budget.track(running)  # nothing idle is left: now the running archive forgets its oldest block
    assert running.num_blocks == 5 and running.block(0)[1] == 16
    assert (budget.num_forgotten_blocks, budget.num_forgotten_in_use_blocks) == (3, 1)


NEEDLE = " Grandma's secret ingredient for her famous tomato soup is smoked paprika from Hungary. "
QUESTIONS = {  # the end of each prompt: a question and the answer's first words
    "short": " What is the secret ingredient? The secret ingredient is",
    "repeats the needle": (" Question: What is Grandma's secret ingredient for her famous tomato soup?"
                           " Answer: Grandma's secret ingredient for her famous tomato soup is"),
    "long": (" Question: I have been reading this long manual about the Python language, and somewhere in it there"
             " was a short remark about cooking that had nothing to do with programming. Please tell me, what"
             " exactly was the secret ingredient that the text said Grandma puts in her famous soup? Answer: The"
             " secret ingredient is"),
    # The ask, then a format instruction: its last 16 tokens name nothing the needle says.
    "instructed": (" Question: Somewhere in this manual there was a remark about cooking, about what a grandmother"
                   " puts into her famous soup. What was it? Reply with the answer alone: no explanation, no full"
                   " sentence, nothing else. Answer:"),
}


@pytest.mark.slow
def test_retrieval_brings_back_the_needle_in_natural_text_whatever_the_question(make_llm):
    """Python's documentation with one sentence about soup at a third of it, far outside the
    window; four questions of 10 to 60 tokens, one repeating the needle's own words, one ending
    in a format instruction that names nothing the needle says. Retrieval
    without landmark summaries (the default with `retrieve`): the last recall of each prompt
    brings back the block holding the answer, no chunk is re-computed for a summary, and the
    model answers the question that repeats the needle, which it cannot under sink_window."""
    llm = make_llm(prefill_chunk_size=256, max_num_batched_tokens=768)
    # Four chosen blocks (and the block after each) of ~56. With two (retrieve 64), the short
    # question's answer block ranked 2nd once the window became a ceiling (twelfth session;
    # 1st before): at this size the ranks move with the chunking.
    policy = {"type": "landmark", "sinks": 4, "window": 256, "retrieve": 128}
    tokenizer = llm.tokenizer
    filler = long_text_ids(tokenizer, 1100)
    needle = tokenizer.encode(NEEDLE)
    depth = len(filler) // 3
    answer_token = depth + len(tokenizer.encode(NEEDLE.split(" smoked")[0]))
    prompts = [filler[:depth] + needle + filler[depth:] + tokenizer.encode(q) for q in QUESTIONS.values()]
    recalled = {}
    ops = llm.engine.runner.cache_ops
    recall = ops.recall

    def record(item):
        recall(item)
        if item.samples:
            recalled[item.seq.request_id] = item.seq.archive.recalled_tokens

    ops.recall = record
    params = SamplingParams(temperature=0, max_tokens=3)
    try:
        outputs = llm.generate(prompts, params, context=ContextParams(context_policy=policy))
    finally:
        ops.recall = recall
    for name, out in zip(QUESTIONS, outputs):
        starts = recalled[out.request_id]
        assert len(starts) == 8 and len(prompts[0]) - 256 > answer_token, name
        assert any(start <= answer_token < start + 16 for start in starts), (name, starts, answer_token)
    stats = llm.engine.stats()
    assert stats.landmark_recomputations == 0 and stats.retrieval_recalls >= len(prompts)

    repeats = list(QUESTIONS).index("repeats the needle")
    assert "paprika" in outputs[repeats].outputs[0].text
    (unretrieved,) = llm.generate([prompts[repeats]], params, context=ContextParams(
        context_policy={"type": "sink_window", "sinks": 4, "window": 256}))
    assert "paprika" not in unretrieved.outputs[0].text


@pytest.mark.parametrize("layers_per_product", ["several", "one"])
def test_block_scores_and_choice_match_plain_attention_math(default_llm, layers_per_product, monkeypatch):
    """Scores against a loop over layers, query tokens and heads in fp64, whether the layers
    are scored in one product or one at a time; each chosen block brings the block after it,
    and the choice fills exactly the slots it is given."""
    if layers_per_product == "one":
        monkeypatch.setattr(recall_module, "SCORING_BYTES", {"cpu": 1, "cuda": 1})
    plan = default_llm.engine.default_rope_plan
    generator = torch.Generator().manual_seed(3)
    num_layers, num_blocks, block_size, num_kv_heads, num_heads, dim = 2, 6, 16, 3, 9, 64
    archive = RecallArchive()
    kv = torch.randn(num_layers, 2, num_blocks, block_size, num_kv_heads, dim, generator=generator)
    archive_under(archive, kv[:, :, :4], 64, 80, plan)
    archive_under(archive, kv[:, :, 4:], 128, 144, plan)
    queries = torch.randn(num_layers, 5, num_heads, dim, generator=generator) * 3
    baseline = torch.randn(num_layers, 4, num_heads, dim, generator=generator) * 3
    both = torch.cat([queries, baseline], 1)  # the scoring rows first, then the baseline's
    scores = archive.block_scores(both, 5, 0.125)

    keys = archive.scoring_keys.double().reshape(num_layers, num_blocks, block_size, num_kv_heads, dim)
    expected = torch.zeros(num_blocks, dtype=torch.float64)

    def shares(layer: int, q: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(q.shape[0], num_blocks, dtype=torch.float64)
        for token in range(q.shape[0]):
            for head in range(num_heads):
                best = (keys[layer, :, :, head // 3] @ q[token, head].double()).amax(-1) * 0.125
                out[token] += best.softmax(0)
        return out

    for layer in range(num_layers):
        prior = shares(layer, baseline[layer]).mean(0)
        expected += shares(layer, queries[layer]).amax(0) / (prior + 0.1 * prior.mean()) / num_layers
    torch.testing.assert_close(scores.double(), expected, atol=1e-5, rtol=1e-5)
    assert [archive.first_token(i) for i in (0, 3, 4, 5)] == [80, 128, 144, 160]

    order = expected.argsort(descending=True).tolist()
    first = order[0]
    assert archive.select(both, 5, 1, 0.125) == [first]
    two = archive.select(both, 5, 2, 0.125)
    assert two == ([first, first + 1] if first + 1 < num_blocks else [first - 1, first])  # its neighbour
    assert len(archive.select(both, 5, 5, 0.125)) == 5


def greedy_choice(scores: list[float], count: int) -> list[int]:
    """The choice spelled out: blocks by falling score, each bringing the block after it and then
    the block before it, the blocks not yet taken taken in that order until count are."""
    chosen: list[int] = []
    for block in sorted(range(len(scores)), key=lambda b: -scores[b]):
        for taken in (block, block + 1, block - 1):
            if 0 <= taken < len(scores) and len(chosen) < count and taken not in chosen:
                chosen.append(taken)
    return sorted(chosen)


def test_the_vectorized_choice_is_the_greedy_choice(monkeypatch):
    # Where no few blocks stand out (the standout rule's case is the next test's). What greedy_choice spells out:
    monkeypatch.setattr(recall_module, "RECALL_STANDOUT_RATIO", None)
    assert (recall_module.RECALL_FOLLOWING_BLOCKS, recall_module.RECALL_PRECEDING_BLOCKS) == (1, 1)
    rng = random.Random(5)
    for trial in range(400):
        # Few blocks, and many with a small count (only the count best are ranked), ties among them.
        num_blocks = rng.randint(1, 24) if trial % 2 else rng.randint(24, 300)
        scores = [rng.random() if trial % 4 < 2 else float(rng.randint(0, 4)) for _ in range(num_blocks)]
        count = rng.randint(1, num_blocks + 2) if trial % 2 else rng.randint(1, 40)
        chosen = recall_module.choose_blocks(np.asarray(scores), count)
        assert chosen.tolist() == greedy_choice(scores, count), (scores, count)
    assert recall_module.choose_blocks(np.zeros(0, dtype=np.float32), 4).tolist() == []


def test_the_standout_rule_widens_runs_around_blocks_far_above_the_rest(monkeypatch):
    scores = torch.tensor([1.0, 1.2, 0.9, 6.0, 5.0, 1.1, 0.8, 1.3, 1.0, 0.7])
    # Only blocks 3 and 4 score within 3x of the best: runs around them, the best (3) widened first: 2, 5, 1.
    order = np.argsort(-scores.numpy(), kind="stable")
    assert recall_module.runs_around_standouts(scores.numpy(), order, 5, 3.0) == [1, 2, 3, 4, 5]
    assert recall_module.runs_around_standouts(scores.numpy(), order, 5, 6.0) is None  # 7 within 6x: more than 5
    monkeypatch.setattr(recall_module, "RECALL_STANDOUT_RATIO", 3.0)
    assert recall_module.choose_blocks(scores.numpy(), 5).tolist() == [1, 2, 3, 4, 5]
    assert recall_module.choose_blocks(scores.numpy(), 10).tolist() == list(range(10))  # room for all: all
    monkeypatch.setattr(recall_module, "RECALL_STANDOUT_RATIO", None)  # off: the greedy choice
    assert recall_module.choose_blocks(scores.numpy(), 5).tolist() == greedy_choice(scores.tolist(), 5)
    # Among many blocks (only the count + 1 best are sorted), with ties: as the rule over a full sort.
    rng = np.random.default_rng(3)
    monkeypatch.setattr(recall_module, "RECALL_STANDOUT_RATIO", 2.0)
    for trial in range(200):
        many = rng.integers(0, 3, 500).astype(np.float32)
        many[rng.integers(0, 500, trial % 5)] = 9.0
        count = int(rng.integers(1, 30))
        full = recall_module.runs_around_standouts(many, np.argsort(-many, kind="stable"), count, 2.0)
        expected = full if full is not None else greedy_choice(many.tolist(), count)
        assert recall_module.choose_blocks(many, count).tolist() == expected


def test_recalled_blocks_adjacent_in_host_memory_come_back_in_one_copy(default_llm):
    plan = default_llm.engine.default_rope_plan
    archive = RecallArchive()
    kv = torch.randn(2, 2, 2, 16, 3, 64, generator=torch.Generator().manual_seed(1))
    for chunk in range(3):  # blocks 0-5, two per chunk
        archive_under(archive, kv, 32 * chunk, 32 * chunk, plan)
    archive.drop_oldest()  # blocks 0 and 1 go; 2-5 become 0-3
    assert [archive.first_token(i) for i in (0, 3)] == [32, 80]
    (run,) = archive.runs([0, 1])  # adjacent in one archived chunk: one copy
    assert run[0].shape[0] == 2 and run[1] == 32
    assert len(archive.runs([1, 2])) == 2  # across two chunks
