"""VectorQuantizer: layouts, statistics and gradients through the module."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import ALL_BACKENDS, backend_device
from vqvae_fast import VectorQuantizer, nearest_code


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_feature_map_and_channel_last_layouts_agree(backend):
    device = backend_device(backend)
    vq = VectorQuantizer(24, 6, beta=0.3, backend=backend).to(device)
    with torch.no_grad():
        vq.codebook.normal_()
    fmap = torch.randn(2, 6, 5, 3, device=device)
    quantized, indices, loss = vq(fmap)
    assert quantized.shape == fmap.shape and indices.shape == (2, 5, 3)
    channel_last = fmap.permute(0, 2, 3, 1)
    vq_last = VectorQuantizer(24, 6, beta=0.3, backend=backend, channels_last=True).to(device)
    vq_last.load_state_dict(vq.state_dict())
    q2, i2, l2 = vq_last(channel_last)
    assert torch.equal(i2, indices)
    assert torch.equal(q2.permute(0, 3, 1, 2), quantized)
    torch.testing.assert_close(l2, loss)
    expected = nearest_code(channel_last.reshape(-1, 6), vq.codebook.detach(), backend="reference")
    assert torch.equal(indices.reshape(-1), expected)


def test_sequence_input_and_statistics():
    vq = VectorQuantizer(8, 4)
    with torch.no_grad():
        vq.codebook.copy_(torch.eye(8, 4) * 10)
    x = torch.zeros(3, 5, 4)
    x[0, :, 0] = 10  # 5 vectors at code 0, 5 at code 1, 5 at code 4 (the zero row nearest 0)
    x[1, :, 1] = 10
    out = vq(x)
    assert out.indices.shape == (3, 5)
    assert int(out.codes_used) == 3
    assert math.isclose(float(out.perplexity), 3.0, rel_tol=1e-5)


def test_gradients_reach_encoder_and_codebook():
    vq = VectorQuantizer(16, 4, beta=0.25)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantized, _, loss = vq(x)
    (quantized.square().sum() + loss).backward()
    assert x.grad is not None and bool(x.grad.any())
    assert vq.codebook.grad is not None and bool(vq.codebook.grad.any())


def test_bf16_input_is_quantized_in_codebook_precision():
    vq = VectorQuantizer(16, 4)
    x = torch.randn(2, 4, 3, 3).bfloat16()
    quantized, indices, _ = vq(x)
    assert quantized.dtype == torch.bfloat16
    expected = nearest_code(x.float().permute(0, 2, 3, 1).reshape(-1, 4), vq.codebook.detach(), backend="reference")
    assert torch.equal(indices.reshape(-1), expected)


def test_weighted_rows_draw_in_proportion_and_never_a_zero_weight():
    from vqvae_fast.vector_quantizer import weighted_rows

    torch.manual_seed(0)
    rows = weighted_rows(torch.tensor([0.0, 1.0, 0.0, 3.0, float("nan")]), 40_000)
    counts = torch.bincount(rows, minlength=5)
    assert counts[0] == counts[2] == counts[4] == 0  # weight 0 (and NaN, taken as 0) never drawn
    assert abs(float(counts[3]) / 40_000 - 0.75) < 0.015, counts
    uniform = torch.bincount(weighted_rows(torch.zeros(4), 40_000), minlength=4)  # all 0: uniform
    assert bool((uniform > 9_000).all()), uniform


def test_kmeans_seeds_by_weight_without_replacement():
    """Every positive-weight row is a seed before any row of weight 0 (0 Lloyd steps: the
    centroids are the seeds); fewer positive rows than seeds: the rest from the others."""
    from vqvae_fast.vector_quantizer import kmeans

    x = torch.randn(40, 3)
    weights = torch.zeros(40)
    weights[[3, 7, 11, 19, 23]] = torch.tensor([1.0, 2.0, 1e-6, 5.0, 1.0])
    seeds = kmeans(x, 5, 0, "cpu", weights=weights)
    assert sorted(map(tuple, seeds.tolist())) == sorted(map(tuple, x[[3, 7, 11, 19, 23]].tolist()))
    more = kmeans(x, 8, 0, "cpu", weights=weights)  # 5 positive rows, then 3 of the others
    assert {tuple(r) for r in x[[3, 7, 11, 19, 23]].tolist()} <= {tuple(r) for r in more.tolist()}
    assert len({tuple(r) for r in more.tolist()}) == 8  # still without replacement


def test_seed_weights_must_match_the_vectors():
    from vqvae_fast import InputError

    vq = VectorQuantizer(8, 3, channels_last=True, kmeans_init=True, backend="cpu")
    with pytest.raises(InputError, match="seed_weights must hold one weight per vector"):
        vq(torch.randn(10, 3), seed_weights=torch.ones(9))
    assert vq(torch.randn(2, 5, 3), seed_weights=torch.ones(2, 5)).indices.shape == (2, 5)
