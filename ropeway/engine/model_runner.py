"""Turns a scheduler step into one flat model batch and runs it."""

from collections.abc import Callable
from itertools import chain

import numpy as np
import torch
import torch.distributed as dist

from ropeway.kernels import is_long_chunk
from ropeway.models import ForwardBatch, LayerCaches, LlamaModel, rope_parameters
from ropeway.models.forward_batch import block_table_width
from ropeway.scheduler import RopePlan, SchedulerOutput

from .block_transfers import BlockTransfers
from .cache_ops import CacheOps
from .host_batch import HostBatch
from .cuda_graphs import DecodeGraphs
from .kv_pool import cache_block_views
from ropeway.arith import round_up


_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32}


class ModelRunner:
    UNROTATED_ROW = 0  # the RoPE tables' row of angle 0 (inv_freq 0, factor 1)

    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int,
                 archive_bytes: int = 4 << 30, host_tier_slots: int = 0):
        self.model = model
        self.kv_cache = kv_cache
        self.layer_caches = LayerCaches(kv_cache, model.num_local_kv_heads, model.config.head_dim)
        self.block_size = block_size
        self.device = model.device
        # Every plan seen so far has a row in these tables, so a step gathers its sequences'
        # RoPE rows on the device from one index per sequence, and key moves name rows. Row 0
        # (UNROTATED_ROW) is angle 0, where retrieval turns archived keys back to for scoring.
        self._rope_index: dict[RopePlan, int] = {}
        self._inv_freq_table = torch.zeros(1, model.config.head_dim // 2, dtype=torch.float32, device=self.device)
        self._attention_factors: list[float] = [1.0]
        self._attention_factor_table = torch.ones(1, dtype=torch.float32, device=self.device)
        self._rope_plans: list[RopePlan] = []  # in the order of their rows (plan i: row i + 1)
        # Rank 0 under tensor parallelism: the WorkerGroup every step is also sent to.
        self.workers = None
        # Everything a step does to the cache besides writing its own tokens' K/V.
        self.cache_ops = CacheOps(self, archive_bytes)
        # Pure-decode steps replay CUDA graphs on the GPU; None runs every step eagerly.
        self.decode_graphs = (DecodeGraphs(model, kv_cache, block_size, self.cache_ops.slot_bias)
                              if self.device.type == "cuda" else None)
        # The host tier's memory and copies (None without one). A block's landmark slot bias moves
        # with it, once any is written (until then every bias, in the pool and on the host, is 0).
        self.block_transfers = (BlockTransfers(cache_block_views(kv_cache), host_tier_slots,
                                               zero_until_written=[self.cache_ops.slot_bias])
                                if host_tier_slots else None)
        if self.decode_graphs is not None and self.block_transfers is not None:
            self.decode_graphs.capture_guard = self.block_transfers.paused

    def rope_index(self, plan: RopePlan) -> int:
        """The plan's row in the RoPE tables, added the first time the plan is seen."""
        index = self._rope_index.get(plan)
        if index is None:
            inv_freq, factor = rope_parameters(plan)
            index = self._rope_index[plan] = len(self._attention_factors)
            self._rope_plans.append(plan)
            self._attention_factors.append(factor)
            self._inv_freq_table = torch.cat([self._inv_freq_table, inv_freq.to(self.device, torch.float32)[None]])
            self._attention_factor_table = torch.tensor(self._attention_factors, dtype=torch.float32,
                                                        device=self.device)
        return index

    def rope_row(self, plan: RopePlan) -> tuple[torch.Tensor, float]:
        """(inv_freq on the device, attention factor)."""
        index = self.rope_index(plan)
        return self._inv_freq_table[index], self._attention_factors[index]

    @property
    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inv_freq [P, D/2], attention factor [P]) of every plan's row, on the device."""
        return self._inv_freq_table, self._attention_factor_table

    def rope_rows(self, plan_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inv_freq [N, D/2], attention factor [N]) on the device, of the plans' rows plan_index [N]."""
        return (self._inv_freq_table.index_select(0, plan_index),
                self._attention_factor_table.index_select(0, plan_index))

    def build_batch(self, step: SchedulerOutput, logit_rows: list[int],
                    previous: tuple[torch.Tensor, dict[int, int]] | None = None) -> ForwardBatch:
        """The step's flat batch on the device. previous: (tokens on the device, row of each
        sequence id) of a step still in flight, whose tokens stand as negative placeholders in
        the sequences' token ids."""
        host = self.host_batch(step, logit_rows, previous[1] if previous else None)
        return self.upload(host, previous[0] if previous else None)

    def host_batch(self, step: SchedulerOutput, logit_rows: list[int],
                   previous_rows: dict[int, int] | None = None) -> HostBatch:
        """The step's flat batch as host arrays, built with array operations (the per-sequence
        Python is one read of each field): what every tensor-parallel rank uploads and runs."""
        items = step.scheduled
        num_seqs = len(items)
        num_new = np.fromiter((item.num_new_tokens for item in items), np.int64, num_seqs)
        rows = np.asarray(logit_rows, dtype=np.int64)
        # Cache positions differ from token indices once a bounded cache has evicted.
        cached = np.fromiter((item.seq.num_cached_positions for item in items), np.int64, num_seqs)
        # Single-query sequences go first, so attention can give them decode tiles of their own
        # (num_decode_seqs), and long chunks last, so it can hand them to cuDNN (long_chunks);
        # logits still come back in scheduled order. The decodes go shortest first: attention
        # starts its programs from the batch's last sequence, so the longest start first and
        # the short ones fill the launch's tail (at 128 decodes of 100-2k keys, 17% faster).
        is_chunk = num_new > 1
        num_decodes = num_seqs - int(is_chunk.sum())
        group = is_chunk.astype(np.int64) + is_long_chunk(num_new)  # 0 decode, 1 chunk, 2 long chunk
        order = np.lexsort((np.where(is_chunk, 0, cached), group))
        restore = None
        if (order != np.arange(num_seqs)).any():
            restore = np.argsort(order)
            items, num_new, cached, group = [items[i] for i in order], num_new[order], cached[order], group[order]
        seqs = [item.seq for item in items]
        computed = [seq.num_computed_tokens for seq in seqs]
        seq_lens = cached + num_new
        query_start = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(num_new, out=query_start[1:])
        total = int(query_start[-1])
        # Where each scheduled sequence's tokens start in the batch, in scheduled order.
        self.chunk_starts = query_start[:-1] if restore is None else query_start[:-1][restore]

        if total == num_seqs:  # one token each, as in every decode step: no offsets to spread
            input_ids = np.fromiter((seq.token_ids[c] for seq, c in zip(seqs, computed)), np.int64, total)
            seq_index = np.arange(num_seqs)
            positions = cached
            logits_indices = np.flatnonzero(rows)  # rows are 0 or 1
            if restore is not None:
                logits_indices = restore[logits_indices]
        else:
            input_ids = np.fromiter(chain.from_iterable(seq.token_ids[c : c + n] for seq, c, n
                                                        in zip(seqs, computed, num_new.tolist())), np.int64, total)
            seq_index = np.repeat(np.arange(num_seqs), num_new)
            # Position of each token: its sequence's cache length plus its offset in the chunk.
            positions = cached[seq_index] + (np.arange(total) - query_start[:-1][seq_index])
            # The last `rows` tokens of each sequence, in scheduled order.
            query_end = query_start[1:] if restore is None else query_start[1:][restore]
            row_start = np.cumsum(rows) - rows
            logits_indices = (np.repeat(query_end - rows, rows)
                              + np.arange(int(rows.sum())) - np.repeat(row_start, rows))

        table_lens = np.fromiter((len(seq.block_table) for seq in seqs), np.int64, num_seqs)
        block_tables = np.zeros((num_seqs, block_table_width(int(table_lens.max()))), dtype=np.int32)
        # A boolean mask fills row after row, in the order the tables are chained.
        block_tables[np.arange(block_tables.shape[1]) < table_lens[:, None]] = np.fromiter(
            chain.from_iterable(seq.block_table for seq in seqs), np.int32, int(table_lens.sum()))
        slot_mapping = (block_tables[seq_index, positions // self.block_size].astype(np.int64)
                        * self.block_size + positions % self.block_size)
        # Plans are shared objects: look each distinct one up once (hashing a plan is not free).
        plan_rows: dict[int, int] = {}
        for seq in seqs:
            if id(seq.rope_plan) not in plan_rows:
                plan_rows[id(seq.rope_plan)] = self.rope_index(seq.rope_plan)
        plan_index = np.fromiter((plan_rows[id(seq.rope_plan)] for seq in seqs), np.int64, num_seqs)

        # Placeholders: tokens the previous step sampled on the device, taken from there.
        holes = np.flatnonzero(input_ids < 0)
        sources = np.fromiter((previous_rows[seqs[i].seq_id] for i in seq_index[holes]), np.int64, holes.size)
        return HostBatch(
            int64=[input_ids, positions, slot_mapping, logits_indices, plan_index, holes, sources],
            # The block tables first: at the buffer's start they keep its alignment for the kernels.
            int32=[block_tables, seq_index, query_start, seq_lens],
            max_query_len=int(num_new.max()), max_seq_len=int(seq_lens.max()),
            num_decode_seqs=num_decodes if total > num_seqs else 0,
            long_chunks=[(int(query_start[i]), int(num_new[i]), int(cached[i])) for i in np.flatnonzero(group == 2)],
            uses_slot_bias=any(seq.num_region_positions for seq in seqs))

    def upload(self, host: HostBatch, previous_tokens: torch.Tensor | None = None) -> ForwardBatch:
        """The batch on the device, in two copies, one per integer type; placeholders filled
        from the previous step's tokens, which are still on the device."""
        input_ids, positions, slot_mapping, logits_indices, plan_index, holes, sources = self.upload_arrays(
            host.int64, torch.int64)
        if holes.numel():
            input_ids.index_copy_(0, holes, previous_tokens.index_select(0, sources))
        block_tables, seq_index, query_start_loc, seq_lens = self.upload_arrays(host.int32, torch.int32)
        inv_freq, attention_factor = self.rope_rows(plan_index)
        return ForwardBatch(
            input_ids=input_ids,
            positions=positions,
            seq_index=seq_index,
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            inv_freq=inv_freq,
            attention_factor=attention_factor,
            logits_indices=logits_indices,
            max_query_len=host.max_query_len,
            max_seq_len=host.max_seq_len,
            num_decode_seqs=host.num_decode_seqs,
            long_chunks=tuple(tuple(chunk) for chunk in host.long_chunks),
            slot_bias=self.cache_ops.slot_bias if host.uses_slot_bias else None,
        )

    def upload_arrays(self, arrays: list[np.ndarray], dtype: torch.dtype) -> list[torch.Tensor]:
        """The arrays as tensors on the device. On CUDA they go through one pinned host buffer
        and one asynchronous copy, so the host neither waits for the GPU nor pays one copy per
        array (the caching host allocator reuses a pinned buffer only once its copy is done).
        On CPU the arrays are used in place."""
        if self.device.type == "cpu":
            return [torch.from_numpy(a.astype(_NUMPY_DTYPES[dtype], copy=False)) for a in arrays]
        host, parts = packed_aligned(arrays, dtype, pin_memory=True)
        views = host.to(self.device, non_blocking=True).split_with_sizes(parts)[::2]
        return [view if a.ndim == 1 else view.view(a.shape) for view, a in zip(views, arrays)]

    @staticmethod
    def logit_rows(step: SchedulerOutput) -> list[int]:
        """How many of each scheduled sequence's last tokens need logits: its whole chunk if it
        asked for prompt logprobs and the chunk holds prompt tokens, else 1 if it samples."""
        return [item.num_new_tokens if item.seq.wants_prompt_logprobs
                and item.seq.num_computed_tokens < item.seq.num_prompt_tokens else int(item.samples)
                for item in step.scheduled]

    def move_blocks(self, step: SchedulerOutput) -> None:
        """Queue the step's host-tier copies: blocks the pool lets go of leave before anything
        written into them (the step, or a load), then loads come back; none is waited for."""
        if self.block_transfers is None:
            return
        if self.cache_ops.bias_written:  # (set by an earlier step: this step's writes come after its copies)
            self.block_transfers.mark_written()
        self.block_transfers.move(step.offloads, step.loads)

    def execute(self, step: SchedulerOutput, logit_rows: list[int],
                previous: tuple[torch.Tensor, dict[int, int]] | None = None,
                keep_going: Callable[[], bool] | None = None) -> torch.Tensor:
        """Logits for the rows `logit_rows(step)` asks for, sequence after sequence in scheduled
        order: apply the step's cache operations, build the batch, run it. previous: see
        build_batch. keep_going: LlamaModel.forward's (ForwardStopped between layers); ignored
        under tensor parallelism, where every other rank is sent the same step first and all must
        run every layer's collectives."""
        ops = self.cache_ops
        if self.workers is not None:
            ops.recorded = []
        ops.apply(step)
        batched, batched_rows = ops.with_region_recomputes(step, logit_rows)
        host = self.host_batch(batched, batched_rows, previous[1] if previous else None)
        previous_tokens = previous[0] if previous else None
        if self.workers is not None:
            self.workers.send_step(self._rope_plans, ops.recorded, host, previous_tokens)
            ops.recorded = None
            keep_going = None
        # Retrieval keeps queries of prompt chunks for the next chunk's selection.
        num_tokens = host.int64[0].size  # (input_ids)
        return self.run(self.upload(host, previous_tokens), ops.query_capture(step, self.chunk_starts, num_tokens),
                        keep_going)

    def run(self, batch: ForwardBatch, capture=None, keep_going: Callable[[], bool] | None = None) -> torch.Tensor:
        self.cache_ops.clear_written_slots(batch)
        if capture is None and self.decode_graphs is not None and self.decode_graphs.fits(batch):
            return self.decode_graphs.run(batch)
        logits = self.model.forward(batch, self.layer_caches, capture, keep_going)
        if capture is not None:
            self.cache_ops.keep_queries(capture)
        return logits

    def run_worker_step(self, step) -> None:
        """On a tensor-parallel worker: the step rank 0 sent (a WorkerStep), on this rank's shard."""
        for plan in step.new_plans:  # numbered in the order rank 0 first saw them, as there
            self.rope_index(plan)
        for move in step.moves:
            self.cache_ops.move_keys(move)
        previous = None
        if step.num_previous_tokens:
            previous = torch.empty(step.num_previous_tokens, dtype=torch.int64, device=self.device)
            dist.broadcast(previous, src=0)
        self.run(self.upload(step.batch, previous))


def packed_aligned(arrays: list[np.ndarray], dtype: torch.dtype, pin_memory: bool = False
                   ) -> tuple[torch.Tensor, list[int]]:
    """The arrays (flattened) back to back in one host tensor of dtype, each starting 16-byte
    aligned, and the split sizes that cut it into [array, padding, array, padding, ...]: one
    split_with_sizes gives every array its view (each torch op costs the host ~10-40 us on the
    H200's machines, and a step uploads a dozen arrays). Aligned because Triton specializes
    kernels on pointer alignment: offsets that changed with the batch's sizes recompiled kernels
    mid-serving."""
    per_16_bytes = 16 // dtype.itemsize
    parts = []
    for a in arrays:
        parts += [a.size, round_up(a.size, per_16_bytes) - a.size]
    host = torch.empty(sum(parts), dtype=dtype, pin_memory=pin_memory)
    host_array = host.numpy()
    start = 0
    for a, padding in zip(arrays, parts[1::2]):
        host_array[start : start + a.size] = a.ravel()
        start += a.size + padding
    return host, parts
