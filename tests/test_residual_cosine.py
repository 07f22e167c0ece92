"""Residual quantization with distance="cosine" (DAC's l2-normalised codes): every stage adds the
unit code nearest to its unit residual, the next residual subtracts that unit code. Against a
float64 loop stage by stage on every backend, gradients, the module, and vector-quantize-pytorch's
ResidualVQ(use_cosine_sim=True) given the same codebooks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ALL_BACKENDS, assert_nearest, away_from_ties, backend_device, distance_rtol
from test_cosine_ops import kernel_unit
from vqvae_fast import (InputError, ResidualVectorQuantizer, quantize, residual_decode, residual_nearest_code,
                        residual_quantize)
from vqvae_fast.vector_quantizer import kmeans

SHAPES = ((53, 3, 19, 7), (1, 1, 1, 4), (0, 2, 5, 3), (40, 4, 33, 9))  # N, S, K, D


def unit_rows(backend):
    """The rows as the backend normalises them: inside the kernels (float64 norm) on triton, else
    torch.nn.functional.normalize in torch."""
    return kernel_unit if backend == "triton" else (lambda x: F.normalize(x.detach().cpu(), dim=1, eps=1e-12))


def inputs(n, s, k, d, dtype, device):
    """Rows of very different norms with a zero row; codebooks of any norm (only directions count)."""
    z = torch.randn(n, d, dtype=torch.float64) * torch.rand(n, 1, dtype=torch.float64).mul(6).exp()
    if n > 2:
        z[1] = 0.0
    books = torch.randn(s, k, d, dtype=torch.float64) * torch.rand(s, k, 1, dtype=torch.float64).mul(4).exp()
    return z.to(dtype).to(device), books.to(dtype).to(device)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_stage_adds_the_nearest_unit_code(backend, shape, dtype):
    n, s, k, d = shape
    device = backend_device(backend)
    z, books = inputs(n, s, k, d, dtype, device)
    out = residual_quantize(z, books, beta=0.3, backend=backend, distance="cosine")
    assert out.indices.shape == (n, s) and out.stage_losses.shape == (s,)
    unit = unit_rows(backend)
    acc = torch.promote_types(dtype, torch.float32)
    total, expected = torch.zeros(n, d, dtype=acc), torch.zeros(n, d, dtype=torch.float64)
    for stage in range(s):
        residual = (z.cpu().to(acc) - total).to(dtype)  # as the op forms it
        idx = out.indices[:, stage].cpu()
        unit_codes = unit(books[stage])
        # the nearest unit code to the unit residual: exact but for 16-bit triton (2e-5)
        assert_nearest(unit(residual), unit_codes, idx, distance_rtol(backend, dtype))
        chosen = unit_codes[idx]
        if n:
            mse = (chosen.double() - unit(residual).double()).square().mean()  # the loss is on unit vectors
            torch.testing.assert_close(out.stage_losses[stage].double().cpu(), 1.3 * mse,
                                       rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-7)
        total, expected = total + chosen.to(acc), expected + chosen.double()
    torch.testing.assert_close(out.quantized.double().cpu(), expected,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
    assert torch.equal(residual_nearest_code(z, books, backend=backend, distance="cosine"), out.indices)
    decoded = residual_decode(out.indices, books, distance="cosine")
    if backend == "triton":  # unit codes from a float64 norm: the last bit of each, and of each sum, may differ
        size = 1.0 + float(out.quantized.abs().max()) if n else 1.0
        torch.testing.assert_close(decoded, out.quantized, rtol=0, atol=s * torch.finfo(dtype).eps * size)
    else:
        assert torch.equal(decoded, out.quantized)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_residuals_choose_as_a_zero_row_does(backend):
    """A row that is exactly a stage-0 unit code leaves a zero residual: stage 1 normalises it to
    zero (x / max(|x|, 1e-12)) and picks what the single-stage op picks for a zero row; all finite."""
    device = backend_device(backend)
    books = torch.randn(2, 6, 5, device=device)
    exact = quantize(torch.randn(4, 5, device=device), books[0], backend=backend, distance="cosine").quantized
    z = torch.cat([exact, torch.zeros(1, 5, device=device)])
    out = residual_quantize(z, books, backend=backend, distance="cosine")
    zero_row = [int(quantize(torch.zeros(1, 5, device=device), book, backend=backend, distance="cosine").indices)
                for book in books]
    assert out.indices[4, 0] == zero_row[0]
    assert bool((out.indices[:4, 1] == zero_row[1]).all())
    assert bool(torch.isfinite(out.quantized).all()) and bool(torch.isfinite(out.stage_losses).all())


def reference_loss_and_output(z, books, indices, beta):
    """Plain-PyTorch float64 composition: r_s = z - sg[sum of unit codes], unit residual and unit
    codes compared by each stage's loss, the sum straight through to z."""
    total, loss = torch.zeros_like(z), 0.0
    for s, book in enumerate(books.unbind(0)):
        unit_r, chosen = F.normalize(z - total, dim=1, eps=1e-12), F.normalize(book, dim=1, eps=1e-12)[indices[:, s]]
        loss = loss + F.mse_loss(chosen, unit_r.detach()) + beta * F.mse_loss(unit_r, chosen.detach())
        total = total + chosen.detach()
    return z + (total - z).detach(), loss


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradients_are_straight_through_and_through_the_normalisation(backend):
    device = backend_device(backend)
    z, books = inputs(37, 3, 11, 6, torch.float64, device)
    z.requires_grad_()
    books.requires_grad_()
    weight = torch.randn(37, 6, dtype=torch.float64, device=device)
    out = residual_quantize(z, books, beta=0.4, backend=backend, distance="cosine")
    quantized, loss = reference_loss_and_output(z, books, out.indices, 0.4)
    torch.testing.assert_close(out.loss, loss, rtol=1e-10, atol=1e-12)
    ours = torch.autograd.grad((out.quantized * weight).sum() + 2.0 * out.loss, (z, books))
    expected = torch.autograd.grad((quantized * weight).sum() + 2.0 * loss, (z, books))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    out = residual_quantize(z, books, backend=backend, distance="cosine")
    (grad_z,) = torch.autograd.grad((out.quantized * weight).sum(), (z,))
    torch.testing.assert_close(grad_z, weight)  # the sum's gradient reaches z once, unchanged


def test_gradcheck_on_cpu():
    """float64 gradcheck where the gradient is a true derivative (see test_residual's): the
    commitment terms w.r.t. z, and the codebook terms w.r.t. the last codebook."""
    books = torch.randn(2, 5, 4, dtype=torch.float64)
    first, last = books.unbind(0)  # no zero row: |x| is not differentiable at 0
    z = away_from_ties(9, [first, last], cosine=True)

    def commitment(x):
        return (residual_quantize(x, [first, last], beta=0.7, backend="cpu", distance="cosine").loss
                - residual_quantize(x, [first, last], beta=0.0, backend="cpu", distance="cosine").loss)

    def codebook_terms(e):
        return residual_quantize(z, [first, e], beta=0.0, backend="cpu", distance="cosine").loss

    assert torch.autograd.gradcheck(commitment, (z.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(codebook_terms, (last.clone().requires_grad_(),))


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    z, books = torch.randn(20, 6), torch.randn(3, 8, 6)
    compiled = torch.compile(lambda a, b: residual_quantize(a, b, backend="cpu", distance="cosine"), fullgraph=True)
    for a, b in zip(compiled(z, books), residual_quantize(z, books, backend="cpu", distance="cosine")):
        torch.testing.assert_close(a, b)


def test_unknown_distance_is_named():
    z, books = torch.randn(4, 3), torch.randn(2, 5, 3)
    for call in (lambda: residual_quantize(z, books, distance="dot"),
                 lambda: residual_nearest_code(z, books, distance="dot"),
                 lambda: residual_decode(torch.zeros(4, 2, dtype=torch.long), books, distance="dot"),
                 lambda: ResidualVectorQuantizer(2, 5, 3, distance="dot")):
        with pytest.raises(InputError, match="euclidean.*cosine"):
            call()


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_module_matches_the_functional_op_and_round_trips(backend):
    device = backend_device(backend)
    rvq = ResidualVectorQuantizer(3, 12, 6, beta=0.3, backend=backend, distance="cosine").to(device)
    assert "distance='cosine'" in repr(rvq)
    x = torch.randn(2, 6, 4, 5, device=device, requires_grad=True)  # (B, dim, H, W)
    out = rvq(x)
    flat = x.detach().permute(0, 2, 3, 1).reshape(-1, 6)
    books = torch.stack([c.detach() for c in rvq.codebooks()])
    expected = residual_quantize(flat, books, beta=0.3, backend=backend, distance="cosine")
    assert torch.equal(out.indices.reshape(-1, 3), expected.indices)
    torch.testing.assert_close(out.quantized.detach().permute(0, 2, 3, 1).reshape(-1, 6), expected.quantized)
    torch.testing.assert_close(out.stage_losses, expected.stage_losses)
    out.loss.backward()
    assert x.grad is not None and all(c.grad is not None for c in rvq.codebooks())
    codes = rvq.encode(x)
    assert torch.equal(codes, out.indices)
    torch.testing.assert_close(rvq.decode(codes), out.quantized.detach().permute(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
    assert torch.equal(rvq.encode(x, num_stages=2), codes[..., :2])


def test_kmeans_init_is_spherical_on_each_stages_residuals():
    """Stage s is initialised by spherical k-means of the residuals the stages before it leave
    (unit codes subtracted), seeded from stage 1 on in proportion to the residual's squared norm:
    the same centroids as calling kmeans(spherical=True) in that order."""
    x = torch.randn(300, 4) * 2
    torch.manual_seed(1)
    rvq = ResidualVectorQuantizer(3, 8, 4, kmeans_init=True, channels_last=True, backend="cpu", distance="cosine")
    rvq(x)
    torch.manual_seed(1)
    ResidualVectorQuantizer(3, 8, 4, channels_last=True, distance="cosine")  # the same draws of the init
    total = torch.zeros_like(x)
    for s, book in enumerate(rvq.codebooks()):
        residual = x - total  # as the module forms it
        weights = residual.double().square().sum(1) if s > 0 else None
        centroids = kmeans(residual, 8, 10, "cpu", spherical=True, weights=weights)
        assert torch.equal(book.detach(), centroids)
        torch.testing.assert_close(book.detach().norm(dim=1), torch.ones(8))
        total = total + quantize(x - total, centroids, backend="cpu", distance="cosine").quantized


def test_quantizer_dropout_with_cosine():
    rvq = ResidualVectorQuantizer(4, 8, 3, quantizer_dropout=1.0, channels_last=True, backend="cpu", seed=3,
                                  distance="cosine", ema_decay=0.9, restart_dead=True)
    x = torch.randn(50, 3)
    counts = []
    for _ in range(10):
        before = [c.detach().clone() for c in rvq.codebooks()]  # the EMA moves them after the forward
        out = rvq(x)
        active = int((out.indices[0] >= 0).sum())
        assert bool((out.indices[:, active:] == -1).all()) and bool((out.indices[:, :active] >= 0).all())
        assert bool((out.stage_losses[active:] == 0).all()) and bool((out.stage_losses[:active] > 0).all())
        assert torch.equal(residual_decode(out.indices, before, distance="cosine"), out.quantized)
        counts.append(active)
    assert len(set(counts)) > 1
    torch.testing.assert_close(torch.stack(rvq.codebooks()).norm(dim=-1), torch.ones(4, 8))


# ----------------------------------------------------------------------------- the peer


def test_matches_vector_quantize_pytorch_given_the_same_codebooks():
    """vector-quantize-pytorch's ResidualVQ(use_cosine_sim=True), its codebooks given to ours: the
    same codes (up to near-ties), the same sum of unit codes, and its per-stage commitment loss
    mse(unit code, unit residual) is ours with beta = 1, halved."""
    peer = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    theirs = peer.ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, use_cosine_sim=True).train()
    x = torch.randn(2, 40, 8)
    quantized, indices, losses = theirs(x, freeze_codebook=True)  # training mode for the losses, no EMA
    ours = residual_quantize(x.reshape(-1, 8), theirs.codebooks, beta=1.0, backend="cpu", distance="cosine")
    assert (ours.indices == indices.reshape(-1, 3)).float().mean() > 0.99
    if torch.equal(ours.indices, indices.reshape(-1, 3)):
        torch.testing.assert_close(ours.quantized, quantized.reshape(-1, 8).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.stage_losses / 2, losses.reshape(3).detach(), rtol=1e-4, atol=1e-6)
