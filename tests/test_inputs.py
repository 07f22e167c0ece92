"""Bad input: a clear exception naming the problem, never a crash or a wrong answer."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, backend_device
from vqvae_fast import InputError, VectorQuantizer, nearest_code, quantize


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "z_shape, codebook_shape, match",
    [((4, 3), (5, 4), "D mismatch"), ((4, 3, 1), (5, 3), "2-D"), ((4,), (5, 3), "2-D"),
     ((4, 3), (3,), "2-D"), ((4, 3), (0, 3), "empty")],
)
def test_bad_shapes(backend, z_shape, codebook_shape, match):
    device = backend_device(backend)
    with pytest.raises(InputError, match=match):
        quantize(torch.randn(z_shape, device=device), torch.randn(codebook_shape, device=device), backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bad_dtypes(backend):
    device = backend_device(backend)
    z, codebook = torch.randn(4, 3, device=device), torch.randn(5, 3, device=device)
    with pytest.raises(InputError, match="dtype mismatch"):
        nearest_code(z, codebook.double(), backend=backend)
    with pytest.raises(InputError, match="int64"):
        nearest_code(z.long(), codebook.long(), backend=backend)


def test_device_mismatch():
    with pytest.raises(InputError, match="device mismatch"):
        nearest_code(torch.randn(4, 3), torch.randn(5, 3, device="meta"))


def test_backend_for_the_wrong_device():
    with pytest.raises(InputError, match="CPU tensors"):
        nearest_code(torch.randn(4, 3, device="meta"), torch.randn(5, 3, device="meta"), backend="cpu")


@pytest.mark.parametrize("fn", (nearest_code, quantize))
def test_the_retired_cuda_backend_says_what_to_use(fn):
    with pytest.raises(ValueError, match="removed.*'triton'"):
        fn(torch.randn(4, 3), torch.randn(5, 3), backend="cuda")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        quantize(torch.randn(4, 3), torch.randn(5, 3), backend="faiss")


def test_not_a_tensor():
    with pytest.raises(InputError, match="torch.Tensor"):
        nearest_code([[0.0, 1.0]], torch.randn(5, 2))


def test_input_error_is_caught_by_the_usual_clauses():
    for cls in (ValueError, TypeError, RuntimeError):
        with pytest.raises(cls):
            quantize(torch.randn(4, 3), torch.randn(5, 4))


def test_vector_quantizer_rejects_the_wrong_channel_count():
    vq = VectorQuantizer(16, 8)
    with pytest.raises(InputError, match="dim=8"):
        vq(torch.randn(2, 7, 4, 4))
    with pytest.raises(ValueError):
        VectorQuantizer(0, 8)
