"""The fused ops as torch custom ops: opcheck, and torch.compile(fullgraph=True) of a module."""
from __future__ import annotations

import pytest
import torch

from conftest import backend_device
from vqvae_fast import VectorQuantizer, quantize
from vqvae_fast.functional import _op

FUSED_BACKENDS = ("cpu", "triton")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_opcheck(backend):
    device = backend_device(backend)
    z = torch.randn(19, 5, device=device, requires_grad=True)
    codebook = torch.randn(7, 5, device=device, requires_grad=True)
    torch.library.opcheck(_op(backend, "nearest_code"), (z.detach(), codebook.detach()))
    torch.library.opcheck(_op(backend, "quantize_fwd"), (z, codebook, 0.25))
    indices = _op(backend, "nearest_code")(z.detach(), codebook.detach())
    for need_z, need_codebook in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(_op(backend, "quantize_bwd"), (
            torch.randn(19, 5, device=device), torch.tensor(1.5, device=device), z.detach(), codebook.detach(),
            indices, 0.25, need_z, need_codebook))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_backward_skips_the_gradients_nobody_needs(backend):
    """An EMA codebook (no grad) gets no codebook gradient computed: the op returns it empty."""
    device = backend_device(backend)
    z, codebook = torch.randn(23, 6, device=device), torch.randn(9, 6, device=device)
    bwd = _op(backend, "quantize_bwd")
    indices = _op(backend, "nearest_code")(z, codebook)
    args = (torch.randn(23, 6, device=device), torch.tensor(1.0, device=device), z, codebook, indices, 0.25)
    grad_z, grad_codebook = bwd(*args, True, False)
    assert grad_z.shape == z.shape and grad_codebook.numel() == 0
    grad_z, grad_codebook = bwd(*args, False, True)
    assert grad_z.numel() == 0 and grad_codebook.shape == codebook.shape


def test_autograd_asks_only_for_needed_gradients():
    """The registered backward passes ctx.needs_input_grad on, and skips the op when nothing is needed."""
    from types import SimpleNamespace

    from vqvae_fast.ops.registration import _make_backward

    calls = []

    def fake_bwd(grad_q, grad_loss, z, codebook, indices, beta, need_z, need_codebook, rotation):
        calls.append((need_z, need_codebook, rotation))
        return z.new_ones(z.shape if need_z else (0,)), codebook.new_ones(codebook.shape if need_codebook else (0,))

    z, codebook, indices = torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long)
    backward = _make_backward(fake_bwd)
    for needs, rotation in (((True, False, False, False), False), ((False, True, False, False), True),
                            ((True, True, False, False), True), ((False, False, False, False), False)):
        ctx = SimpleNamespace(needs_input_grad=needs, saved_tensors=(z, codebook, indices), beta=0.25,
                              rotation=rotation, normalize=())  # () : an op without `normalize`
        grad_z, grad_codebook, grad_beta, grad_rotation = backward(ctx, torch.ones(4, 3), None, torch.tensor(1.0))
        assert (grad_z is not None) == needs[0] and (grad_codebook is not None) == needs[1]
        assert grad_beta is None and grad_rotation is None
    assert calls == [(True, False, False), (False, True, True), (True, True, True)]


class _TinyAutoencoder(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.encode = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.vq = VectorQuantizer(32, 8, backend=backend)
        self.decode = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        quantized, indices, loss = self.vq(self.encode(x))
        return self.decode(quantized), indices, loss


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    device = backend_device(backend)
    model = _TinyAutoencoder(backend).to(device)
    x = torch.rand(2, 3, 6, 6, device=device)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1])
    torch.testing.assert_close(compiled[2], eager[2])
    compiled[0].sum().add(compiled[2]).backward()
    assert model.vq.codebook.grad is not None and model.encode.weight.grad is not None


def test_compile_functional_with_dynamic_shapes():
    model = torch.compile(lambda z, e: quantize(z, e, backend="cpu"), fullgraph=True, dynamic=True)
    for n in (17, 40):
        z, codebook = torch.randn(n, 4), torch.randn(9, 4)
        assert torch.equal(model(z, codebook).indices, quantize(z, codebook, backend="reference").indices)
