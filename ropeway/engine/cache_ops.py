"""Everything a step does to the KV cache besides writing its own tokens' keys and values:
evictions of bounded caches (keys moved down and re-rotated), RoPE-plan growths (keys re-rotated
to the larger plan), landmark summaries written into their slots, evicted blocks archived to
host memory and the best of them recalled. The runner applies them all, in this order, before
it builds the step's batch (a question's recalled region, computed afresh, joins that batch);
during the step it captures the queries that the next recall of a long prompt scores with.

The pool may be fp8 (kernels/fp8_kv.py): keys and values are read through cache_views, dequantized
where they are read as numbers and quantized where they are written; whole blocks (copies,
archives, recalls) move as bytes with their scales."""

import dataclasses
import math

import msgspec
import numpy as np
import torch

from ropeway.kernels import blocks_from_host, rerotate_keys
from ropeway.kernels.fp8_kv import cache_views, read_vectors, write_vectors
from ropeway.models import ForwardBatch, QueryCapture
from ropeway.models.forward_batch import cache_slots
from ropeway.scheduler import (QUESTION_QUERY_TOKENS, Eviction, RopeGrowth, RopePlan, ScheduledSequence,
                               SchedulerOutput)

from .kv_pool import cache_block_views
from .landmarks import chunk_summary, rotate_to
from .recall import RECALL_BASELINE_TOKENS, RECALL_QUERY_TOKENS, ArchiveBudget, RecallArchive

# The question's recalled blocks are computed afresh in the region (region_recompute). A module
# switch so benchmarks can measure what it changes.
RECOMPUTE_RECALLED = True


class KeyMove(msgspec.Struct, array_like=True):
    """Keys of one sequence moved to new cache positions and/or a new RoPE plan."""
    block_table: list[int]
    block_copies: list[tuple[int, int]]   # (source, destination) blocks it no longer shares
    first_position: int
    count: int
    shift: int                            # the keys were computed at position + shift
    old_plan: RopePlan
    new_plan: RopePlan


@dataclasses.dataclass
class RegionTokens:
    """What the runner's batch reads of a sequence (ModelRunner.host_batch: a field it starts to
    read must be given here too), for a recall region's tokens run beside the sequence's chunk:
    its tokens (all to compute), the region's first position, the sequence's block table, plan
    and region. The step then runs up to the region's tokens past its token budget."""
    token_ids: np.ndarray
    num_cached_positions: int
    block_table: list[int]
    rope_plan: RopePlan
    num_region_positions: int
    num_computed_tokens: int = 0
    seq_id: int = -1


@dataclasses.dataclass
class RegionRecompute:
    """A recall region's tokens scheduled as a chunk that samples nothing (like ScheduledSequence)."""
    seq: RegionTokens
    num_new_tokens: int
    samples: bool = False


class CacheOps:
    CAPTURE_LAYOUTS = 64

    def __init__(self, runner, archive_bytes: int):
        self.runner = runner
        self.model = runner.model
        self.kv_cache = runner.kv_cache
        self.block_size = runner.block_size
        self.device = runner.device
        # The pool block-major, as the host tier moves blocks (the pool's one per-block tensor).
        (self.pool_blocks,) = cache_block_views(self.kv_cache)
        # Logit bias per cache slot [num_blocks, block_size]: ln(chunk length) on a landmark
        # slot, -inf on an empty region slot, 0 elsewhere. Read only by batches that hold a
        # landmark cache.
        self.slot_bias = torch.zeros(self.kv_cache.shape[2], self.block_size, dtype=torch.float32,
                                     device=self.device)
        # Until a region is first opened every bias is 0, and steps need not clear any.
        self.bias_written = False
        self.archive_budget = ArchiveBudget(archive_bytes)
        # Archive copies to host memory go on this stream (CUDA; see to_host).
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._host_reads: list[tuple[torch.cuda.Event, list[torch.Tensor]]] = []  # (see bring_back)
        self.num_recalls = 0          # prompt chunks that brought archived blocks back
        self.num_recalled_blocks = 0
        # Under tensor parallelism, the key moves of the step (sent to the other ranks with it).
        self.recorded: list[KeyMove] | None = None
        self._capturing: list[tuple[object, int, int]] = []  # (sequence, baseline rows, query rows) of a step
        # Recall regions this step's recalls compute afresh, in the step's own batch.
        self.region_recomputes: list[RegionRecompute] = []
        # Capture index arrays on the device by (batch size, rows), the newest CAPTURE_LAYOUTS.
        self._capture_indexes: dict[tuple[int, bytes], tuple[torch.Tensor, int, torch.Tensor]] = {}

    def apply(self, step: SchedulerOutput) -> None:
        self.archive_budget.next_step()
        self.region_recomputes = []  # (none left from a step that failed before its batch ran)
        self._release_host_reads()
        # Evicted blocks go to host memory first: this step may hand them out again.
        for eviction in step.evictions:
            if eviction.archived_blocks:
                self.archive_evicted(eviction)
        for eviction in step.evictions:
            self.apply_eviction(eviction)
            self.write_landmarks(eviction)
        for growth in step.rope_growths:
            self.apply_rope_growth(growth)
        if self.archive_budget.archives:  # no per-sequence check on steps of servers that never archive
            for item in step.scheduled:
                if self.recalls(item):
                    self.recall(item)

    def apply_rope_growth(self, growth: RopeGrowth) -> None:
        """Re-rotate a sequence's cached keys from its old plan to its new one, in place."""
        self.move_keys(KeyMove(growth.seq.block_table, growth.block_copies, 0, growth.num_tokens, 0, growth.old_plan,
                               growth.new_plan))

    def apply_eviction(self, eviction: Eviction) -> None:
        """Move a sequence's kept window keys down by the evicted length (same plan)."""
        self.move_keys(KeyMove(eviction.seq.block_table, eviction.block_copies, eviction.first_position,
                               eviction.num_tokens, eviction.shift, eviction.plan, eviction.plan))

    def move_keys(self, move: KeyMove) -> None:
        """Copy the blocks a sequence no longer shares, then rotate its keys at cache positions
        first_position.. (computed at position + shift under old_plan) to those positions under
        new_plan: every layer at once, by the fp32 angle difference."""
        if self.recorded is not None:  # tensor parallel: every other rank makes the same move
            self.recorded.append(move)
        self.copy_blocks(move.block_copies)
        count = move.count
        if count == 0:
            return
        # Slots are worked out on the host and copied without blocking: a pageable copy would
        # wait for the step in flight, stalling the pipelined decode of bounded caches.
        positions = np.arange(move.first_position, move.first_position + count)
        slots = cache_slots(move.block_table, positions, self.block_size)
        slots_t, old_t, new_t, old_rows_t, new_rows_t = self.runner.upload_arrays(
            [slots, positions + move.shift, positions, np.full(count, self.runner.rope_index(move.old_plan)),
             np.full(count, self.runner.rope_index(move.new_plan))], torch.int64)
        keys, scales = self.runner.layer_caches.keys
        rerotate_keys(keys, slots_t, old_t, new_t, old_rows_t, new_rows_t, *self.runner.rope_tables, scales)

    def views(self, kind: int, blocks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys (kind 0) or values (1) of every layer, [num_layers, num_blocks, block_size, Hkv, D],
        and their fp8 scales (None for a pool in the model's dtype); of `blocks` (a copy of some
        blocks, [num_layers, 2, n, ...] as the pool holds them) instead of the pool if given."""
        source = self.kv_cache if blocks is None else blocks
        return cache_views(source[:, kind], self.model.num_local_kv_heads, self.model.config.head_dim)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for source, destination in copies:
            self.kv_cache[:, :, destination].copy_(self.kv_cache[:, :, source])
            if self.bias_written:
                self.slot_bias[destination].copy_(self.slot_bias[source])

    def write_landmarks(self, eviction: Eviction) -> None:
        """Open the landmark region (every slot empty), then write each evicted chunk's
        summary in its slot: the mean key rotated to the slot's position, the mean value,
        and ln(chunk length) on the slot's logit so it weighs as the chunk's tokens would."""
        if eviction.new_region is None and not eviction.landmarks:
            return
        table = eviction.seq.block_table
        bias = self.slot_bias
        self.bias_written = True
        if eviction.new_region is not None:
            for position in eviction.new_region[:: self.block_size]:  # whole blocks
                bias[table[position // self.block_size]] = float("-inf")
        inv_freq, factor = self.runner.rope_row(eviction.plan)
        for landmark in eviction.landmarks:
            keys, values = chunk_summary(self.model, landmark.token_ids, inv_freq, factor, self.block_size)
            block, offset = table[landmark.position // self.block_size], landmark.position % self.block_size
            rotated = rotate_to(keys, landmark.position, inv_freq, factor)
            write_vectors(*self.runner.layer_caches.keys, (slice(None), block, offset), rotated)
            write_vectors(*self.views(1), (slice(None), block, offset), values)
            bias[block, offset] = math.log(len(landmark.token_ids))

    def archive_evicted(self, eviction: Eviction) -> None:
        """Copy a sequence's evicted blocks to host memory before anything reuses them."""
        seq = eviction.seq
        if seq.archive is None:
            seq.archive = RecallArchive()
        archive = seq.archive
        blocks = np.asarray(eviction.archived_blocks, dtype=np.int64)
        # The new scoring keys' slots (after the archived ones) and positions when evicted, turned
        # from their plan's RoPE row to the row of angle 0: uploaded with the blocks, in one copy.
        n = blocks.size * self.block_size
        position, first_slot = eviction.archived_position, archive.num_tokens
        blocks_t, slots_t, positions_t, plan_rows_t, unrotated_rows_t = self.runner.upload_arrays(
            [blocks, np.arange(first_slot, first_slot + n), np.arange(position, position + n),
             np.full(n, self.runner.rope_index(eviction.plan)), np.full(n, self.runner.UNROTATED_ROW)], torch.int64)
        gathered = self.pool_blocks.index_select(0, blocks_t)  # [n, layers, 2, ...]
        host = self.to_host(gathered)
        keys = read_vectors(*self.views(0, gathered.movedim(0, 2)), slice(None), self.model.dtype)

        def turn_back(scoring_keys, first):
            assert first == first_slot  # the slots uploaded above
            rerotate_keys(scoring_keys, slots_t, positions_t, positions_t, plan_rows_t, unrotated_rows_t,
                          *self.runner.rope_tables)
        archive.add(host, keys, position, eviction.archived_first_token, eviction.plan, turn_back)
        self.archive_budget.track(archive)

    def to_host(self, blocks: torch.Tensor) -> torch.Tensor:
        """A host copy of device blocks. On CUDA it is pinned and queued on a stream of its own, so
        the recall's wait for its scores (right after) does not wait for it too; bring_back makes
        the step's stream wait for it before it reads archived blocks."""
        if self.copy_stream is None:  # on a CPU the gathered blocks are a copy already
            return blocks
        host = torch.empty(blocks.shape, dtype=blocks.dtype, pin_memory=True)
        self.copy_stream.wait_stream(torch.cuda.current_stream(blocks.device))
        with torch.cuda.stream(self.copy_stream):
            host.copy_(blocks, non_blocking=True)
        blocks.record_stream(self.copy_stream)  # not reused by the step's stream until copied
        return host

    def _release_host_reads(self) -> None:
        """Forget the host runs of bring-back kernels that are done (see bring_back)."""
        while self._host_reads and self._host_reads[0][0].query():
            self._host_reads.pop(0)

    def clear_written_slots(self, batch: ForwardBatch) -> None:
        """The batch writes tokens into its slots: clear what a region's bias left there."""
        if self.bias_written:
            self.slot_bias.view(-1)[batch.slot_mapping] = 0.0

    @staticmethod
    def recalls(item: ScheduledSequence) -> bool:
        """Every chunk of a prompt whose cache has archived blocks brings the best back: the
        last chunk scored by its own queries, earlier ones by those of the chunk before."""
        seq = item.seq
        if not (seq.num_computed_tokens < seq.num_prompt_tokens and seq.archive is not None
                and seq.archive.num_blocks > 0):
            return False
        return item.samples or seq.archive.scoring_pending

    def query_capture(self, step: SchedulerOutput, chunk_starts, num_tokens: int) -> QueryCapture | None:
        """A QueryCapture of queries of each retrieving prompt chunk in the step that more of its
        prompt follows: its last ones, then some spread over the chunk (the baseline) (None
        when there is none: decode steps capture nothing). chunk_starts: each scheduled
        sequence's first row in the batch of num_tokens tokens."""
        rows, self._capturing = [], []
        for item, start in zip(step.scheduled, chunk_starts):
            seq, n = item.seq, item.num_new_tokens
            if seq.context_policy.retrieve and not item.samples and seq.num_computed_tokens < seq.num_prompt_tokens:
                count = min(RECALL_QUERY_TOKENS, n)
                spread = np.linspace(0, n - 1, min(RECALL_BASELINE_TOKENS, n)).astype(np.int64)
                rows += [np.arange(start + n - count, start + n), start + spread]
                self._capturing.append((seq, count, len(spread)))
        if not rows:
            return None
        return self._capture_rows(np.concatenate(rows), num_tokens)

    def _capture_rows(self, rows: np.ndarray, num_tokens: int) -> QueryCapture:
        """A QueryCapture of the batch rows `rows` (in order, repeats allowed) of a batch of
        num_tokens tokens. Its index arrays are uploaded once per layout and kept: a long prompt's
        chunks are mostly alike, and an upload costs the host a few torch ops each step."""
        key = (num_tokens, rows.tobytes())
        index = self._capture_indexes.get(key)
        if index is None:
            kept, order = np.unique(rows, return_inverse=True)
            token_rows = np.full(num_tokens, -1, dtype=np.int64)
            token_rows[kept] = np.arange(kept.size)
            token_rows_t, order_t = self.runner.upload_arrays([token_rows, order], torch.int64)
            index = self._capture_indexes[key] = (token_rows_t, kept.size, order_t)
            if len(self._capture_indexes) > self.CAPTURE_LAYOUTS:
                del self._capture_indexes[next(iter(self._capture_indexes))]  # the oldest
        return QueryCapture(*index)

    def keep_queries(self, capture: QueryCapture) -> None:
        """Hand each sequence the queries captured for it, for its next chunk's recall."""
        queries = capture.queries()
        first = 0
        for seq, count, spread in self._capturing:
            if seq.archive is None:
                seq.archive = RecallArchive()
            archive, rows = seq.archive, count + spread
            archive.captured = queries[:, first : first + rows]
            archive.num_scoring, archive.scoring_pending = count, True
            first += rows
        self._capturing = []

    def recall(self, item: ScheduledSequence) -> None:
        """Fill the recall region with the archived blocks the chunk's queries score highest,
        oldest first; empty slots stay masked. A prompt's last chunk is run once first for its
        own queries (its K/V writes are redone by the step itself)."""
        seq, size = item.seq, self.block_size
        archive = seq.archive
        policy = seq.context_policy
        first_block = policy.sink_blocks(size) + policy.landmark_blocks(size)
        region = seq.block_table[first_block : first_block + policy.recall_blocks(size)]
        if item.samples:
            batch = self.runner.build_batch(SchedulerOutput(scheduled=[item]), [1])
            n = item.num_new_tokens
            captured = self._capture_rows(np.arange(max(0, n - QUESTION_QUERY_TOKENS), n), n)
            self.clear_written_slots(batch)
            self.model.forward(batch, self.runner.layer_caches, captured)
            queries = captured.queries()
            num_queries = queries.shape[1]
            # The baseline: the latest chunk before this one (never the question being scored).
            if archive.captured is not None:
                queries = torch.cat([queries, archive.baseline_queries], 1)
        else:
            queries, num_queries = archive.captured, archive.num_scoring
        archive.scoring_pending = False  # a new turn's prompt is scored by its own queries
        self.archive_budget.touch(archive)
        chosen = archive.select(queries, num_queries, len(region),
                                self.model.scale)  # scored on the device, read once: the one wait
        archive.recalled_tokens = [archive.first_token(index) for index in chosen]
        self.bring_back(seq, archive.runs(chosen), region, first_block)
        if item.samples and RECOMPUTE_RECALLED and not policy.landmarks:
            recompute = self.region_recompute(seq, archive.recalled_tokens, first_block)
            if recompute is not None:
                self.region_recomputes.append(recompute)
        self.num_recalls += 1
        self.num_recalled_blocks += len(chosen)

    def region_recompute(self, seq, first_tokens: list[int], first_block: int) -> "RegionRecompute | None":
        """The recalled blocks' tokens (first_tokens: each block's first token index) as a
        sequence of their own, at the region's positions: the runner adds it to the step's batch.
        Each layer writes every token's keys and values before any attends, so the prompt's
        chunk in the same pass sees the region as computed afresh, and the region's tokens see
        only the sinks and each other (positions below theirs; bring_back has just written the
        region and its slot bias). One pass fewer than computing the region on its own first."""
        size = self.block_size
        if not first_tokens:
            return None
        tokens = np.concatenate([seq.token_ids[first : first + size] for first in first_tokens]).astype(np.int64)
        region = RegionTokens(tokens, first_block * size, seq.block_table, seq.rope_plan, seq.num_region_positions)
        return RegionRecompute(region, tokens.size)

    def with_region_recomputes(self, step: SchedulerOutput, logit_rows: list[int]
                               ) -> tuple[SchedulerOutput, list[int]]:
        """The step as the runner batches it: its sequences, then the recall regions its
        recalls computed afresh (no logits), taken (once) from this step's apply."""
        recomputes, self.region_recomputes = self.region_recomputes, []
        if not recomputes:
            return step, logit_rows
        return (dataclasses.replace(step, scheduled=[*step.scheduled, *recomputes]),
                [*logit_rows, *(0 for _ in recomputes)])

    def bring_back(self, seq, runs: list[tuple[torch.Tensor, int, RopePlan]], region: list[int],
                   first_block: int) -> None:
        """Copy runs of archived blocks (kv [n, ...] of n blocks adjacent in the stream, the first
        one's position when evicted, their plan) into the first blocks of the region (table index
        first_block on) and re-rotate their keys from where they were evicted to their slots, all
        blocks at once; mask the rest of the region."""
        size = self.block_size
        lengths = [len(kv) for kv, _, _ in runs]
        count = sum(lengths)
        offsets = np.arange(size)
        old_positions = np.concatenate([position + np.arange(n * size) for (_, position, _), n in zip(runs, lengths)]
                                       or [np.zeros(0, dtype=np.int64)])
        new_positions = (first_block + np.arange(count))[:, None] * size + offsets
        destination = np.asarray(region[:count], dtype=np.int64)
        old_rows = np.repeat([self.runner.rope_index(plan) for _, _, plan in runs],
                             np.asarray(lengths, dtype=np.int64) * size)
        # Each block's host address, for the kernel that reads pinned memory itself.
        addresses = np.concatenate([kv.data_ptr() + np.arange(len(kv), dtype=np.int64) * kv[0].nbytes
                                    for kv, _, _ in runs] or [np.zeros(0, dtype=np.int64)])
        destination_t, empty_t, slots, old_t, new_t, old_rows_t, new_rows_t, addresses_t = self.runner.upload_arrays(
            [destination, np.asarray(region[count:], dtype=np.int64), (destination[:, None] * size + offsets).ravel(),
             old_positions, new_positions.ravel(), old_rows,
             np.full(count * size, self.runner.rope_index(seq.rope_plan)), addresses], torch.int64)
        self.bias_written = True  # (a region is open already; said here as well, where the bias is written)
        self.slot_bias.index_fill_(0, empty_t, float("-inf"))
        if not count:
            return
        if self.copy_stream is not None:  # the archive's copies to host memory are done first
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        host_runs = [kv for kv, _, _ in runs]
        blocks_from_host(self.kv_cache, destination_t, host_runs, addresses_t)  # whole blocks, fp8 scales included
        if self.copy_stream is not None:
            # A kernel's reads of pinned memory are not known to its allocator (copies are): the
            # runs stay referenced until the kernel is done, so an archive chunk forgotten meanwhile
            # is not handed out again while it reads it.
            done = torch.cuda.Event()
            done.record()
            self._host_reads.append((done, host_runs))
        self.slot_bias.index_fill_(0, destination_t, 0.0)
        keys, scales = self.runner.layer_caches.keys
        rerotate_keys(keys, slots, old_t, new_t, old_rows_t, new_rows_t, *self.runner.rope_tables, scales)
