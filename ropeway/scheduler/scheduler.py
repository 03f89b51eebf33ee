"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

Each step spends a token budget: running sequences first (a decode costs one token, an
unfinished prompt one chunk), then waiting sequences in arrival order. A long prompt
therefore delays running decodes by at most one chunk. When blocks run out, the newest
running sequence is preempted: its blocks are freed and it waits at the front of the
queue to be recomputed (often mostly from the prefix cache). Admission is strictly
first-come first-served, so nobody starves, with one exception: a sequence whose cached blocks
must first come back from the host tier steps out of the queue while they are copied (other
sequences keep running and being admitted) and rejoins it in arrival order once they are back.
They come back a bounded slice per step (host_admission.py), so that no step's scheduling
stalls the running streams.
"""

from array import array
from collections import deque
from dataclasses import dataclass, field

from ropeway import fault_injection

from .block_manager import BlockManager
from .context_policy import QUESTION_QUERY_TOKENS
from .host_admission import BlockLoad, HostAdmission
from .rope_plan import RopePlan, RopePlanner
from .sequence import Sequence, SequenceStatus
from .session_store import SessionMatch, SessionStore
from ropeway.arith import round_up
from ropeway.config import DEFAULT_KV_HOST_BLOCKS_PER_STEP


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_chunk_size: int = 512
    # Prompt tokens in a step that also carries decodes, at most (None: the whole budget). A mixed
    # step's time grows with its prompt tokens and every running stream waits for it, so this bounds
    # the inter-token latency while prompts queue; steps without decodes still use the whole budget.
    max_prefill_tokens_with_decodes: int | None = None
    # Blocks brought back from the host tier in a step that carries decodes, at most (a step without
    # decodes brings back all it can). Each block costs 1-3 us of the step's Python on the development
    # machine's CPU (hashing, lookups, taking it and its slot, offloading the block it replaces;
    # benchmarks/scheduler_admission.py), less on the H200's host. The slice also caps the load rate:
    # 128 blocks of Llama-3-8B KV are 256 MiB, ~33 GB/s at 8 ms a decode step, under the ~50 GB/s
    # PCIe carries; the default's measurements are with it in ropeway/config.py.
    host_blocks_per_step: int = DEFAULT_KV_HOST_BLOCKS_PER_STEP

    def __post_init__(self):
        if (self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.prefill_chunk_size < 1
                or self.host_blocks_per_step < 1):
            raise ValueError("max_num_seqs, max_num_batched_tokens, prefill_chunk_size and host_blocks_per_step "
                             "must be >= 1")
        if self.max_prefill_tokens_with_decodes is not None and self.max_prefill_tokens_with_decodes < 1:
            raise ValueError("max_prefill_tokens_with_decodes must be >= 1")


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    # Whether this step computes the sequence's last token, so its logits give the next one.
    # Fixed when scheduled: after the step the sequence's counts have moved on.
    samples: bool = field(init=False)

    def __post_init__(self):
        self.samples = self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class RopeGrowth:
    """A sequence outgrew its plan: before this step, copy its shared blocks, then re-rotate
    its first num_tokens cached keys from old_plan to new_plan (same positions)."""
    seq: Sequence
    old_plan: RopePlan
    new_plan: RopePlan
    num_tokens: int
    block_copies: list[tuple[int, int]]


@dataclass
class Eviction:
    """Blocks between a sequence's sinks and its window were dropped: before this step, copy
    the kept blocks it shared, then move its num_tokens kept window keys from positions
    first_position + shift.. to first_position.. (re-rotation by -shift positions)."""
    seq: Sequence
    first_position: int
    num_tokens: int
    shift: int
    block_copies: list[tuple[int, int]]
    # The plan the cached keys are under now (a plan growth scheduled in the same step
    # comes after the eviction).
    plan: RopePlan
    landmarks: list["Landmark"] = field(default_factory=list)
    # A landmark cache's first eviction opens its region (these cache positions): landmark
    # slots, then the recall region, empty until something is written there.
    new_region: range | None = None
    # With retrieval: the evicted blocks, in order, to copy to host memory before anything
    # reuses them; their tokens, tokens archived_first_token.. of the stream, sat at cache
    # positions archived_position.. .
    archived_blocks: list[int] = field(default_factory=list)
    archived_position: int = 0
    archived_first_token: int = 0


@dataclass
class Landmark:
    """An evicted chunk: summarize it, computed alone, into the landmark slot at position."""
    token_ids: list[int]
    position: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    rope_growths: list[RopeGrowth] = field(default_factory=list)
    evictions: list[Eviction] = field(default_factory=list)
    # Sequences whose scheduling raised: out of the queues and this plan, blocks freed; the
    # engine fails their requests and serves the rest.
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)
    # Host tier: (pool block, host slot) copies to make before anything this step writes, and
    # then the loads to start (they finish in the background).
    offloads: list[tuple[int, int]] = field(default_factory=list)
    loads: list[BlockLoad] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager,
                 planner: RopePlanner | None = None, session_store_blocks: int = 0):
        self.config = config
        self.block_manager = block_manager
        self.sessions = SessionStore(block_manager, session_store_blocks)
        # Without a planner, sequences must arrive with their plan set (tests do this).
        self.planner = planner
        self.num_plan_growths = 0
        self.num_evictions = 0        # eviction events
        self.num_evicted_tokens = 0   # tokens dropped from caches
        self.num_landmark_recomputations = 0  # evicted chunks summarized into landmark slots
        self.num_rerotated_keys = 0   # cached token keys moved to new positions (all layers at once)
        self.new_plans: list[RopePlan] = []  # plans chosen since the metrics last drained them
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Choices 2..n of a request wait here until choice 1 has computed the prompt, then
        # find it in the prefix cache instead of computing it again.
        self.held_siblings: dict[int, list[Sequence]] = {}
        # Sequences whose blocks are coming back from the host tier, by seq_id.
        self.loading: dict[int, HostAdmission] = {}
        self._host_blocks_left: int | None = None  # this step's slice budget (None: unbounded)
        self.num_preemptions = 0
        self.last_plan: SchedulerOutput | None = None  # for step-level measurements

    # ----- queue management -----

    def add(self, seqs: list[Sequence]) -> None:
        """Queue the choices of one request; all but the first wait for the shared prompt."""
        for seq in seqs:
            if seq.rope_plan is None:
                seq.rope_plan = self.planner.plan(seq.planned_length, seq.rope_scaling)
            if seq.context_policy.bounded and self.sessions.max_blocks:
                seq.prompt_bytes = array("q", seq.prompt_token_ids).tobytes()
        self.new_plans.append(seqs[0].rope_plan)
        first, rest = seqs[0], seqs[1:]
        self.waiting.append(first)
        if rest:
            if self.block_manager.enable_prefix_caching:
                self.held_siblings[first.seq_id] = rest
            else:
                self.waiting.extend(rest)

    def finish(self, seq: Sequence, retain: bool = False) -> None:
        """Remove a sequence that finished or was aborted, and free its blocks at once; with
        retain, a bounded-cache sequence's blocks go to the session store instead."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release_siblings(seq)
        for group in self.held_siblings.values():
            if seq in group:
                group.remove(seq)
        seq.status = SequenceStatus.FINISHED
        admission = self.loading.get(seq.seq_id)
        if admission is not None:
            admission.cancel()
            if admission.done:
                self._end_admission(admission)
            return  # otherwise its blocks are being written: freed once the loads are done
        if not (retain and seq.context_policy.bounded and self.sessions.retain(seq)):
            evicted = seq.num_evicted_tokens
            self.block_manager.free(seq)
            seq.num_evicted_tokens = evicted  # still reported in the request's last output
        seq.block_table = []

    def has_unfinished(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.loading) + sum(len(g) for g in self.held_siblings.values())

    def loads_finished(self, loads: list[BlockLoad]) -> None:
        """The engine has these loads' blocks in the pool: a sequence whose last slice is back
        rejoins the queue."""
        for load in loads:
            admission = self.loading[load.seq.seq_id]
            admission.load_finished(load)
            if admission.done:
                self._end_admission(admission)

    def _end_admission(self, admission: HostAdmission) -> None:
        seq = admission.seq
        del self.loading[seq.seq_id]
        if seq.status is SequenceStatus.FINISHED:  # aborted or failed meanwhile
            self.block_manager.free(seq)
            return
        if admission.session_slots is None:
            self.block_manager.record_prefix_lookup(seq.num_tokens, seq.num_computed_tokens)
        self._requeue(seq)

    def _free_caches_queued_behind(self, head: Sequence) -> bool:
        """Give the pool back the blocks of sequences queued behind head that hold some (brought
        back from the host tier, waiting for their turn): otherwise head might never fit. A
        prefix brought back stays findable in the pool (and the host tier) until reused."""
        holders = [seq for seq in self.waiting if seq is not head and seq.block_table]
        for seq in holders:
            self.block_manager.free(seq)
        return bool(holders)

    # ----- one step -----

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        cap = self.config.max_prefill_tokens_with_decodes
        decodes = any(seq.status is SequenceStatus.RUNNING and seq.num_uncomputed_tokens == 1 for seq in self.running)
        prefill_budget = min(budget, cap) if cap is not None and decodes else budget
        self._host_blocks_left = self.config.host_blocks_per_step if decodes else None

        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            try:
                fault_injection.check("schedule", seq.request_id)
                n = self._chunk(seq, budget if seq.num_uncomputed_tokens == 1 else min(budget, prefill_budget))
                if n <= 0 < seq.num_uncomputed_tokens:
                    continue  # a prompt chunk waits for a step with prefill budget left
                self._evict_if_needed(seq, n, out)
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                self._grow_plan_if_outgrown(seq, n, out)
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                while bm.blocks_to_grow(seq, n) > bm.num_free_blocks:
                    if self.sessions.release_oldest():
                        continue  # retained sessions give way before running sequences do
                    victim = max(self.running, key=lambda s: s.arrival)
                    self._preempt(victim)
                    out.preempted.append(victim)
                    for item in [i for i in out.scheduled if i.seq is victim]:
                        out.scheduled.remove(item)
                        budget += item.num_new_tokens
                    if victim is seq:
                        break
                if seq.status is not SequenceStatus.RUNNING:
                    continue
                bm.allocate(seq, n)
                out.scheduled.append(ScheduledSequence(seq, n))
                budget -= n
                if n > 1:
                    prefill_budget -= n
            except Exception as error:  # a fault tied to one sequence fails it alone
                budget += self._fail(seq, error, out)

        if not out.preempted:  # (the pool is over-committed: prefix hits wait; sessions have their blocks)
            self._continue_host_admissions(out)
        # A step that had to preempt admits nobody: the pool is already over-committed.
        while (self.waiting and min(budget, prefill_budget) > 0 and not out.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            try:
                fault_injection.check("schedule", seq.request_id)
                if seq.context_policy.bounded and not seq.block_table:
                    match = self.sessions.take(seq)
                    if match is not None and match.host is not None:
                        if not self._bring_back_session(seq, match, out):
                            break
                        continue
                restored = bool(seq.block_table)  # a retained session's cache, now this sequence's
                self._grow_plan_before_admission(seq)
                cached = [] if restored else bm.find_cached_prefix(seq)
                # (One block looked up even with no slice budget left: a hit then waits for the next step.)
                on_host = [] if restored else self._host_prefix(seq, len(cached), max(1, self._host_slice()))
                if on_host:
                    if not self._host_slice() or not self._bring_back_prefix(seq, cached, on_host, out):
                        break
                    continue
                n = min(seq.num_tokens - seq.num_computed_tokens - len(cached) * bm.block_size,
                        self._chunk(seq, min(budget, prefill_budget)))
                if restored:
                    self._evict_if_needed(seq, n, out)
                fits = (lambda: bm.blocks_to_grow(seq, n) <= bm.num_free_blocks) if restored else (
                    lambda: bm.can_admit(cached, n))
                while not fits() and self.sessions.release_oldest():
                    pass
                if not fits():
                    if self._free_caches_queued_behind(seq):
                        continue
                    break
                self.waiting.popleft()
                if not restored:
                    bm.take_cached(seq, cached)
                    bm.record_prefix_lookup(seq.num_tokens, seq.num_computed_tokens)
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt_tokens = seq.num_computed_tokens
                bm.allocate(seq, n)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.scheduled.append(ScheduledSequence(seq, n))
                budget -= n
                prefill_budget -= n
            except Exception as error:  # a fault tied to one sequence fails it alone
                budget += self._fail(seq, error, out)
        out.offloads = bm.take_offloads()
        self.last_plan = out
        return out

    # ----- the host tier -----

    def _host_slice(self) -> int:
        """Blocks a slice may bring back from the host tier in what is left of this step."""
        left = self._host_blocks_left
        return self.block_manager.num_blocks if left is None else left

    def _host_prefix(self, seq: Sequence, num_cached: int, max_blocks: int) -> list[int]:
        """Host slots of the blocks that continue seq's cached prefix in the host tier (at most max_blocks)."""
        host = self.block_manager.host_tier
        if host is None:
            return []
        return host.find_run(self.block_manager.prefix_hashes(seq, num_cached, max_blocks))

    def _make_room(self, blocks_needed) -> bool:
        """Release retained sessions until blocks_needed() blocks are free."""
        while self.block_manager.num_free_blocks < blocks_needed():
            if not self.sessions.release_oldest():
                return False
        return True

    def _bring_back_prefix(self, seq: Sequence, cached: list[int], slots: list[int], out: SchedulerOutput) -> bool:
        """Take seq's cached prefix from the pool and fresh blocks for the first slice of the part
        the host tier holds, and start loading that slice; False (nothing taken) if the pool has no room."""
        bm, host = self.block_manager, self.block_manager.host_tier
        host.pin(slots)  # releasing sessions to the host tier must not reuse them
        if not self._make_room(lambda: bm.num_revived(cached) + len(slots)):
            host.unpin(slots)
            return False
        self.waiting.popleft()
        bm.take_cached(seq, cached)
        blocks = bm.take_free_blocks(len(slots))
        seq.block_table += blocks
        seq.num_computed_tokens = len(seq.block_table) * bm.block_size
        admission = HostAdmission(seq, bm)
        admission.looking = len(slots) == self._host_slice()  # the host tier may hold more of the prompt
        self._start_admission(admission, admission.start(slots, blocks), out)
        return True

    def _bring_back_session(self, seq: Sequence, match: SessionMatch, out: SchedulerOutput) -> bool:
        """Reserve blocks for a session the host tier holds and start loading its first slice;
        False (the session put back) if the pool has no room or the step no slice budget left."""
        bm, host = self.block_manager, self.block_manager.host_tier
        slots = match.host.slots  # out of the host tier's LRU order: releasing sessions cannot drop them
        if not self._host_slice() or not self._make_room(lambda: len(slots)):
            host.put_back_session(match.key, match.host)
            return False
        self.waiting.popleft()
        self.sessions.hits += 1
        match.session.restore_into(seq)
        seq.block_table = []
        bm.reserve(len(slots))
        admission = HostAdmission(seq, bm, session_slots=list(slots))
        self._start_admission(admission, admission.next_slice(self._host_slice(), self._room_for), out)
        return True

    def _start_admission(self, admission: HostAdmission, load: BlockLoad, out: SchedulerOutput) -> None:
        self.loading[admission.seq.seq_id] = admission
        self.block_manager.host_tier.hits += 1
        self._issued(load, out)

    def _continue_host_admissions(self, out: SchedulerOutput) -> None:
        """Next slices of the hits coming back, oldest first, within the step's budget."""
        for admission in list(self.loading.values()):
            if admission.issuing and admission.seq.status is not SequenceStatus.FINISHED:
                try:
                    load = admission.next_slice(self._host_slice(), self._room_for)
                except Exception as error:  # a fault tied to one sequence fails it alone
                    self._fail(admission.seq, error, out)
                    continue
                if load is not None:
                    self._issued(load, out)
            if admission.done:  # a prefix hit whose run ended with its earlier slices back
                self._end_admission(admission)

    def _room_for(self, num_blocks: int) -> bool:
        return self._make_room(lambda: num_blocks)

    def _issued(self, load: BlockLoad, out: SchedulerOutput) -> None:
        out.loads.append(load)
        if self._host_blocks_left is not None:
            self._host_blocks_left -= len(load.copies)

    def _fail(self, seq: Sequence, error: Exception, out: SchedulerOutput) -> int:
        """Take a sequence whose scheduling raised out of the queues and of this step's plan and
        free its blocks; returns the budget it had taken."""
        refund = sum(item.num_new_tokens for item in out.scheduled if item.seq is seq)
        for items in (out.scheduled, out.rope_growths, out.evictions):
            items[:] = [item for item in items if item.seq is not seq]
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self._release_siblings(seq)
        out.failed.append((seq, error))
        admission = self.loading.get(seq.seq_id)
        if admission is not None:  # its blocks are freed once the loads in flight are done
            admission.cancel()
            if admission.done:
                self._end_admission(admission)
        else:
            self.block_manager.free(seq)
        return refund

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens seq may compute this step. A bounded cache takes what still fits, or else one
        eviction chunk, or less where the eviction cannot free a chunk (the one that opens a
        landmark region keeps the region's blocks; a short window has few whole units)."""
        n = min(seq.num_uncomputed_tokens, self.config.prefill_chunk_size, budget)
        policy = seq.context_policy
        if policy.bounded and n > 1:  # (one token always fits: the chunk is at least a block)
            size = self.block_manager.block_size
            room = policy.max_cache_tokens(size) - seq.num_cached_positions
            if n > room:
                kept_blocks, _, evictable = self._eviction_room(seq)
                n = min(n, max(room, policy.eviction_chunk(size)), room - kept_blocks * size + evictable)
        left = seq.num_uncomputed_tokens - n
        if policy.retrieve and 0 < left < QUESTION_QUERY_TOKENS < seq.num_uncomputed_tokens:
            # The last chunk keeps the prompt's last QUESTION_QUERY_TOKENS: they score the archive
            # for the answer, and only that chunk's own queries do.
            n = seq.num_uncomputed_tokens - QUESTION_QUERY_TOKENS
        return n

    def _eviction_room(self, seq: Sequence) -> tuple[int, int, int]:
        """What the next eviction of seq may take: (blocks it keeps as the landmark region it
        opens, 0 once one is open; table index of the first window block; the most window tokens
        it can evict, in whole eviction units)."""
        policy, size = seq.context_policy, self.block_manager.block_size
        region_blocks = policy.region_blocks(size)
        # The first landmark eviction keeps the chunk's first blocks as the region.
        kept_blocks = region_blocks if region_blocks and seq.num_region_positions == 0 else 0
        evicted_from = policy.sink_blocks(size) + region_blocks - kept_blocks
        unit = policy.eviction_unit(size)
        return kept_blocks, evicted_from, (seq.num_cached_positions - evicted_from * size) // unit * unit

    def _evict_if_needed(self, seq: Sequence, num_new_tokens: int, out: SchedulerOutput) -> None:
        """Keep a bounded cache within sinks + region + window: drop the oldest window blocks
        (whole blocks, a chunk at a time, back to the pool at once) and have the kept window
        keys re-rotated down, so cache positions stay contiguous. A landmark cache with
        landmark slots also has each evicted chunk summarized into its next slot."""
        policy, bm = seq.context_policy, self.block_manager
        size = bm.block_size
        length = seq.num_cached_positions
        if not policy.bounded or length + num_new_tokens <= policy.max_cache_tokens(size):
            return
        chunk = policy.eviction_chunk(size)
        sink_blocks, region_blocks = policy.sink_blocks(size), policy.region_blocks(size)
        kept_blocks, evicted_from, evictable = self._eviction_room(seq)
        opens_region = kept_blocks > 0
        # Full: evict a chunk (more if the new tokens need it; the blocks that become the region
        # free no room), rounded up to whole units but never past the window's newest token.
        excess = length + num_new_tokens - policy.max_cache_tokens(size) + kept_blocks * size
        evict = min(max(chunk, round_up(excess, policy.eviction_unit(size))), evictable)
        evicted_blocks = seq.block_table[evicted_from : evicted_from + evict // size]
        bm.drop_blocks(seq, sink_blocks + region_blocks, evict // size - kept_blocks)
        if bm.num_shared_blocks(seq, sink_blocks) > bm.num_free_blocks:
            # Cannot copy the shared blocks it must re-rotate: recompute it instead.
            if seq.status is SequenceStatus.RUNNING:
                self._preempt(seq)
            else:
                bm.free(seq)
            return
        # Landmark slots are written too, so they are made private with the window.
        copies = bm.make_private(seq, sink_blocks)
        bm.forget_hashes(seq)
        window_start = (sink_blocks + region_blocks) * size
        moved = length - window_start - evict + kept_blocks * size
        eviction = Eviction(seq, window_start, moved, evict - kept_blocks * size, copies, seq.rope_plan)
        if region_blocks:
            region_start = sink_blocks * size
            if opens_region:
                seq.num_region_positions = region_blocks * size
                eviction.new_region = range(region_start, window_start)
            first_token = region_start + seq.num_evicted_tokens
            if policy.retrieve:
                eviction.archived_blocks, eviction.archived_position = evicted_blocks, evicted_from * size
                eviction.archived_first_token = first_token
            if policy.landmarks:
                for start in range(first_token, first_token + evict, chunk):
                    slot = (start - region_start) // chunk % policy.landmarks
                    eviction.landmarks.append(Landmark(seq.token_ids[start : start + chunk], region_start + slot))
                self.num_landmark_recomputations += len(eviction.landmarks)
        seq.num_evicted_tokens += evict
        out.evictions.append(eviction)
        self.num_evictions += 1
        self.num_evicted_tokens += evict
        self.num_rerotated_keys += moved

    def _grown_plan(self, seq: Sequence, needed_length: int) -> RopePlan | None:
        if self.planner is None:
            return None
        return self.planner.grow(seq.rope_plan, needed_length, seq.rope_scaling, seq.max_total_tokens)

    def _grow_plan_if_outgrown(self, seq: Sequence, num_new_tokens: int, out: SchedulerOutput) -> None:
        """Grow the plan of a running sequence about to pass its planned length, and have its
        cached keys re-rotated once; if its shared blocks cannot be copied, recompute it."""
        new_plan = self._grown_plan(seq, seq.num_cached_positions + num_new_tokens)
        if new_plan is None:
            return
        self.num_plan_growths += 1
        self.new_plans.append(new_plan)
        old_plan, seq.rope_plan = seq.rope_plan, new_plan
        bm = self.block_manager
        if bm.num_shared_blocks(seq) + bm.blocks_to_grow(seq, num_new_tokens) > bm.num_free_blocks:
            self._preempt(seq)
            out.preempted.append(seq)
            return
        copies = bm.make_private(seq)
        bm.forget_hashes(seq)
        out.rope_growths.append(RopeGrowth(seq, old_plan, new_plan, seq.num_cached_positions, copies))

    def _grow_plan_before_admission(self, seq: Sequence) -> None:
        """A waiting sequence (preempted, so nothing cached) simply starts under the larger plan."""
        needed = seq.num_tokens
        if seq.context_policy.bounded:
            needed = min(needed, seq.context_policy.max_cache_tokens(self.block_manager.block_size))
        new_plan = self._grown_plan(seq, needed)
        if new_plan is not None:
            self.num_plan_growths += 1
            self.new_plans.append(new_plan)
            seq.rope_plan = new_plan
            seq.block_hashes = []

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Back in arrival order among the waiting, ahead of anything that came later."""
        position = 0
        while position < len(self.waiting) and self.waiting[position].arrival < seq.arrival:
            position += 1
        self.waiting.insert(position, seq)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Account the computed tokens (call before appending sampled tokens)."""
        size = self.block_manager.block_size
        for item in out.scheduled:
            seq = item.seq
            computed_before = seq.num_computed_tokens
            seq.num_computed_tokens += item.num_new_tokens
            # Registering walks the whole block table: only when a block filled up.
            if computed_before // size != seq.num_computed_tokens // size:
                self.block_manager.register_full_blocks(seq)
            if seq.prompt_done:
                self._release_siblings(seq)

    def _release_siblings(self, seq: Sequence) -> None:
        siblings = self.held_siblings.pop(seq.seq_id, None)
        if siblings:
            for sibling in reversed(siblings):
                self.waiting.appendleft(sibling)
