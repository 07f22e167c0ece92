"""The rotation trick (gradient="rotation"): the formula, its guards, and every backend against it."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, backend_device
from vqvae_fast import VectorQuantizer, quantize, reference

GRAD_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _frozen_rotation(z0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """lam R for one row, built as a matrix from the paper's definition (float64)."""
    u, q = z0 / z0.norm(), e / e.norm()
    w = (u + q) / (u + q).norm()
    eye = torch.eye(z0.numel(), dtype=torch.float64)
    return (e.norm() / z0.norm()) * (eye - 2 * torch.outer(w, w) + 2 * torch.outer(q, u))


def test_the_frozen_rotation_takes_z_to_its_code_and_its_gradient_is_ours():
    """lam R maps z onto e exactly and R is orthogonal; the map x -> lam R x passes gradcheck,
    and its autograd vector-Jacobian product is reference.rotation_gradient."""
    z, e = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    g = torch.randn(6, 5, dtype=torch.float64)
    ours = reference.rotation_gradient(g, z, e)
    for i in range(6):
        m = _frozen_rotation(z[i], e[i])
        torch.testing.assert_close(m @ z[i], e[i], rtol=1e-12, atol=1e-12)
        r = m * (z[i].norm() / e[i].norm())
        torch.testing.assert_close(r.T @ r, torch.eye(5, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        x = z[i].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda v, m=m: m @ v, (x,))
        (vjp,) = torch.autograd.grad(m @ x, x, g[i])
        torch.testing.assert_close(ours[i], vjp, rtol=1e-12, atol=1e-12)


def test_rotation_guards():
    """z at the origin (or the code): the straight-through gradient; z pointing exactly away from
    its code: the reflection I - 2 u u^T, scaled; every result finite."""
    e = torch.tensor([[3.0, 4.0, 0.0]] * 4, dtype=torch.float64)
    z = torch.tensor([[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0], [-0.6, -0.8, 0.0], [1.0, 2.0, 2.0]], dtype=torch.float64)
    g = torch.tensor([[1.0, -2.0, 0.5]] * 4, dtype=torch.float64)
    out = reference.rotation_gradient(g, z, e)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:2], g[:2], rtol=0, atol=0)  # lam = inf, 5e9: straight through
    u = z[2] / z[2].norm()
    torch.testing.assert_close(out[2], 5.0 * (g[2] - 2 * u * (u @ g[2])), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[3], _frozen_rotation(z[3], e[3]).T @ g[3], rtol=1e-12, atol=1e-12)


def _grads(z, codebook, grad_quantized, gradient, backend):
    z = z.detach().requires_grad_()
    codebook = codebook.detach().requires_grad_()
    if backend == "reference":
        quantized, indices, loss = reference.quantize(z, codebook, 0.3, gradient)
    else:
        quantized, indices, loss = quantize(z, codebook, beta=0.3, backend=backend, gradient=gradient)
    (quantized * grad_quantized).sum().add(loss * 1.7).backward()
    return quantized, indices, z.grad, codebook.grad


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("shape", ((61, 23, 7), (5, 1, 3), (40, 70, 37), (0, 4, 3)),
                         ids=lambda s: "x".join(map(str, s)))
def test_rotation_gradients_match_reference(backend, dtype, shape):
    """Fused backward (rotation computed per row inside the kernel) against the float64
    reference, with a zero row and an exactly opposite row among the random ones."""
    device = backend_device(backend)
    n, k, d = shape
    codebook = torch.randn(k, d, device=device, dtype=torch.float64)
    z = torch.randn(n, d, device=device, dtype=torch.float64)
    if n >= 5 and k > 1:
        z[0] = 0.0  # the straight-through guard
        codebook[0] *= 0.01  # the code nearest the origin, so nearest to z[1], which points away from it
        z[1] = -0.05 * codebook[0]
    z, codebook = z.to(dtype), codebook.to(dtype)
    grad_quantized = torch.randn(n, d, device=device, dtype=dtype)
    quantized, idx, gz, ge = _grads(z, codebook, grad_quantized, "rotation", backend)
    assert torch.equal(quantized, codebook[idx]), "the forward output stays codebook[indices] bit for bit"
    chosen = codebook[idx].double()
    expected_z = (reference.rotation_gradient(grad_quantized.double(), z.double(), chosen)
                  + 1.7 * 2 * 0.3 / max(z.numel(), 1) * (z.double() - chosen))
    tol = GRAD_TOL[dtype]
    scale = max(float(expected_z.abs().max()) if n else 1.0, 1e-30)
    assert gz.dtype == dtype
    torch.testing.assert_close(gz.double() / scale, expected_z / scale, rtol=tol, atol=tol)
    # The codebook's gradient comes from the loss alone, as with the straight-through estimator:
    # bit for bit on the CPU; on a GPU the per-code sums are atomic adds, whose order (and so
    # the last bit) changes from run to run.
    _, _, _, ge_ste = _grads(z, codebook, grad_quantized, "ste", backend)
    if device == "cpu":
        torch.testing.assert_close(ge, ge_ste, rtol=0, atol=0)
    else:
        ge_scale = max(float(ge_ste.abs().max()) if n else 1.0, 1e-30)
        torch.testing.assert_close(ge.double() / ge_scale, ge_ste.double() / ge_scale, rtol=0, atol=tol)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rotation_differs_from_straight_through(backend):
    """The option reaches the kernel: the two estimators give different grad_z."""
    device = backend_device(backend)
    z, codebook = torch.randn(30, 6, device=device), torch.randn(9, 6, device=device)
    g = torch.randn(30, 6, device=device)
    rot = _grads(z, codebook, g, "rotation", backend)[2]
    ste = _grads(z, codebook, g, "ste", backend)[2]
    assert (rot - ste).abs().max() > 1e-2


def test_unknown_gradient_and_bad_beta_are_refused():
    z, codebook = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="gradient estimator"):
        quantize(z, codebook, gradient="rotate")
    for beta in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            quantize(z, codebook, beta=beta)
    with pytest.raises(ValueError, match="gradient estimator"):
        VectorQuantizer(8, 3, gradient="householder")


def test_vector_quantizer_uses_the_rotation():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, gradient="rotation", ema_decay=None, kmeans_init=False, backend="cpu")
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    quantized, indices, loss = vq(z)
    quantized.sum().backward()
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    chosen = vq.codebook.detach()[indices.reshape(-1)]
    expected = reference.rotation_gradient(torch.ones_like(flat), flat, chosen)
    torch.testing.assert_close(z.grad.permute(0, 2, 3, 1).reshape(-1, 3), expected, rtol=1e-5, atol=1e-6)
