"""The batched sampler against plain-torch definitions of each setting."""

import math

import pytest
import torch

from ropeway.engine.random_stream import uniform_noise
from ropeway.engine.sampler import SamplingRow, apply_penalties, filter_logits, sample
from ropeway.sampling_params import InvalidParameter, SamplingParams


def row(seed=0, prompt=(), output=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), seed, list(prompt), list(prompt) + list(output))


def random_logits(rows=4, vocab=50, seed=0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_degenerate_filters_pick_the_argmax():
    logits = random_logits()
    expected = logits.argmax(-1).tolist()
    for params in ({"temperature": 0}, {"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}):
        rows = [row(seed=i, **params) for i in range(4)]
        assert sample(logits, rows).token_ids == expected, params


def test_seeded_draws_are_reproducible_and_independent_of_the_batch():
    logits = random_logits(rows=3)
    rows = [row(seed=11, temperature=1.0), row(seed=12, temperature=0.7), row(seed=13, temperature=1.3)]
    batch = sample(logits, rows).token_ids
    alone = [sample(logits[i : i + 1], [rows[i]]).token_ids[0] for i in range(3)]
    assert batch == alone
    assert sample(logits.flip(0), rows[::-1]).token_ids == batch[::-1]


def test_draws_follow_the_softmax_distribution():
    vocab, draws = 8, 4000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -2.0, 0.2, 1.5]]).expand(draws, vocab).contiguous()
    rows = [row(seed=s, temperature=0.8) for s in range(draws)]
    counts = torch.bincount(torch.tensor(sample(logits, rows).token_ids), minlength=vocab).float()
    expected = (logits[0] / 0.8).softmax(-1) * draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 30, (counts, expected)  # 7 degrees of freedom: p < 1e-4 would be ~29.9


def test_uniform_noise_is_uniform_and_depends_on_every_input():
    seeds = torch.tensor([1, 2**40 + 1, 1], dtype=torch.int64)
    steps = torch.tensor([0, 0, 1], dtype=torch.int64)
    u = uniform_noise(seeds, steps, 20000)
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])


def test_top_k_top_p_min_p_mask_what_they_should():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    kept = lambda **p: torch.isfinite(filter_logits(logits.clone(), [row(**p)]))[0].tolist()
    assert kept(top_k=2) == [True, True, False, False, False]
    assert kept(top_p=0.7) == [True, True, False, False, False]
    assert kept(top_p=0.71) == [True, True, True, False, False]
    assert kept(min_p=0.3) == [True, True, True, False, False]  # 0.15 >= 0.3 * 0.4
    assert kept(top_k=3, top_p=0.5) == [True, True, False, False, False]


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_penalties(logits.clone(), [row(prompt=[0], output=[1, 1, 3], repetition_penalty=2.0,
                                               frequency_penalty=0.5, presence_penalty=0.25)])
    expected = torch.tensor([[2.0 / 2, -1.0 * 2 - 0.5 * 2 - 0.25, 0.5, 3.0 / 2 - 0.5 - 0.25]])
    assert torch.allclose(out, expected)


def test_logprobs_are_the_model_distribution():
    logits = random_logits(rows=2)
    result = sample(logits, [row(temperature=0, logprobs=3), row(seed=5, temperature=1.0, logprobs=0)])
    reference = logits.log_softmax(-1)
    for i, token in enumerate(result.token_ids):
        assert math.isclose(result.logprobs[i], reference[i, token].item(), rel_tol=1e-5, abs_tol=1e-6)
    assert result.top_token_ids[0] == reference[0].topk(3).indices.tolist()


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"n": 0},
                                 {"max_tokens": 0}, {"logprobs": 21}, {"presence_penalty": 3}])
def test_bad_parameters_name_the_field(bad):
    with pytest.raises(InvalidParameter) as error:
        SamplingParams(**bad)
    assert error.value.param == next(iter(bad))
