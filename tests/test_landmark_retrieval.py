"""Landmark caches that retrieve: evicted blocks kept in host memory, the best brought back."""

import random

import pytest
import torch
from bounded_streams import long_text_ids, stream_checking_positions

from ropeway.arith import cdiv
from ropeway import ContextParams, SamplingParams
from ropeway.engine.recall import ArchiveBudget, RecallArchive
from ropeway.sampling_params import InvalidParameter
from ropeway.scheduler import ContextPolicy
from ropeway.models import rope_parameters

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


def test_recall_region_sits_between_landmarks_and_window():
    policy = ContextPolicy.from_dict(RETRIEVING)
    assert (policy.sink_blocks(16), policy.landmark_blocks(16), policy.recall_blocks(16)) == (1, 1, 2)
    assert policy.kept_tokens(16) == 4 * 16 + 64


def passkey_prompt(tokenizer, rng: random.Random) -> tuple[list[int], str]:
    """About 900 tokens: the passkey early (far outside a 256-token window), the question last."""
    key = str(rng.randint(10000, 99999))
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    text = FILLER * 4 + needle + FILLER * 36 + " What is the pass key? The pass key is"
    return tokenizer.encode(text), key


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
    assert found({**landmark, "retrieve": 64}) == len(keys)
    assert llm.engine.runner.cache_ops.num_recalls == recalls_before + len(keys)
    while llm.engine.scheduler.sessions.release_oldest():
        pass
    assert llm.engine.block_manager.num_free_blocks == llm.engine.pool.num_blocks


def test_recalled_blocks_hold_archived_keys_rerotated_to_their_slots(make_llm):
    """A stream of 10x the window in constant blocks; at the end of the prompt the recall
    region holds archived blocks: values as archived, keys moved from their eviction
    position to their slot (fp64 re-derivation), scoring keys the mean of the keys before RoPE."""
    llm = make_llm(prefill_chunk_size=48, max_num_batched_tokens=64)
    engine = llm.engine
    policy = ContextPolicy.from_dict(RETRIEVING)
    prompt = long_text_ids(llm.tokenizer, 10 * policy.window)
    recalled = []
    recall = engine.runner.cache_ops.recall

    def recall_and_read(item):
        recall(item)
        seq = item.seq
        for slot in range(2):
            block = seq.block_table[2 + slot]
            bias = engine.runner.cache_ops.slot_bias[block].clone()
            recalled.append((slot, engine.kv_cache[:, :, block].clone(), bias))

    engine.runner.cache_ops.recall = recall_and_read
    seq, seen = stream_checking_positions(llm, RETRIEVING, prompt)
    settled = [used for computed, used in seen if computed >= policy.max_cache_tokens(16)]
    assert len(settled) > 10 and max(settled) <= cdiv(policy.max_cache_tokens(16), 16)

    archive = seq.archive
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

    # Scoring keys: each block's mean key before RoPE, rotated back in fp64.
    archived, old_position, _ = archive.block(3)
    angles = torch.arange(old_position, old_position + 16, dtype=torch.float64)[:, None] * inv_freq
    cos, sin = torch.cos(angles)[None, :, None], torch.sin(angles)[None, :, None]
    k = archived[:, 0].double()
    half = k.shape[-1] // 2
    unrotated = torch.cat((k[..., :half] * cos + k[..., half:] * sin, k[..., half:] * cos - k[..., :half] * sin), -1)
    scoring = torch.cat(archive.scoring_keys, 1)[:, 3]
    torch.testing.assert_close(scoring.double(), unrotated.mean(1), atol=1e-5, rtol=1e-5)
    assert engine.runner.cache_ops.archive_budget.num_bytes == archive.num_bytes > 0


def test_archive_budget_makes_the_largest_archive_forget_its_oldest_blocks(default_llm):
    plan = default_llm.engine.default_rope_plan
    inv_freq, factor = rope_parameters(plan)
    budget_archives = [RecallArchive(), RecallArchive()]
    kv = torch.randn(2, 2, 1, 16, 3, 64)
    one_chunk = None
    budget = ArchiveBudget(max_bytes=0)
    for archive, chunks in zip(budget_archives, (3, 1)):
        for position in range(chunks):
            archive.add(kv, 16 * position, plan, inv_freq, factor)
        one_chunk = archive.num_bytes // chunks
    budget.max_bytes = 3 * one_chunk
    for archive in budget_archives:
        budget.track(archive)
    first, second = budget_archives
    assert (first.num_blocks, second.num_blocks) == (2, 1)
    assert first.block(0)[1] == 16  # the block archived at position 0 went first
    assert budget.num_bytes == 3 * one_chunk
