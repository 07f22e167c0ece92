"""The fused ops as torch custom ops: opcheck, and torch.compile(fullgraph=True) of a module."""
from __future__ import annotations

import pytest
import torch

from conftest import backend_device
from vqvae_fast import VectorQuantizer, quantize
from vqvae_fast.functional import _fused_op

FUSED_BACKENDS = ("cpu", "triton", "cuda")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_opcheck(backend):
    device = backend_device(backend)
    fwd = _fused_op(backend)
    bwd = torch.ops.vqvae_fast.triton_quantize_bwd if backend == "triton" else torch.ops.vqvae_fast.quantize_bwd
    z = torch.randn(19, 5, device=device, requires_grad=True)
    codebook = torch.randn(7, 5, device=device, requires_grad=True)
    torch.library.opcheck(fwd, (z, codebook, 0.25))
    indices = fwd(z, codebook, 0.25)[1]
    torch.library.opcheck(bwd, (torch.randn(19, 5, device=device), torch.tensor(1.5, device=device),
                                z.detach(), codebook.detach(), indices, 0.25))


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
