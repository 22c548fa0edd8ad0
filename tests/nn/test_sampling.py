"""nn.generate's sampling: the distribution against transformers' own logits warpers, the draws
against that distribution, and the seed."""

import pytest
import torch

from zeropoint.nn.generate import Sampler, Sampling, sampling_probabilities


def warped_by_transformers(logits, temperature, top_k, top_p):
    """The oracle: transformers' warpers in generate's order, then softmax."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits.double().unsqueeze(0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores, dim=-1)[0]


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 10, 1.0), (1.0, 0, 0.9), (0.8, 40, 0.5), (2.0, 0, 0.05),
    (1.0, 1, 1.0),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_distribution_matches_transformers_warpers(temperature, top_k, top_p, seed):
    logits = torch.randn(500, generator=torch.Generator().manual_seed(seed)) * 3
    got = sampling_probabilities(logits, Sampling(temperature, top_k, top_p))
    expected = warped_by_transformers(logits, temperature, top_k, top_p)
    assert torch.equal(got > 0, expected > 0)  # the same tokens are cut
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_draws_follow_the_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    sampling = Sampling(temperature=0.9, top_k=5, top_p=0.95, seed=3)
    probs = warped_by_transformers(logits, 0.9, 5, 0.95)
    sampler = Sampler(sampling)
    n = 20000
    counts = torch.bincount(torch.tensor([sampler(logits) for _ in range(n)]), minlength=6)
    expected = probs * n
    assert counts[expected == 0].sum() == 0  # nothing outside the cut is ever drawn
    kept = expected > 0
    chi2 = (((counts[kept] - expected[kept]) ** 2) / expected[kept]).sum().item()
    assert chi2 < 20.5  # chi-square, 3 degrees of freedom: p = 1e-4


def test_seed_repeats_and_greedy_is_argmax():
    logits = torch.randn(10, 300, generator=torch.Generator().manual_seed(5))
    draw = lambda seed: [Sampler(Sampling(1.0, seed=seed))(row) for row in logits]  # noqa: E731
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    greedy = Sampler(Sampling())
    assert [greedy(row) for row in logits] == logits.argmax(dim=1).tolist()
    assert Sampler(Sampling(1.0)).seed is not None  # drawn, so that it can be shown


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": -0.5}, "temperature must be 0 (greedy) or positive"),
    ({"temperature": float("nan")}, "temperature must be"),
    ({"top_k": -1}, "top_k must be 0 (no cut) or positive"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"seed": -1}, "seed must be in"),
])
def test_bad_sampling_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        Sampling(**kwargs)
