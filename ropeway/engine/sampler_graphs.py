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
- The shapes of plain sampling (temperature alone, and with top-p; each with logprobs or
  without) are captured at start-up for every decode bucket captured then (`capture_common`);
  any other shape on its first use (one eager pass first, which compiles the kernels).
- All share one memory pool: their outputs alias, and are copied to the host, and read by the
  next step's input gather, before the next replay in stream order.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch

from ropeway.sampling_params import SamplingParams

from .cuda_graphs import DecodeGraphs
from .sampler import (DrawColumns, SampledTokens, SamplerShape, SamplingBatch, SamplingRow, pack, sample_on_device,
                      unpack)

# The settings of plain sampling, whose shapes capture_common captures ahead of serving: with and
# without logprobs, since chat traffic at 256 streams nearly always has a row that asks for them
# (one shape for any count: SamplingBatch.plan), and a shape captured on its first use stalls the
# batch once per decode bucket.
COMMON_SETTINGS = tuple({**settings, **extra} for settings in ({"temperature": 1.0}, {"temperature": 1.0, "top_p": 0.9})
                        for extra in ({}, {"logprobs": 0}))

# Captures a function's device work: returns what replays it, and the outputs a replay rewrites.
Capture = Callable[[Callable[[], SampledTokens]], tuple[Callable[[], None], SampledTokens]]


def cuda_graph_capture(pool, guard: Callable[[], AbstractContextManager] = nullcontext) -> Capture:
    """guard: held around each capture (the decode graphs' guard, which keeps the host tier's
    copy thread from making CUDA calls while a graph is captured)."""
    def capture(run):
        run()  # compiles and loads every kernel for these sizes, outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with guard(), torch.cuda.graph(graph, pool=pool):
            out = run()
        return graph.replay, out
    return capture


class SamplerGraph:
    """One captured sampler: its static parameter buffer and output tensors."""

    def __init__(self, logits: torch.Tensor, shape: SamplerShape, host: torch.Tensor, layout: dict, capture: Capture):
        self.params = torch.empty(host.shape, dtype=torch.uint8, device=logits.device)
        self.params.copy_(host)  # the first batch's own columns, for the eager pass
        columns = (DrawColumns.of(shape, dict(zip(layout, unpack(self.params, list(layout.values())))))
                   if shape.drawn else None)  # (greedy rows with logprobs have no columns)
        self.replay_graph, self.out = capture(lambda: sample_on_device(logits, logits, columns, shape))

    def replay(self, host: torch.Tensor, rows: int) -> SampledTokens:
        if host.numel():
            self.params.copy_(host, non_blocking=True)
        self.replay_graph()
        out = self.out
        result = SampledTokens(*(None if t is None else t[:rows] for t in
                                 (out.token_ids, out.logprobs, out.top_token_ids, out.top_logprobs)))
        result.queue_host_copy()
        return result


class SamplerGraphs:
    def __init__(self, decode_graphs: DecodeGraphs, capture: Capture | None = None):
        self.decode_graphs = decode_graphs
        self.capture = capture or cuda_graph_capture(torch.cuda.graph_pool_handle(),
                                                     lambda: getattr(decode_graphs, "capture_guard", nullcontext)())
        self.graphs: dict[tuple[int, SamplerShape], SamplerGraph] = {}
        self.replays = 0

    def capture_common(self) -> int:
        """Capture the common shapes' graphs for every decode bucket already captured (without a
        landmark cache), so no step of a running server stalls on them. Returns how many."""
        count = 0
        for (bucket, with_bias), (_, logits) in sorted(self.decode_graphs.graphs.items()):
            if with_bias:
                continue
            for settings in COMMON_SETTINGS:
                batch = SamplingBatch([SamplingRow(SamplingParams(**settings), seed=0, step=0)] * bucket)
                shape, columns = batch.plan(logits.shape[1], for_graph=True)
                if (bucket, shape) not in self.graphs:
                    host, layout = pack(list(columns.values()), pin=logits.is_cuda)
                    self.graphs[(bucket, shape)] = SamplerGraph(logits, shape, host, dict(zip(columns, layout)),
                                                                self.capture)
                    count += 1
        return count

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SampledTokens | None:
        """The batch's draws by replaying its shape's graph, if `logits` are the rows of the last
        decode graph's output; else None (sample eagerly)."""
        static = self.decode_graphs.last_logits
        if (static is None or logits.data_ptr() != static.data_ptr() or logits.stride() != static.stride()
                or logits.shape[0] > static.shape[0] or logits.shape[0] != len(batch)):
            return None
        bucket = static.shape[0]
        shape, columns = batch.plan(static.shape[1], padded_rows=bucket, for_graph=True)
        host, layout = pack(list(columns.values()), pin=static.is_cuda)
        graph = self.graphs.get((bucket, shape))
        if graph is None:
            graph = self.graphs[(bucket, shape)] = SamplerGraph(static, shape, host, dict(zip(columns, layout)),
                                                                self.capture)
        self.replays += 1
        return graph.replay(host, len(batch))
