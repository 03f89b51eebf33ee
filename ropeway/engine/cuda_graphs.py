"""CUDA graphs for pure-decode steps: one captured forward pass per padded batch size.

Launched one by one from Python, the ~400 kernels of a decode step cost ~20 ms of host time
whatever the model's size; a graph replays them in one launch.

- A step of n sequences runs the graph of the smallest bucket b >= n. Its inputs live in
  static buffers sized for the largest bucket: the step's metadata is copied (on the
  device) into rows 0..n-1, and rows n..b-1 are padding: slot -1 (the KV write skips
  it) and seq_len 1 (one key of a real block is read, and the row's output dropped).
- The attention kernel sizes its KV splits from the max_seq_len hint, so graphs are
  captured with the longest sequence the KV pool can hold; at run time each program
  cuts its slice from its sequence's real length, and slices past it exit at once.
- A bucket is captured the first time a step needs it, once for batches without a landmark
  cache and once for batches with one (their attention reads the runner's per-slot logit
  bias, a tensor that lives as long as the runner). All graphs share one memory pool, so
  their outputs alias: read the logits before the next replay.
"""

import bisect
from contextlib import nullcontext

import torch

from ropeway.models import ForwardBatch, LlamaModel
from ropeway.models.forward_batch import block_table_width

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int, slot_bias: torch.Tensor,
                 buckets: tuple[int, ...] = BATCH_BUCKETS):
        self.model = model
        self.kv_cache = kv_cache
        self.slot_bias = slot_bias
        self.buckets = buckets
        device, largest = model.device, buckets[-1]
        num_blocks = kv_cache.shape[2]
        self.max_seq_len = num_blocks * block_size
        index = torch.arange(largest + 1, device=device)
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.seq_index = index[:largest].to(torch.int32)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = index.to(torch.int32)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, block_table_width(num_blocks), dtype=torch.int32, device=device)
        self.inv_freq = torch.zeros(largest, model.config.head_dim // 2, dtype=torch.float32, device=device)
        self.attention_factor = torch.ones(largest, dtype=torch.float32, device=device)
        self.logits_indices = index[:largest].clone()
        self.row_numbers = index[:largest]
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Held around each capture: keeps other threads' CUDA calls (the host tier's copy pump) out of it.
        self.capture_guard = nullcontext
        # The whole bucket's logits of the last replay: a sampler graph reads them in place.
        self.last_logits: torch.Tensor | None = None

    def fits(self, batch: ForwardBatch) -> bool:
        """A pure-decode step in which every sequence samples, no larger than the largest bucket."""
        num_seqs = batch.seq_lens.shape[0]
        return ((batch.slot_bias is None or batch.slot_bias is self.slot_bias) and batch.max_query_len == 1
                and batch.logits_indices.shape[0] == num_seqs
                and batch.input_ids.shape[0] == num_seqs and num_seqs <= self.buckets[-1]
                and batch.block_tables.shape[1] <= self.block_tables.shape[1])

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [n, vocab] of the step, as model.forward would return them."""
        n = batch.seq_lens.shape[0]
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        key = (bucket, batch.slot_bias is not None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.seq_lens[:n].copy_(batch.seq_lens)
        self.block_tables[:n, : batch.block_tables.shape[1]].copy_(batch.block_tables)
        self.inv_freq[:n].copy_(batch.inv_freq)
        self.attention_factor[:n].copy_(batch.attention_factor)
        # The batch's rows in scheduled order (the runner orders decodes by length); padding
        # rows read their own (a larger step may have left its order there).
        self.logits_indices[:n].copy_(batch.logits_indices)
        if n < bucket:
            self.slot_mapping[n:bucket].fill_(-1)
            self.seq_lens[n:bucket].fill_(1)
            self.logits_indices[n:bucket].copy_(self.row_numbers[n:bucket])
        graph, logits = self.graphs[key]
        graph.replay()
        self.last_logits = logits
        return logits[:n]

    def capture_up_to(self, num_seqs: int) -> int:
        """Capture every bucket a batch of up to num_seqs sequences (without a landmark cache)
        can use, so no step of a running server stalls on a capture. Returns how many."""
        largest = self.buckets[min(bisect.bisect_left(self.buckets, num_seqs), len(self.buckets) - 1)]
        missing = [b for b in self.buckets if b <= largest and (b, False) not in self.graphs]
        for bucket in missing:
            self.graphs[(bucket, False)] = self._capture(bucket, False)
        return len(missing)

    def _static_batch(self, bucket: int, with_bias: bool) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:bucket], positions=self.positions[:bucket],
            seq_index=self.seq_index[:bucket], slot_mapping=self.slot_mapping[:bucket],
            query_start_loc=self.query_start_loc[: bucket + 1], seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket], inv_freq=self.inv_freq[:bucket],
            attention_factor=self.attention_factor[:bucket], logits_indices=self.logits_indices[:bucket],
            max_query_len=1, max_seq_len=self.max_seq_len, slot_bias=self.slot_bias if with_bias else None)

    def _capture(self, bucket: int, with_bias: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        with self.capture_guard():
            return self._capture_alone(bucket, with_bias)

    def _capture_alone(self, bucket: int, with_bias: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # All rows padding while warming up and capturing: nothing is written to the cache.
        self.slot_mapping[:bucket].fill_(-1)
        self.seq_lens[:bucket].fill_(1)
        self.logits_indices[:bucket].copy_(self.row_numbers[:bucket])  # a larger step's order may be there
        batch = self._static_batch(bucket, with_bias)
        # The eager pass compiles and loads the kernels for this grid, outside the capture.
        self.model.forward(batch, self.kv_cache)
        torch.cuda.synchronize(self.model.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.forward(batch, self.kv_cache)
        return graph, logits
