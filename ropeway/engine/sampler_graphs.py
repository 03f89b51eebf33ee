"""CUDA graphs of the sampler's device work, replayed right behind a decode graph's forward.

Launched op by op, a sampled row's device work is some 30 torch ops and 9 Triton launches
(~0.5 ms of host time on the H200, issue 16), where a greedy step launches 3; at batch 64
that host time outran the GPU's step when the host overlaps it. Replayed as a graph, it costs
one parameter copy and one launch.

- The ops `sample_on_device` runs depend only on the batch's `SamplerShape` (which filters,
  how many logprobs), so one graph per (decode bucket, shape) stands for every batch of that
  shape. Its inputs: the decode graph's logits of that bucket (a static buffer) and one static
  buffer of the draw's per-row parameters, filled by one copy from a pinned host buffer;
  rows past the batch are padding rows (a neutral draw whose token is dropped).
- Only batches whose logits are the last decode graph's output and that no row processes
  (penalties, logit_bias, min_tokens, grammar masks: host-dependent work) take a graph; the
  others run eagerly, the same ops on the same columns.
- A shape's graph is captured on its first use (one eager pass first, which compiles the
  kernels). All share one memory pool: their outputs alias, and are copied to the host, and
  read by the next step's input gather, before the next replay in stream order.
"""

import torch

from .cuda_graphs import DecodeGraphs
from .sampler import DrawColumns, SampledTokens, SamplerShape, SamplingBatch, pack, sample_on_device, unpack


class SamplerGraph:
    """One captured sampler: its static parameter buffer and output tensors."""

    def __init__(self, logits: torch.Tensor, shape: SamplerShape, host: torch.Tensor, layout: list, pool):
        self.params = torch.empty(host.shape, dtype=torch.uint8, device=logits.device)
        self.params.copy_(host)  # the first batch's own columns, for the eager pass
        columns = DrawColumns.of(shape, dict(zip(layout, unpack(self.params, list(layout.values())))))
        run = lambda: sample_on_device(logits, logits, columns if shape.drawn else None, shape)  # noqa: E731
        run()  # compiles and loads every kernel for these sizes, outside the capture
        torch.cuda.synchronize(logits.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = run()

    def replay(self, host: torch.Tensor, rows: int) -> SampledTokens:
        if host.numel():
            self.params.copy_(host, non_blocking=True)
        self.graph.replay()
        out = self.out
        result = SampledTokens(*(None if t is None else t[:rows] for t in
                                 (out.token_ids, out.logprobs, out.top_token_ids, out.top_logprobs)))
        result.queue_host_copy()
        return result


class SamplerGraphs:
    def __init__(self, decode_graphs: DecodeGraphs):
        self.decode_graphs = decode_graphs
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, SamplerShape], SamplerGraph] = {}
        self.replays = 0

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SampledTokens | None:
        """The batch's draws by replaying its shape's graph, if `logits` are the rows of the last
        decode graph's output; else None (sample eagerly)."""
        static = self.decode_graphs.last_logits
        if (static is None or logits.data_ptr() != static.data_ptr() or logits.stride() != static.stride()
                or logits.shape[0] > static.shape[0] or logits.shape[0] != len(batch)):
            return None
        bucket = static.shape[0]
        shape, columns = batch.plan(static.shape[1], padded_rows=bucket)
        host, layout = pack(list(columns.values()))
        graph = self.graphs.get((bucket, shape))
        if graph is None:
            graph = self.graphs[(bucket, shape)] = SamplerGraph(static, shape, host, dict(zip(columns, layout)),
                                                                self.pool)
        self.replays += 1
        return graph.replay(host, len(batch))
