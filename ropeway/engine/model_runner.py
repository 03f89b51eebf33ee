"""Turns a scheduler step into one flat model batch and runs it."""

import math

import numpy as np
import torch

from ropeway.kernels import rerotate_keys
from ropeway.models import Capture, ForwardBatch, LlamaModel
from ropeway.scheduler import Eviction, RopeGrowth, RopePlan, ScheduledSequence, SchedulerOutput

from .cuda_graphs import DecodeGraphs
from .landmarks import chunk_summary, rotate_to
from .recall import RECALL_QUERY_TOKENS, ArchiveBudget, RecallArchive


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int,
                 archive_bytes: int = 4 << 30):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = model.device
        self._rope_rows: dict[RopePlan, tuple[torch.Tensor, float]] = {}
        # Logit bias per cache slot [num_blocks, block_size]: ln(chunk length) on a landmark
        # slot, -inf on an empty region slot, 0 elsewhere. Read only by batches that hold a
        # landmark cache.
        self.slot_bias = torch.zeros(kv_cache.shape[2], block_size, dtype=torch.float32, device=self.device)
        self.archive_budget = ArchiveBudget(archive_bytes)
        self.num_recalls = 0          # prompts that brought archived blocks back
        self.num_recalled_blocks = 0
        # Pure-decode steps replay CUDA graphs on the GPU; None runs every step eagerly.
        self.decode_graphs = (DecodeGraphs(model, kv_cache, block_size, self.slot_bias)
                              if self.device.type == "cuda" else None)

    def rope_row(self, plan: RopePlan) -> tuple[torch.Tensor, float]:
        """(inv_freq on the device, attention factor), computed once per plan."""
        row = self._rope_rows.get(plan)
        if row is None:
            inv_freq, factor = plan.parameters()
            row = self._rope_rows[plan] = (inv_freq.to(self.device), factor)
        return row

    def apply_rope_growth(self, growth: RopeGrowth) -> None:
        """Re-rotate a sequence's cached keys from its old plan to its new one, in place."""
        self._move_keys(growth.seq, growth.block_copies, 0, growth.num_tokens, 0, growth.old_plan, growth.new_plan)

    def apply_eviction(self, eviction: Eviction) -> None:
        """Move a sequence's kept window keys down by the evicted length (same plan)."""
        plan = eviction.plan
        self._move_keys(eviction.seq, eviction.block_copies, eviction.first_position, eviction.num_tokens,
                        eviction.shift, plan, plan)

    def _move_keys(self, seq, block_copies: list[tuple[int, int]], first_position: int, count: int, shift: int,
                   old_plan: RopePlan, new_plan: RopePlan) -> None:
        """Copy the blocks seq no longer shares, then rotate its keys at cache positions
        first_position.. (computed at position + shift under old_plan) to those positions under
        new_plan: every layer at once, by the fp32 angle difference."""
        self.copy_blocks(block_copies)
        if count == 0:
            return
        positions = torch.arange(first_position, first_position + count, device=self.device)
        table = torch.tensor(seq.block_table, dtype=torch.int64, device=self.device)
        slots = table[positions // self.block_size] * self.block_size + positions % self.block_size
        old_inv_freq, old_factor = self.rope_row(old_plan)
        new_inv_freq, new_factor = self.rope_row(new_plan)
        rerotate_keys(self.kv_cache[:, 0], slots, positions + shift, positions,
                      old_inv_freq.expand(count, -1), new_inv_freq.expand(count, -1),
                      torch.full((count,), old_factor, device=self.device),
                      torch.full((count,), new_factor, device=self.device))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for source, destination in copies:
            self.kv_cache[:, :, destination].copy_(self.kv_cache[:, :, source])
            self.slot_bias[destination].copy_(self.slot_bias[source])

    def write_landmarks(self, eviction: Eviction) -> None:
        """Open the landmark region (every slot empty), then write each evicted chunk's
        summary in its slot: the mean key rotated to the slot's position, the mean value,
        and ln(chunk length) on the slot's logit so it weighs as the chunk's tokens would."""
        if eviction.new_region is None and not eviction.landmarks:
            return
        table = eviction.seq.block_table
        bias = self.slot_bias
        if eviction.new_region is not None:
            for position in eviction.new_region[:: self.block_size]:  # whole blocks
                bias[table[position // self.block_size]] = float("-inf")
        inv_freq, factor = self.rope_row(eviction.plan)
        for landmark in eviction.landmarks:
            keys, values = chunk_summary(self.model, landmark.token_ids, inv_freq, factor, self.block_size)
            block, offset = table[landmark.position // self.block_size], landmark.position % self.block_size
            self.kv_cache[:, 0, block, offset] = rotate_to(keys, landmark.position, inv_freq, factor).to(self.kv_cache.dtype)
            self.kv_cache[:, 1, block, offset] = values.to(self.kv_cache.dtype)
            bias[block, offset] = math.log(len(landmark.token_ids))

    def archive_evicted(self, eviction: Eviction) -> None:
        """Copy a sequence's evicted blocks to host memory before anything reuses them."""
        seq = eviction.seq
        if seq.archive is None:
            seq.archive = RecallArchive()
        blocks = torch.tensor(eviction.archived_blocks, device=self.device)
        inv_freq, factor = self.rope_row(eviction.plan)
        seq.archive.add(self.kv_cache[:, :, blocks], eviction.archived_position, eviction.plan, inv_freq, factor)
        self.archive_budget.track(seq.archive)

    @staticmethod
    def recalls(item: ScheduledSequence) -> bool:
        """A chunk that ends a prompt of a cache with archived blocks brings the best back."""
        seq = item.seq
        return (item.samples and seq.num_computed_tokens < seq.num_prompt_tokens and seq.archive is not None
                and seq.archive.num_blocks > 0)

    def recall(self, item: ScheduledSequence) -> None:
        """Run the chunk once for its queries (its K/V writes are redone by the step itself),
        then fill the recall region with the archived blocks they score highest, oldest
        first, each re-rotated from where it was evicted to its slot; empty slots stay
        masked."""
        seq, size = item.seq, self.block_size
        batch = self.build_batch(SchedulerOutput(scheduled=[item]))
        n = item.num_new_tokens
        captured = Capture(rows=torch.arange(max(0, n - RECALL_QUERY_TOKENS), n, device=self.device))
        self.slot_bias.view(-1)[batch.slot_mapping] = 0.0
        self.model.forward(batch, self.kv_cache, captured)
        policy = seq.context_policy
        slots = policy.recall_blocks(size)
        chosen = seq.archive.select(torch.stack(captured.queries), slots, self.model.scale)
        first_block = policy.sink_blocks(size) + policy.landmark_blocks(size)
        for slot in range(slots):
            block = seq.block_table[first_block + slot]
            if slot >= len(chosen):
                self.slot_bias[block] = float("-inf")
                continue
            kv, old_position, plan = seq.archive.block(chosen[slot])
            self.kv_cache[:, :, block].copy_(kv)
            self.slot_bias[block] = 0.0
            position = (first_block + slot) * size
            self._move_keys(seq, [], position, size, old_position - position, plan, seq.rope_plan)
        self.num_recalls += 1
        self.num_recalled_blocks += len(chosen)

    def build_batch(self, step: SchedulerOutput) -> ForwardBatch:
        items = step.scheduled
        num_new = np.array([i.num_new_tokens for i in items], dtype=np.int64)
        computed = np.array([i.seq.num_computed_tokens for i in items], dtype=np.int64)
        # Cache positions differ from token indices once a bounded cache has evicted.
        cached = np.array([i.seq.num_cached_positions for i in items], dtype=np.int64)
        seq_lens = cached + num_new
        query_start = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start[1:])
        total = int(query_start[-1])

        input_ids = np.empty(total, dtype=np.int64)
        for i, item in enumerate(items):
            input_ids[query_start[i] : query_start[i + 1]] = item.seq.token_ids[computed[i] : computed[i] + num_new[i]]
        seq_index = np.repeat(np.arange(len(items)), num_new)
        # Position of each token: its sequence's computed count plus its offset in the chunk.
        positions = cached[seq_index] + (np.arange(total) - query_start[:-1][seq_index])

        max_blocks = max(len(i.seq.block_table) for i in items)
        block_tables = np.zeros((len(items), max_blocks), dtype=np.int32)
        for i, item in enumerate(items):
            block_tables[i, : len(item.seq.block_table)] = item.seq.block_table
        slot_mapping = (block_tables[seq_index, positions // self.block_size].astype(np.int64)
                        * self.block_size + positions % self.block_size)
        logits_indices = np.concatenate([np.arange(query_start[i + 1] - rows, query_start[i + 1])
                                         for i, rows in enumerate(self.logit_rows(step))]).astype(np.int64)

        to = lambda a, dtype=torch.int64: torch.from_numpy(a).to(device=self.device, dtype=dtype)
        return ForwardBatch(
            input_ids=to(input_ids),
            positions=to(positions),
            seq_index=to(seq_index, torch.int32),
            slot_mapping=to(slot_mapping),
            query_start_loc=to(query_start, torch.int32),
            seq_lens=to(seq_lens, torch.int32),
            block_tables=to(block_tables, torch.int32),
            inv_freq=torch.stack([self.rope_row(i.seq.rope_plan)[0] for i in items]),
            attention_factor=torch.tensor([self.rope_row(i.seq.rope_plan)[1] for i in items],
                                          dtype=torch.float32, device=self.device),
            logits_indices=to(logits_indices),
            max_query_len=int(num_new.max()),
            max_seq_len=int(seq_lens.max()),
            slot_bias=self.slot_bias if any(i.seq.num_region_positions for i in items) else None,
        )

    @staticmethod
    def logit_rows(step: SchedulerOutput) -> list[int]:
        """How many of each scheduled sequence's last tokens need logits: its whole chunk if it
        asked for prompt logprobs and the chunk holds prompt tokens, else 1 if it samples."""
        rows = []
        for item in step.scheduled:
            seq = item.seq
            if seq.wants_prompt_logprobs and seq.num_computed_tokens < seq.num_prompt_tokens:
                rows.append(item.num_new_tokens)
            else:
                rows.append(1 if item.samples else 0)
        return rows

    def execute(self, step: SchedulerOutput) -> torch.Tensor:
        """Logits for the rows `logit_rows` asks for, sequence after sequence in scheduled order."""
        # Evicted blocks go to host memory first: this step may hand them out again.
        for eviction in step.evictions:
            if eviction.archived_blocks:
                self.archive_evicted(eviction)
        for eviction in step.evictions:
            self.apply_eviction(eviction)
            self.write_landmarks(eviction)
        for growth in step.rope_growths:
            self.apply_rope_growth(growth)
        for item in step.scheduled:
            if self.recalls(item):
                self.recall(item)
        batch = self.build_batch(step)
        # Slots written this step hold tokens: clear what a region left there.
        self.slot_bias.view(-1)[batch.slot_mapping] = 0.0
        if self.decode_graphs is not None and self.decode_graphs.fits(batch):
            return self.decode_graphs.run(batch)
        return self.model.forward(batch, self.kv_cache)
