"""The batched sampler (torch reference, CPU) against float64 definitions of each setting.

Distributions are checked with chi-square tests over many seeded draws of one fixed logit
vector at the default model's vocabulary size; the reference is the filtered distribution
computed in float64 from vLLM's definitions (with a sort: the reference may sort, the
sampler does not).
"""

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from ropeway.engine.random_stream import stream_keys
from ropeway.engine.sampler import SamplingBatch, SamplingRow, apply_penalties, cuts_before_top_p_search, sample
from ropeway.engine.sampling_state import PenaltyState
from ropeway.kernels.sampling import race_keys, token_bits, top_p_cut_reference
from ropeway.request_bounds import MAX_TOP_LOGPROBS
from ropeway.sampling_params import InvalidParameter, SamplingParams

VOCAB = 49152
EOS = 2


def row(seed=0, step=0, penalty_row=-1, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), seed, step, penalty_row)


def tokens(logits, rows, **options) -> list[int]:
    return sample(logits, rows, **options).read().token_ids


def filter_thresholds(scaled: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """[R] the smallest scaled logit each row keeps, every filter applied."""
    row_max = scaled.amax(dim=-1)
    columns = SamplingBatch(rows).draw_columns(scaled.shape[1], scaled.device)
    cut, top_p, search = cuts_before_top_p_search(scaled, row_max, columns)
    return top_p_cut_reference(scaled, cut, top_p, row_max) if search else cut


def llm_like_logits(seed=0) -> torch.Tensor:
    """[VOCAB]: a few dozen likely tokens at scattered ids over a long, low tail."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, generator=generator) - 6.0
    head = torch.randperm(VOCAB, generator=generator)[:40]
    logits[head] = torch.randn(40, generator=generator) * 1.5 + 4.0
    return logits


def reference_distribution(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """float64 probabilities after vLLM's filters: min-p and top-k on the scaled distribution,
    then top-p over what they kept (tokens tied at a cut stay)."""
    scaled = logits.to(torch.float64) / temperature
    probs = scaled.softmax(-1)
    keep = probs >= min_p * probs.max()
    if top_k:
        keep &= scaled >= scaled.topk(top_k).values[-1]
    probs = torch.where(keep, probs, 0.0)
    if top_p < 1.0:
        probs = probs / probs.sum()
        ascending = probs.sort().values
        at_or_below = ascending.cumsum(0)[torch.searchsorted(ascending, probs, right=True) - 1]
        probs = torch.where(1.0 - at_or_below < top_p, probs, 0.0)  # the mass strictly above it
    return probs / probs.sum()


def assert_draws_follow(draws: list[int], expected: torch.Tensor) -> None:
    """No draw outside the support; a chi-square test over the tokens expected at least 5
    times each, the rest of the support pooled."""
    outside = [t for t in draws if expected[t] == 0]
    assert not outside, f"{len(outside)} draws outside the filtered support: {outside[:5]}"
    counts = Counter(draws)
    n = len(draws)
    big = [t for t in range(len(expected)) if expected[t] * n >= 5]
    observed = [counts[t] for t in big]
    predicted = [expected[t].item() * n for t in big]
    rest = n - sum(observed)
    if n - sum(predicted) >= 5:
        observed.append(rest)
        predicted.append(n - sum(predicted))
    else:
        assert rest <= 3
        predicted = [p * sum(observed) / sum(predicted) for p in predicted]
    result = chisquare(observed, predicted)
    assert result.pvalue > 1e-3, (result, observed, predicted)


SETTINGS = [
    {"temperature": 0.7},
    {"temperature": 1.0, "top_k": 20},
    {"temperature": 0.8, "top_p": 0.9},
    {"temperature": 1.0, "min_p": 0.05},
    {"temperature": 1.2, "top_k": 30, "top_p": 0.8},
    {"temperature": 1.3, "min_p": 0.02, "top_p": 0.7},
    {"temperature": 0.9, "top_k": 25, "top_p": 0.95, "min_p": 0.01},
]


@pytest.mark.slow
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_each_setting_draws_its_filtered_distribution(setting):
    # Top-p without top-k searches its cut in 32 passes over the row: fewer draws keep it quick.
    draws = 500 if "top_p" in setting and "top_k" not in setting else 1000
    chunk = 125  # rows at a time: keeps the [rows, vocab] temporaries small
    logits = llm_like_logits()
    drawn = []
    for start in range(0, draws, chunk):
        drawn += tokens(logits.expand(chunk, VOCAB), [row(seed=s, **setting) for s in range(start, start + chunk)])
    assert_draws_follow(drawn, reference_distribution(logits, **setting))


def test_token_streams_are_uniform_and_depend_on_seed_step_and_token():
    seeds = [i * 7919 + (1 << 40) for i in range(200)]
    keys = torch.from_numpy(stream_keys(seeds, [0] * 200))
    tokens = torch.arange(100, dtype=torch.int64)
    bits = token_bits(tokens[None, :], keys[:, :1], keys[:, 1:])  # 200 rows x 100 tokens
    assert ((bits >= 0) & (bits < 1 << 32)).all()
    assert chisquare(torch.histc((bits >> 16).float(), bins=20, min=0, max=1 << 16).tolist()).pvalue > 1e-3
    # Neighbouring tokens of one row and one token across rows are uncorrelated.
    uniform = bits.double() / 2**32 - 0.5
    assert abs((uniform[:, 1:] * uniform[:, :-1]).mean().item()) < 0.01
    assert abs((uniform[1:] * uniform[:-1]).mean().item()) < 0.01
    assert not torch.equal(keys, torch.from_numpy(stream_keys(seeds, [1] * 200)))
    assert not torch.equal(keys, torch.from_numpy(stream_keys([s + 1 for s in seeds], [0] * 200)))


def test_race_with_gumbel_noise_is_the_softmax():
    """The race alone, without filters: each token's share of many streams' winners is its
    softmax probability (the Gumbel-max trick, checked with the counter-based uniforms)."""
    scaled = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, float("-inf"), 1.5]])
    streams = 20000
    keys = torch.from_numpy(stream_keys(list(range(streams)), [3] * streams))
    winners = race_keys(scaled.expand(streams, -1), torch.full((streams,), float("-inf")), keys).argmax(-1)
    assert_draws_follow(winners.tolist(), scaled[0].double().softmax(-1))


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = logits.argmax(-1).tolist()
    for params in ({"temperature": 0}, {"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        assert tokens(logits, [row(seed=i, **params) for i in range(4)]) == expected, params


def test_seeded_draws_are_the_same_whatever_the_batch():
    logits = llm_like_logits(1).expand(6, VOCAB).contiguous()
    logits[3] = llm_like_logits(2)
    rows = [row(seed=11, temperature=1.0), row(seed=12, temperature=0.7, top_p=0.9),
            row(seed=13, temperature=1.3, top_k=5), row(seed=14, min_p=0.1, top_p=0.5),
            row(seed=15, temperature=0), row(seed=16, step=7, logit_bias={5: 3.0}, logprobs=2)]
    batch = tokens(logits, rows)
    alone = [tokens(logits[i : i + 1], [rows[i]])[0] for i in range(len(rows))]
    assert batch == alone
    assert tokens(logits.flip(0), rows[::-1]) == batch[::-1]
    assert tokens(logits[[1, 2]], [rows[1], rows[2]]) == batch[1:3]


def test_ties_at_every_cut_stay_and_one_step_below_goes():
    scaled = torch.full((1, VOCAB), -30.0)
    # top-k 2: the 2nd largest value is held by three tokens; all three stay.
    scaled[0, [10, 20, 30, 40]] = torch.tensor([3.0, 2.0, 2.0, 2.0])
    cut = filter_thresholds(scaled, [row(top_k=2)])
    assert (scaled[0] >= cut).nonzero()[:, 0].tolist() == [10, 20, 30, 40]
    # min-p 0.1: a token exactly at p_max * 0.1 stays, the next fp32 value below goes.
    at_cut = torch.tensor(0.1).log()
    scaled[0, 50], scaled[0, 60] = at_cut + 3.0, torch.nextafter(at_cut + 3.0, torch.tensor(-math.inf))
    cut = filter_thresholds(scaled, [row(min_p=0.1)])
    kept = set((scaled[0] >= cut).nonzero()[:, 0].tolist())
    assert 50 in kept and 60 not in kept
    # top-p 0.5 with p = [4, 1, 1, 1] / 7 (+ tiny rest): the mass above the tied 1/7s is 4/7 >= 0.5,
    # so they all go; at top_p 0.6 it is below, and all three stay.
    tied = torch.full((1, VOCAB), -60.0)
    tied[0, [1, 2, 3, 4]] = torch.tensor([math.log(4.0), 0.0, 0.0, 0.0])

    def kept(top_p):
        return (tied[0] >= filter_thresholds(tied, [row(top_p=top_p)])).nonzero()[:, 0].tolist()

    assert kept(0.5) == [1]
    assert kept(0.6) == [1, 2, 3, 4]
    # The tail of 49148 tokens at e^-60 carries ~1e-22 of the mass: the last sliver of top-p
    # needs them all, anything short of it none.
    assert kept(1.0 - 1e-7) == [1, 2, 3, 4]


def test_thresholds_match_the_reference_on_tied_logits():
    """Integer logits (many ties) under random settings: the kept sets equal the float64 reference's."""
    generator = torch.Generator().manual_seed(3)
    for case in range(40):
        logits = torch.randint(-8, 4, (VOCAB,), generator=generator).float()
        setting = {"temperature": [0.5, 1.0, 1.5][case % 3], "top_k": [0, 3, 100][case % 3 - case % 2],
                   "top_p": [1.0, 0.3, 0.77, 0.9][case % 4], "min_p": [0.0, 0.05][case % 2]}
        scaled = (logits / setting["temperature"])[None]
        kept = scaled[0] >= filter_thresholds(scaled, [row(**setting)])
        assert torch.equal(kept, reference_distribution(logits, **setting) > 0), setting


def test_penalties_equal_a_plain_python_reference():
    generator = torch.Generator().manual_seed(4)
    vocab = 64
    logits = torch.randn(3, vocab, generator=generator) * 3
    histories = [([1, 2, 3, 3], [3, 5, 5, 5, 9]), ([7], []), ([0, 0], [0, 63, 62])]
    settings = [{"repetition_penalty": 1.5, "frequency_penalty": 0.4, "presence_penalty": 0.3},
                {"presence_penalty": -1.0}, {"repetition_penalty": 0.7, "frequency_penalty": -0.5}]
    state = PenaltyState(vocab, torch.device("cpu"), initial_rows=1)  # grows to three rows
    rows = [row(penalty_row=state.row(i, prompt, output), **s)
            for i, ((prompt, output), s) in enumerate(zip(histories, settings))]
    processed = apply_penalties(logits, SamplingBatch(rows), state)
    for i, ((prompt, output), s) in enumerate(zip(histories, settings)):
        counts = Counter(output)
        for token in range(vocab):
            x = logits[i, token].item()
            if token in counts or token in prompt:
                r = s.get("repetition_penalty", 1.0)
                x = x / r if x > 0 else x * r
            x -= s.get("frequency_penalty", 0.0) * counts[token] + s.get("presence_penalty", 0.0) * (token in counts)
            assert math.isclose(processed[i, token].item(), x, rel_tol=1e-6, abs_tol=1e-5), (i, token)


def test_penalty_state_counts_each_step_and_reuses_released_rows():
    state = PenaltyState(16, torch.device("cpu"), initial_rows=2)
    a = state.row(100, [1, 2], [3])
    b = state.row(101, [4], [])
    c = state.row(102, [], [5, 5])  # a third row: the table grows
    state.record([a, -1, c], torch.tensor([3, 9, 6]))
    state.record([c, b], torch.tensor([5, 4]))
    assert state.row(100, [], []) == a  # known sequences keep their row and counts
    counts, seen = state.gather(torch.tensor([a, b, c]))
    assert counts[0].tolist() == [0, 0, 0, 2] + [0] * 12
    assert counts[1].nonzero().flatten().tolist() == [4] and seen[1].nonzero().flatten().tolist() == [4]
    assert counts[2, 5].item() == 3 and counts[2, 6].item() == 1
    state.release(101)
    assert state.row(103, [7], []) == b and state.gather(torch.tensor([b]))[0].sum().item() == 0
    assert len(state) == 3


def test_logit_bias_and_min_tokens():
    logits = torch.zeros(3, 16)
    logits[:, EOS] = 5.0
    rows = [row(temperature=0, logit_bias={7: 100.0}),
            row(temperature=0, min_tokens=2, step=1, stop_token_ids=[3]),
            row(temperature=0, min_tokens=2, step=2)]
    assert tokens(logits, rows, eos_token_ids=(EOS,)) == [7, 0, EOS]
    logits[1, 3] = 9.0  # a stop id is held back too
    assert tokens(logits, rows, eos_token_ids=(EOS,))[1] == 0
    sampled = [row(seed=s, temperature=1.0, logit_bias={EOS: -100.0}) for s in range(200)]
    assert EOS not in tokens(logits[:1].expand(200, 16), sampled)


def test_logprobs_are_the_model_distribution_and_stay_on_the_device_until_read():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0)) * 3
    sampled = sample(logits, [row(temperature=0, logprobs=3), row(seed=5, temperature=1.0, logprobs=0,
                                                                    presence_penalty=1.0)],
                     PenaltyState(50, torch.device("cpu")))
    assert isinstance(sampled.token_ids, torch.Tensor) and sampled.top_logprobs.shape == (2, 3)
    result = sampled.read()
    reference = logits.log_softmax(-1)
    for i, token in enumerate(result.token_ids):
        assert math.isclose(result.logprobs[i], reference[i, token].item(), rel_tol=1e-5, abs_tol=1e-6)
    assert result.top_token_ids[0] == reference[0].topk(3).indices.tolist()


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"n": 0},
                                 {"max_tokens": 0}, {"logprobs": 21}, {"presence_penalty": 3},
                                 {"min_tokens": -1}, {"min_tokens": 5, "max_tokens": 4},
                                 {"logit_bias": {5: 101.0}}, {"logit_bias": {-1: 1.0}},
                                 {"logit_bias": {5: math.nan}}, {"logit_bias": {"5": 1.0}},
                                 {"logit_bias": {i: 1.0 for i in range(301)}}])
def test_bad_parameters_name_the_field(bad):
    with pytest.raises(InvalidParameter) as error:
        SamplingParams(**bad)
    assert error.value.param == next(iter(bad))


def test_draw_columns_hold_each_rows_parameters():
    """The step's per-row draw parameters, built as arrays over the batch, are each row's own."""
    vocab = 100
    rows = [row(seed=1, step=4, temperature=0.8, top_p=0.9),
            row(seed=2, step=0, temperature=1.2, top_k=5, top_p=0.7),
            row(seed=3, step=9, temperature=0.5, top_k=vocab, top_p=0.6),  # a top-k of the whole vocabulary: none
            row(seed=4, step=2, temperature=1.0, min_p=0.1),
            row(seed=2**62 + 5, step=1, temperature=0.9, top_k=3)]
    columns = SamplingBatch(rows).draw_columns(vocab, torch.device("cpu"))
    assert columns.temperature[:, 0].tolist() == pytest.approx([0.8, 1.2, 0.5, 1.0, 0.9])
    assert columns.search_top_p.tolist() == pytest.approx([0.9, 1.0, 0.6, 1.0, 1.0])
    assert columns.has_top_k.tolist() == [False, True, False, False, True] and columns.max_top_k == 5
    assert columns.kth_index[:, 0].tolist() == [0, 4, 0, 0, 2]
    assert columns.top_k_top_p.tolist() == pytest.approx([1.0, 0.7, 1.0, 1.0, 1.0])
    assert columns.min_p.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.0])
    assert columns.no_cut.tolist() == [float("-inf")] * 5
    assert columns.any_search and columns.any_top_k_top_p
    for i, r in enumerate(rows):
        assert columns.stream_keys[i].tolist() == stream_keys([r.seed], [r.step])[0].tolist()
    plain = SamplingBatch([row(seed=1, temperature=0.7)]).draw_columns(vocab, torch.device("cpu"))
    assert plain.has_top_k is None and plain.min_p is None and not plain.any_search


def test_padded_rows_leave_the_real_rows_draws_unchanged():
    """What a sampler CUDA graph computes (sampler_graphs.py): the batch's columns padded to the
    graph's batch size, the device work run on padded logits, the real rows' results kept. They
    equal the eager sampler's, logprobs included, for a mixed batch of greedy and drawn rows."""
    from ropeway.engine.sampler import DrawColumns, sample_on_device

    logits = torch.stack([llm_like_logits(seed) for seed in range(5)])
    rows = [row(seed=21, temperature=0.8, top_p=0.9, logprobs=3), row(seed=22, temperature=0),
            row(seed=23, temperature=1.1, top_k=7, top_p=0.8), row(seed=24, temperature=0.9, min_p=0.05),
            row(seed=25, step=3, temperature=0, logprobs=1)]
    eager = sample(logits, rows).read()
    padded = torch.cat([logits, torch.randn(3, VOCAB)])  # padding rows hold whatever the graph's buffer held
    shape, columns = SamplingBatch(rows).plan(VOCAB, padded_rows=8, for_graph=True)
    assert shape.greedy and shape.drawn and shape.search and shape.min_p and shape.top_k == 8
    # A graph takes the most top logprobs a request may ask for: one graph serves every count.
    assert shape.logprobs == MAX_TOP_LOGPROBS and all(len(column) == 8 for column in columns.values())
    device_columns = DrawColumns.uploaded(shape, columns, padded.device)
    graphed = sample_on_device(padded, padded, device_columns, shape).read()
    assert graphed.token_ids[:5] == eager.token_ids
    assert graphed.logprobs[:5] == eager.logprobs
    assert [ids[:3] for ids in graphed.top_token_ids[:5]] == eager.top_token_ids
    assert eager.token_ids[1] == int(logits[1].argmax()) and eager.token_ids[4] == int(logits[4].argmax())


def test_top_logprobs_from_the_top_logits_match_log_softmax():
    """Logprobs are read off the top logits and the row's log-sum-exp, no [R, V] log_softmax: the
    same tokens and, to fp32 rounding, the same values, for greedy and drawn rows, with -inf logits."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 3000, generator=generator) * 5
    logits[2, 100:2000] = float("-inf")
    rows = [row(temperature=0, logprobs=20), row(seed=1, temperature=0.8, top_p=0.95, logprobs=5),
            row(seed=2, temperature=1.0, logprobs=0), row(seed=3, temperature=0.7, logprobs=20)]
    result = sample(logits, rows).read()
    reference = logits.log_softmax(-1)
    values, ids = reference.topk(20, dim=-1)
    assert result.top_token_ids == ids.tolist()
    torch.testing.assert_close(torch.tensor(result.top_logprobs), values, rtol=0, atol=4e-6)
    chosen = reference.gather(1, torch.tensor(result.token_ids)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(result.logprobs), chosen, rtol=0, atol=4e-6)
    assert result.token_ids[0] == int(logits[0].argmax())
