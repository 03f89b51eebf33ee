"""The scheduler and block manager alone: no model, simulated steps."""

import random

from ropeway.scheduler import (BlockManager, ContextPolicy, RopePlan, Scheduler, SchedulerConfig, Sequence,
                               SequenceStatus)
from ropeway.scheduler.context_policy import QUESTION_QUERY_TOKENS

PLAN = RopePlan("default", 10000.0, 64, 2048)
OTHER_PLAN = RopePlan("default", 20000.0, 64, 2048)


class Simulation:
    """Drives a scheduler the way the engine does, sampling a fixed token each step."""

    def __init__(self, num_blocks=64, block_size=4, **config):
        self.bm = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(SchedulerConfig(**config), self.bm)
        self.arrivals = 0
        self.finished: list[Sequence] = []

    def add(self, prompt, max_new, plan=PLAN, n=1):
        seqs = [Sequence(seq_id=self.arrivals * 100 + i, request_id=str(self.arrivals), choice_index=i,
                         prompt_token_ids=list(prompt), rope_plan=plan, arrival=self.arrivals,
                         max_total_tokens=len(prompt) + max_new) for i in range(n)]
        self.arrivals += 1
        self.scheduler.add(seqs)
        return seqs

    def step(self):
        plan = self.scheduler.schedule()
        used = self.bm.num_used_blocks
        assert used <= self.bm.num_blocks
        samplers = [item.seq for item in plan.scheduled if item.samples]
        self.scheduler.update_after_step(plan)
        for seq in samplers:
            seq.token_ids.append(7)
            if seq.num_tokens >= seq.max_total_tokens:
                self.scheduler.finish(seq)
                self.finished.append(seq)
        return plan


def test_budget_and_sequence_cap_hold():
    sim = Simulation(max_num_seqs=3, max_num_batched_tokens=10, prefill_chunk_size=6)
    for length in (9, 3, 14, 5, 2):
        sim.add(range(length), 4)
    while sim.scheduler.has_unfinished():
        plan = sim.step()
        assert plan.num_batched_tokens <= 10
        assert all(item.num_new_tokens <= 6 for item in plan.scheduled)
        assert len(sim.scheduler.running) <= 3
    assert len(sim.finished) == 5
    assert sim.bm.num_free_blocks == sim.bm.num_blocks


def test_running_decodes_go_first_and_prefill_is_chunked():
    sim = Simulation(max_num_batched_tokens=8, prefill_chunk_size=8)
    decoders = [sim.add(range(3), 50)[0] for _ in range(3)]
    sim.step()  # admits the three short prompts (9 tokens > 8: the third waits a step)
    sim.step()
    long = sim.add(range(40), 2)[0]
    chunks = 0
    while not long.prompt_done:
        plan = sim.step()
        scheduled = {item.seq.seq_id: item.num_new_tokens for item in plan.scheduled}
        assert all(scheduled.get(d.seq_id) == 1 for d in decoders)
        chunks += 1
    assert chunks == 40 // 5  # 8-token budget minus 3 decodes = 5 prompt tokens a step


def test_preemption_takes_the_newest_and_everyone_finishes():
    rng = random.Random(0)
    sim = Simulation(num_blocks=12, block_size=4, max_num_seqs=6, max_num_batched_tokens=16,
                     prefill_chunk_size=8)
    seqs = [sim.add([rng.randrange(50) for _ in range(rng.randint(2, 12))], rng.randint(4, 20))[0]
            for _ in range(10)]
    preempted_order = []
    steps = 0
    while sim.scheduler.has_unfinished():
        plan = sim.step()
        for victim in plan.preempted:
            others = [s for s in sim.scheduler.running]
            assert all(s.arrival < victim.arrival for s in others), "preempted someone older than a runner"
            preempted_order.append(victim.arrival)
        steps += 1
        assert steps < 2000, "starvation: the simulation does not end"
    assert sim.scheduler.num_preemptions > 0
    assert {s.seq_id for s in sim.finished} == {s.seq_id for s in seqs}
    assert all(len(s.output_token_ids) == s.max_total_tokens - s.num_prompt_tokens for s in seqs)
    assert sim.bm.num_free_blocks == sim.bm.num_blocks


def test_prefix_cache_shares_blocks_and_respects_the_rope_plan():
    sim = Simulation(num_blocks=32, block_size=4)
    prompt = list(range(21))
    first = sim.add(prompt, 3)[0]
    sim.step()
    same = sim.add(prompt, 3)[0]
    other_plan = sim.add(prompt, 3, plan=OTHER_PLAN)[0]
    sim.step()
    assert same.num_cached_prompt_tokens == 20
    assert same.block_table[:5] == first.block_table[:5]
    assert all(sim.bm.ref_counts[b] == 2 for b in first.block_table[:5])
    assert other_plan.num_cached_prompt_tokens == 0
    assert not set(other_plan.block_table) & set(first.block_table)


def test_n_choices_wait_for_the_prompt_then_share_it():
    sim = Simulation(num_blocks=32, block_size=4, max_num_batched_tokens=8, prefill_chunk_size=8)
    choices = sim.add(range(18), 5, n=3)
    sim.step()
    assert choices[1].num_computed_tokens == 0 and choices[2].num_computed_tokens == 0
    while not choices[0].prompt_done:
        sim.step()
    sim.step()
    assert choices[1].block_table[:4] == choices[0].block_table[:4] == choices[2].block_table[:4]
    assert choices[1].num_cached_prompt_tokens == 16
    while sim.scheduler.has_unfinished():
        sim.step()
    assert sim.bm.num_free_blocks == sim.bm.num_blocks


def test_freed_cached_blocks_are_reused_least_recent_first():
    bm = BlockManager(4, 4)
    seq = Sequence(0, "a", 0, list(range(9)), PLAN, 0, 20)
    bm.allocate(seq, 9)
    seq.num_computed_tokens = 9
    bm.register_full_blocks(seq)
    bm.free(seq)
    again = Sequence(1, "b", 0, list(range(9)), PLAN, 1, 20)
    assert bm.find_cached_prefix(again) == [0, 1]
    fresh = Sequence(2, "c", 0, [99] * 4, PLAN, 2, 20)
    bm.allocate(fresh, 4)
    assert fresh.block_table == [3]  # never used before: cached blocks wait longer
    assert bm.find_cached_prefix(again) == [0, 1]


def test_the_session_store_counts_a_block_shared_by_two_sessions_once():
    """Two chats with a common opening retain caches that share its blocks: the store's size (its
    metric, and the number its limit compares) counts each block once (issue 23, item 7)."""
    bm = BlockManager(64, 4)
    scheduler = Scheduler(SchedulerConfig(), bm, session_store_blocks=64)
    policy = ContextPolicy(type="sink_window", sinks=4, window=64)
    opening = list(range(1, 13))  # three full blocks
    chats = [Sequence(seq_id=i, request_id=str(i), choice_index=0, prompt_token_ids=opening + [20 + i] * 5,
                      rope_plan=PLAN, arrival=i, max_total_tokens=19, context_policy=policy) for i in range(2)]
    for seq in chats:  # one after the other: the second finds the opening in the prefix cache
        scheduler.add([seq])
        while seq.status is not SequenceStatus.FINISHED:
            plan = scheduler.schedule()
            scheduler.update_after_step(plan)
            if any(item.seq is seq and item.samples for item in plan.scheduled):
                seq.token_ids.append(7)
                if seq.num_tokens >= seq.max_total_tokens:
                    scheduler.finish(seq, retain=True)
    entries = list(scheduler.sessions.entries.values())
    assert len(entries) == 2
    tables = [entry.block_table for entry in entries]
    assert tables[0][:3] == tables[1][:3]  # the opening's blocks, shared
    assert scheduler.sessions.num_blocks == len(set(tables[0]) | set(tables[1])) == bm.num_used_blocks
    assert scheduler.sessions.num_blocks < sum(len(table) for table in tables)


def test_prompt_tokens_beside_decodes_are_capped_and_steps_without_decodes_use_the_whole_budget():
    sim = Simulation(num_blocks=256, max_num_seqs=8, max_num_batched_tokens=32, prefill_chunk_size=32,
                     max_prefill_tokens_with_decodes=8)
    first = sim.add(range(20), 40)[0]
    plan = sim.step()
    assert plan.num_batched_tokens == 20  # no decodes yet: the whole prompt in one step
    for start, length in ((100, 30), (200, 17), (300, 25)):  # no shared prefixes: every token is computed
        sim.add(range(start, start + length), 3)
    mixed_steps = 0
    while sim.scheduler.has_unfinished():
        decoding = {s.seq_id for s in sim.scheduler.running if s.num_uncomputed_tokens == 1}
        plan = sim.step()
        prompt_tokens = sum(item.num_new_tokens for item in plan.scheduled if item.seq.seq_id not in decoding)
        if decoding:
            mixed_steps += prompt_tokens > 0
            assert prompt_tokens <= 8, (prompt_tokens, plan.scheduled)
    assert mixed_steps >= 9  # 72 prompt tokens, at most 8 a step while `first` decodes
    assert first in sim.finished and len(sim.finished) == 4
    assert sim.bm.num_free_blocks == sim.bm.num_blocks


def test_a_retrieving_prompts_last_chunk_holds_the_queries_that_score_for_its_answer():
    """With retrieve, a prompt's last QUESTION_QUERY_TOKENS tokens score the archive for the answer,
    and only its last chunk's own queries can: the chunk before stops short, so a prompt that
    would end in a sliver of its question ends in a chunk that holds them. Without retrieve,
    the budget alone cuts the chunks."""
    chunks_by_policy = {}
    for policy in (ContextPolicy(type="landmark", sinks=4, window=1024, retrieve=64),
                   ContextPolicy(type="sink_window", sinks=4, window=1024)):
        scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=256, prefill_chunk_size=256),
                              BlockManager(256, 16))
        seq = Sequence(seq_id=0, request_id="0", choice_index=0, prompt_token_ids=list(range(1, 523)),
                       rope_plan=PLAN, arrival=0, max_total_tokens=530, context_policy=policy)
        scheduler.add([seq])
        chunks = []
        while not seq.prompt_done:
            plan = scheduler.schedule()
            scheduler.update_after_step(plan)
            chunks += [item.num_new_tokens for item in plan.scheduled]
        chunks_by_policy[policy.type] = chunks
    assert QUESTION_QUERY_TOKENS == 64
    assert chunks_by_policy == {"landmark": [256, 202, 64], "sink_window": [256, 256, 10]}
