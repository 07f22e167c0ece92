"""Backward: straight-through, commitment and codebook gradients against the reference and gradcheck."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, away_from_ties, backend_device
from vqvae_fast import quantize, reference
from vqvae_fast.ops import triton_interpreting

GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _grads(fn, z, codebook, grad_quantized, loss_weight):
    z = z.detach().requires_grad_()
    codebook = codebook.detach().requires_grad_()
    quantized, indices, loss = fn(z, codebook)
    (quantized * grad_quantized).sum().add(loss * loss_weight).backward()
    return indices, z.grad, codebook.grad


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("deterministic", (False, True), ids=("atomic", "deterministic"))
@pytest.mark.parametrize("shape", ((61, 23, 7), (5, 1, 3), (40, 70, 33)), ids=lambda s: "x".join(map(str, s)))
def test_gradients_match_reference(backend, dtype, deterministic, shape):
    device = backend_device(backend)
    n, k, d = shape
    z = torch.randn(n, d, device=device, dtype=dtype)
    codebook = torch.randn(k, d, device=device, dtype=dtype)
    grad_quantized = torch.randn(n, d, device=device, dtype=dtype)
    torch.use_deterministic_algorithms(deterministic)
    idx, gz, ge = _grads(lambda a, b: quantize(a, b, beta=0.35, backend=backend), z, codebook, grad_quantized, 2.5)
    ref_idx, ref_gz, ref_ge = _grads(lambda a, b: reference.quantize(a, b, 0.35), z, codebook, grad_quantized, 2.5)
    assert torch.equal(idx, ref_idx)
    assert gz.dtype == dtype and ge.dtype == dtype
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(gz, ref_gz, rtol=tol, atol=tol)
    torch.testing.assert_close(ge, ref_ge, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_straight_through_is_exact(backend):
    """With only `quantized` used, grad_z is grad_output bit for bit and the codebook gets none."""
    device = backend_device(backend)
    z = torch.randn(29, 6, device=device, requires_grad=True)
    codebook = torch.randn(11, 6, device=device, requires_grad=True)
    grad_output = torch.randn(29, 6, device=device)
    quantized, _, _ = quantize(z, codebook, backend=backend)
    quantized.backward(grad_output)
    assert torch.equal(z.grad, grad_output)
    assert codebook.grad is None or not bool(codebook.grad.any())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_deterministic_codebook_gradient_is_reproducible(backend):
    device = backend_device(backend)
    z = torch.randn(300, 9, device=device)
    codebook = torch.randn(4, 9, device=device)  # few codes: many rows per code
    torch.use_deterministic_algorithms(True)
    grads = [_grads(lambda a, b: quantize(a, b, backend=backend), z, codebook, torch.zeros_like(z), 1.0)[2]
             for _ in range(3)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradcheck_codebook_and_commitment(backend):
    """gradcheck in float64 of the two differentiable parts of the loss.

    With beta=0 the loss is the codebook loss alone, whose true derivative w.r.t. the
    codebook is what the op returns. loss(beta) - loss(0) is beta * the commitment loss,
    whose true derivative w.r.t. z is what the op returns. (The loss as a whole is not
    gradcheck-able: the stop-gradients make its gradient differ from its derivative.)
    """
    device = backend_device(backend)
    codebook = torch.randn(6, 4, device=device, dtype=torch.float64, requires_grad=True)
    z = away_from_ties(13, [codebook]).to(device).requires_grad_()

    def codebook_loss(e):
        return quantize(z.detach(), e, beta=0.0, backend=backend).loss

    def commitment_loss(x):
        return (quantize(x, codebook.detach(), beta=0.7, backend=backend).loss
                - quantize(x, codebook.detach(), beta=0.0, backend=backend).loss)

    assert torch.autograd.gradcheck(codebook_loss, (codebook,))
    assert torch.autograd.gradcheck(commitment_loss, (z,))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_16bit_gradients_against_float64(backend, dtype):
    """16-bit gradients are as close to the float64 ones as PyTorch's own 16-bit arithmetic gets
    (at most twice its error, the flash-attention rule), on data with no near-ties."""
    device = backend_device(backend)
    codebook64 = torch.randn(310, 20, dtype=torch.float64) * 3  # codes far apart: one nearest code each
    pick = torch.randint(0, 310, (90,))
    z64 = codebook64[pick] + 0.05 * torch.randn(90, 20, dtype=torch.float64)
    z16, codebook16 = z64.to(dtype).to(device), codebook64.to(dtype).to(device)
    grad_quantized = torch.randn(90, 20, dtype=torch.float64).to(dtype).to(device)

    def grads(fn, z, codebook, g):
        return _grads(fn, z, codebook, g, 40.0)

    ours = grads(lambda a, b: quantize(a, b, beta=0.35, backend=backend), z16, codebook16, grad_quantized)
    exact = grads(lambda a, b: reference.quantize(a, b, 0.35), z16.double(), codebook16.double(),
                  grad_quantized.double())
    torch_16 = grads(lambda a, b: reference.quantize(a, b, 0.35), z16, codebook16, grad_quantized)
    assert torch.equal(ours[0].cpu(), exact[0].cpu())
    # Triton's interpreter converts fp32 to bf16 by truncation (GPUs round to nearest): there the
    # bound is one bf16 unit in the last place of each value instead.
    truncating = backend == "triton" and triton_interpreting() and dtype == torch.bfloat16
    for mine, theirs, want, name in ((ours[1], torch_16[1], exact[1], "z"), (ours[2], torch_16[2], exact[2], "codebook")):
        assert mine.dtype == dtype
        error = (mine.double().cpu() - want.cpu()).abs()
        torch_error = float((theirs.double() - want).abs().max())
        scale = float(want.abs().max())
        if truncating:
            assert bool((error <= 2.0**-7 * want.cpu().abs() + 1e-3 * scale).all()), f"grad {name}"
        else:
            assert float(error.max()) <= 2 * torch_error + 1e-3 * scale, (
                f"grad {name}: error {float(error.max()):.3g}, PyTorch's {torch_error:.3g}")


@pytest.mark.parametrize("backend", ("cpu", "triton"))
def test_compiled_backward_matches_eager(backend):
    """torch.compile of forward + backward gives the eager gradients (values, not only shapes)."""
    device = backend_device(backend)
    z = torch.randn(70, 9, device=device)
    codebook = torch.randn(33, 9, device=device)
    grad_quantized = torch.randn(70, 9, device=device)

    def step(z, codebook):
        z = z.detach().requires_grad_()
        codebook = codebook.detach().requires_grad_()
        quantized, indices, loss = quantize(z, codebook, beta=0.3, backend=backend)
        ((quantized * grad_quantized).sum() + 3.0 * loss).backward()
        return indices, z.grad, codebook.grad

    eager = step(z, codebook)
    compiled = torch.compile(step)(z, codebook)
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-6, atol=1e-7)
