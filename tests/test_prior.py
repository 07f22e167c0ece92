"""The code prior: sequence layout, cached sampling against the full forward, likelihoods, learning."""
from __future__ import annotations

import math

import pytest
import torch

from vqvae_fast.models.prior import CodePrior, bits_per_code, unigram_bits_per_code

LEVELS = {"flat": ([(4, 4)], [12]), "two-level": ([(2, 2), (4, 4)], [5, 12])}


def small_prior(levels: str, **kwargs) -> CodePrior:
    shapes, codes = LEVELS[levels]
    return CodePrior(shapes, codes, num_classes=3, dim=32, depth=2, heads=4, dropout=0.0, **kwargs)


def random_codes(prior: CodePrior, n: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randint(0, k, (n, h, w)) for (h, w), k in
                 zip(prior.config["level_shapes"], prior.config["level_codes"]))


@pytest.mark.parametrize("levels", LEVELS)
def test_flatten_round_trip_and_level_masks(levels):
    prior = small_prior(levels)
    codes = random_codes(prior, 5)
    tokens = prior.flatten(codes)
    assert tokens.shape == (5, prior.length)
    assert all(torch.equal(a, b) for a, b in zip(prior.unflatten(tokens), codes))
    logits = prior(tokens, torch.tensor([0, 1, 2, 0, 1]))
    assert logits.shape == (5, prior.length, prior.vocab)
    # Each position may only predict codes of its own level.
    assert bool(torch.isfinite(logits).eq(prior.allowed).all())
    with pytest.raises(ValueError, match="positions"):
        prior.flatten((codes[0][:, :1],))


@pytest.mark.parametrize("levels", LEVELS)
def test_cached_sampling_follows_the_full_forward(levels):
    """Greedy sampling (top_k=1) with cached keys and values picks, at every position, the argmax
    of the full (uncached) forward given the same prefix: the cache changes nothing."""
    torch.manual_seed(0)
    prior = small_prior(levels).eval()
    for p in prior.parameters():  # a random, decisive model: no near-ties between logits
        p.data.normal_(0, 0.5)
    labels = torch.tensor([0, 1, 2, 2])
    codes = prior.sample(labels, top_k=1)
    tokens = prior.flatten(codes)
    assert torch.equal(prior(tokens, labels).argmax(-1), tokens)
    for grid, (h, w), k in zip(codes, prior.config["level_shapes"], prior.config["level_codes"]):
        assert grid.shape == (4, h, w) and int(grid.min()) >= 0 and int(grid.max()) < k


def test_sampling_is_deterministic_given_the_generator():
    prior = small_prior("two-level")
    labels = torch.tensor([0, 1, 2] * 4)
    draw = [prior.sample(labels, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert all(torch.equal(a, b) for a, b in zip(draw[0], draw[1]))
    assert not all(torch.equal(a, b) for a, b in zip(draw[0], draw[2]))
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(labels, temperature=0.0)


def test_bits_per_code_is_the_mean_negative_log2_likelihood():
    prior = small_prior("two-level").eval()
    codes, labels = random_codes(prior, 7), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    with torch.no_grad():
        logits = prior(prior.flatten(codes), labels).double()
    log_p = torch.log_softmax(logits, -1).gather(-1, prior.flatten(codes)[..., None])[..., 0]
    result = bits_per_code(prior, codes, labels, batch_size=3)
    assert result["bits_per_code"] == pytest.approx(float(-log_p.mean() / math.log(2)), rel=1e-6)
    assert result["level0_bits_per_code"] == pytest.approx(float(-log_p[:, :4].mean() / math.log(2)), rel=1e-6)


def test_unigram_baseline():
    train = (torch.tensor([[[0, 0], [0, 1]]]),)  # frequencies 3/4, 1/4 of 2 codes
    test = (torch.tensor([[[0, 1], [1, 1]]]),)
    result = unigram_bits_per_code(train, test, [2])
    smoothed = torch.tensor([4 / 6, 2 / 6])  # add-one
    expected = -(torch.log2(smoothed[0]) + 3 * torch.log2(smoothed[1])) / 4
    assert result["unigram_bits_per_code"] == pytest.approx(float(expected))
    assert result["unigram_entropy_bits"] == pytest.approx(-(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25)))


def test_the_prior_learns_class_dependent_codes():
    """Codes that a class determines (up to noise) are learned far below the unigram baseline."""
    torch.manual_seed(0)
    prior = small_prior("flat")
    labels = torch.randint(0, 3, (256,))
    grids = (labels[:, None, None] * 4 + torch.randint(0, 2, (256, 4, 4))).clamp(max=11)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    for step in range(150):
        rows = torch.randint(0, 256, (64,))
        loss = prior.nll(prior.flatten((grids[rows],)), labels[rows]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    learned = bits_per_code(prior, (grids,), labels)["bits_per_code"]
    baseline = unigram_bits_per_code((grids,), (grids,), [12])["unigram_bits_per_code"]
    assert learned < 1.3 and baseline > 2.5, (learned, baseline)  # 1 bit of noise per code is the floor


def test_guided_sampling_follows_the_guided_full_forward():
    """With guidance g, greedy sampling picks argmax of u + g (c - u) from the full forward with
    the class (c) and with "no class" (u), position by position."""
    torch.manual_seed(1)
    prior = small_prior("two-level").eval()
    for p in prior.parameters():
        p.data.normal_(0, 0.5)
    labels = torch.tensor([0, 2, 1])
    codes = prior.sample(labels, top_k=1, guidance=2.5)
    tokens = prior.flatten(codes)
    conditional = prior(tokens, labels)
    unconditional = prior(tokens, torch.full_like(labels, prior.num_classes))
    guided = unconditional + 2.5 * (conditional - unconditional)
    guided = guided.masked_fill(~prior.allowed, float("-inf"))
    assert torch.equal(guided.argmax(-1), tokens)


def test_label_dropout_uses_the_no_class_label():
    prior = small_prior("flat")
    torch.manual_seed(0)
    dropped = prior.drop_labels(torch.zeros(1000, dtype=torch.long), 0.25)
    share = float((dropped == prior.num_classes).double().mean())
    assert 0.2 < share < 0.3 and set(dropped.tolist()) == {0, prior.num_classes}
    assert torch.equal(prior.drop_labels(torch.ones(5, dtype=torch.long), 0.0), torch.ones(5, dtype=torch.long))
