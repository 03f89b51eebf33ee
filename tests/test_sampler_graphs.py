"""The sampler's CUDA graphs (sampler_graphs.py) against eager sampling: the same seeded tokens
and logprobs, one graph per (bucket, shape), no host synchronization. On CPU, a stand-in for
capture (replay runs the same ops again into the captured outputs) checks the plumbing: static
parameter buffer, padding rows, reuse per shape; the GPU tests are skipped."""

from types import SimpleNamespace

import pytest
import torch

from ropeway.engine.sampler import SamplingRow, sample
from ropeway.engine.sampling_state import PenaltyState
from ropeway.sampling_params import SamplingParams

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VOCAB = 128256
MIXED = [{"temperature": 0.8, "top_p": 0.95}, {"temperature": 0.8, "top_p": 0.95, "logprobs": 5},
         {"temperature": 0.0}, {"temperature": 1.0, "min_p": 0.05, "top_p": 0.9}]


def rows_of(settings: list[dict], count: int, seed: int, step: int) -> list[SamplingRow]:
    return [SamplingRow(SamplingParams(seed=seed + i, **settings[i % len(settings)]), seed=seed + i, step=step)
            for i in range(count)]


def same_top_tokens(graphed, eager) -> bool:
    """A graph returns the top MAX_TOP_LOGPROBS for every logprobs count (one graph for all); each
    row's first k are the eager sampler's top k."""
    if eager.top_token_ids is None:
        return graphed.top_token_ids is None
    k = len(eager.top_token_ids[0])
    return len(graphed.top_token_ids[0]) >= k and [ids[:k] for ids in graphed.top_token_ids] == eager.top_token_ids


def eager_capture(run):
    """Stands in for a CUDA graph on CPU: a replay runs the ops again and writes the captured outputs."""
    out = run()

    def replay():
        for captured, new in zip(out._tensors(), run()._tensors()):
            if captured is not None:
                captured.copy_(new)
    return replay, out


def test_replays_on_cpu_read_each_batchs_parameters_through_the_static_buffer():
    from ropeway.engine.sampler_graphs import SamplerGraphs

    vocab, bucket = 4096, 8
    static = torch.randn(bucket, vocab, generator=torch.Generator().manual_seed(3)) * 4
    graphs = SamplerGraphs(SimpleNamespace(last_logits=static), capture=eager_capture)
    for step, settings in enumerate([MIXED, MIXED[::-1], [{"temperature": 0.9, "top_k": 3}]]):
        for rows in (bucket, 5):
            batch = rows_of(settings, rows, seed=10 * step, step=step)
            eager = sample(static[:rows].clone(), batch).read()
            graphed = sample(static[:rows], batch, graphs=graphs).read()
            assert graphed.token_ids == eager.token_ids and same_top_tokens(graphed, eager)
    # One graph per shape: the mixed batches share one (their rows' values change), top-k has its own.
    assert graphs.replays == 6 and len(graphs.graphs) == 2
    assert sample(static[1:], rows_of(MIXED, bucket - 1, 0, 0), graphs=graphs) is not None
    assert graphs.replays == 6  # rows of the logits that do not start the bucket: eager


def test_common_shapes_are_captured_for_every_decode_bucket_ahead_of_use():
    from ropeway.engine.sampler_graphs import SamplerGraphs

    logits = {bucket: torch.randn(bucket, 1024) for bucket in (4, 8)}
    captured = {(4, False): (None, logits[4]), (8, False): (None, logits[8]), (8, True): (None, torch.randn(8, 1024))}
    decode_graphs = SimpleNamespace(last_logits=None, graphs=captured)
    graphs = SamplerGraphs(decode_graphs, capture=eager_capture)
    # Temperature alone, and with top-p, each with logprobs and without, for both buckets.
    assert graphs.capture_common() == 8 and graphs.capture_common() == 0
    decode_graphs.last_logits = logits[8]
    chat_mix = [{"temperature": 0.8, "top_p": 0.95}, {"temperature": 0.8, "top_p": 0.95, "logprobs": 5}]
    for settings in ([{"temperature": 0.7}], [{"temperature": 1.3, "top_p": 0.8}], chat_mix,
                     [{"temperature": 0.7, "logprobs": 2}]):
        batch = rows_of(settings, 6, seed=1, step=2)
        graphed, eager = sample(logits[8][:6], batch, graphs=graphs).read(), sample(logits[8][:6].clone(), batch).read()
        assert graphed.token_ids == eager.token_ids and same_top_tokens(graphed, eager)
    assert graphs.replays == 4 and len(graphs.graphs) == 8  # every replayed graph captured ahead


@gpu
@pytest.mark.parametrize("rows", [64, 50])  # a whole bucket, and a batch padded up to one
def test_graph_replays_draw_the_eager_tokens(rows):
    from ropeway.engine.sampler_graphs import SamplerGraphs

    bucket = 64
    static = torch.randn(bucket, VOCAB, device="cuda", generator=torch.Generator("cuda").manual_seed(rows)) * 4
    decode_graphs = SimpleNamespace(last_logits=static)  # what a decode graph's replay leaves
    graphs = SamplerGraphs(decode_graphs)
    state = PenaltyState(VOCAB, torch.device("cuda"))
    for step, settings in enumerate([MIXED, MIXED[::-1], MIXED]):  # the same shape, new values each time
        batch = rows_of(settings, rows, seed=100 * step, step=step)
        eager = sample(static[:rows].clone(), batch, state).read()
        torch.cuda.synchronize()
        if step:  # captured on first use; replays never wait for the GPU
            torch.cuda.set_sync_debug_mode("error")
        try:
            graphed = sample(static[:rows], batch, state, graphs=graphs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        graphed = graphed.read()
        assert graphed.token_ids == eager.token_ids
        assert same_top_tokens(graphed, eager)
        assert graphed.logprobs == pytest.approx(eager.logprobs, abs=1e-6)
    assert graphs.replays == 3 and len(graphs.graphs) == 1


@gpu
def test_other_logits_and_processed_rows_sample_eagerly():
    from ropeway.engine.sampler_graphs import SamplerGraphs

    static = torch.randn(8, VOCAB, device="cuda")
    graphs = SamplerGraphs(SimpleNamespace(last_logits=static))
    state = PenaltyState(VOCAB, torch.device("cuda"))
    sample(static.clone(), rows_of(MIXED, 8, 0, 0), state, graphs=graphs).read()  # not the decode graph's logits
    penalised = rows_of([{"temperature": 0.7, "logit_bias": {5: 2.0}}], 8, 0, 0)
    assert sample(static, penalised, state, graphs=graphs).read().token_ids  # logit_bias: host-built ops
    assert graphs.replays == 0 and not graphs.graphs


@gpu
def test_engine_with_sampler_graphs_samples_the_same_tokens(make_llm):
    """Through the engine: decode steps of sampled, mixed and logprob requests replay the sampler's
    graphs and stream the same seeded tokens as the eager sampler."""
    prompts = ["My favourite animal is the", "The capital of France", "Once upon a time", "1, 2, 3,"] * 4
    params = [SamplingParams(seed=i, max_tokens=12, ignore_eos=True, **MIXED[i % len(MIXED)])
              for i in range(len(prompts))]
    outputs = {}
    for graphed in (False, True):
        llm = make_llm(sampler_cuda_graphs=graphed, max_num_seqs=16)
        results = llm.generate(prompts, params)
        outputs[graphed] = [(o.outputs[0].token_ids, [[t for t, _, _ in lp.top] for lp in o.outputs[0].logprobs or []])
                            for o in results]
        if graphed:
            assert llm.engine.core.sampler_graphs.replays > 0
    assert outputs[True] == outputs[False]
