"""Shared test helpers: which backends can run here, on which device, and the nearest-code check."""
from __future__ import annotations

import math
import os
import pickle
import random
import zlib
from pathlib import Path

import pytest
import torch

import vqvae_fast
from vqvae_fast import _extension
from vqvae_fast.ops import triton_available, triton_interpreting
from vqvae_fast.reference import exact_sq_distances

HAS_CUDA = torch.cuda.is_available()
ALL_BACKENDS = ("reference", "cpu", "triton")


def backend_device(backend: str) -> str:
    """Device the backend's tests run on; pytest.skip when it cannot run on this machine."""
    if backend == "cpu":
        return "cpu"  # never skipped: a missing compiled extension must fail the tests
    if backend == "reference":
        return "cuda" if HAS_CUDA else "cpu"
    if backend == "triton":
        if not triton_available():
            pytest.skip("triton is not installed")
        if HAS_CUDA and not triton_interpreting():
            return "cuda"
        if triton_interpreting():
            return "cpu"
        pytest.skip("Triton needs a GPU, or TRITON_INTERPRET=1 to run on the CPU")
    raise ValueError(backend)


# Largest allowed excess of the chosen code's exact distance over the true minimum,
# relative to ||z - c||^2 + max_k ||e_k - c||^2 (c: the codebook mean), per backend and dtype.
# The C++ CPU kernel and the Triton fp32 search re-check close candidates in float64: exact.
# Triton 16-bit scores are exact 16-bit products summed in fp32 (fp64 for fp64).
def distance_rtol(backend: str, dtype: torch.dtype) -> float:
    if backend in ("reference", "cpu") or dtype in (torch.float32, torch.float64):
        return 1e-12
    return 2e-5


def power_of_two_scaled(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The float64 tensors times one power of two that brings their largest finite magnitude to
    [0.5, 1): exact (short of underflow), so that squared distances of inputs near 1e300 or
    1e-300 neither overflow nor underflow, and which code is nearer does not change."""
    finite = [t[torch.isfinite(t)].abs() for t in tensors if t.numel()]
    top = max((float(f.max()) for f in finite if f.numel()), default=0.0)
    if top == 0.0:
        return tensors
    exponent = math.frexp(top)[1]  # top = m * 2**exponent, 0.5 <= m < 1
    half = exponent // 2  # two normal factors: 2**-exponent alone is subnormal past 2**-1022
    return tuple(t * 2.0 ** -half * 2.0 ** (half - exponent) for t in tensors)


def assert_nearest(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, rtol: float) -> None:
    """The chosen code's exact (float64) distance is the true minimum, within rtol of the scale."""
    n, k = z.shape[0], codebook.shape[0]
    assert indices.dtype == torch.int64 and indices.shape == (n,), (indices.dtype, indices.shape)
    assert indices.device == z.device
    indices = indices.cpu()
    assert bool(((indices >= 0) & (indices < k)).all()), f"index out of range [0, {k}): {indices}"
    if n == 0:
        return
    z64, e64 = power_of_two_scaled(z.detach().cpu().double(), codebook.detach().cpu().double())
    d = exact_sq_distances(z64, e64)
    chosen, best = d.gather(1, indices[:, None])[:, 0], d.min(1).values
    centre = e64.mean(0)
    scale = ((z64 - centre) ** 2).sum(1) + ((e64 - centre) ** 2).sum(1).max()
    gap = chosen - best
    bad = gap > rtol * scale + 1e-300
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {n} rows chose a code farther than the nearest: worst excess "
        f"{float((gap / scale).max()):.3g} of the scale (allowed {rtol:g})")


def away_from_ties(n: int, books: list, cosine: bool = False, margin: float = 1e-3) -> torch.Tensor:
    """(n, D) float64 random rows whose nearest code, at every stage of residual quantization with
    `books` (one book: plain quantization), beats the runner-up by `margin` in squared distance
    (cosine: between unit vectors): gradcheck's finite differences (eps 1e-6) then never cross a
    code boundary, where the loss has no derivative (a near-tie gives a wrong numerical one)."""
    books = [book.detach().cpu().double() for book in books]

    def unit(x):
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    for _ in range(1000):
        z = torch.randn(n, books[0].shape[1], dtype=torch.float64)
        residual, clear = z, True
        for book in books:
            codes = unit(book) if cosine else book
            dist = torch.cdist(unit(residual) if cosine else residual, codes).square()
            two = dist.topk(min(2, book.shape[0]), dim=1, largest=False).values
            clear &= book.shape[0] == 1 or bool((two[:, 1] - two[:, 0] > margin).all())
            residual = residual - codes[dist.argmin(1)]
        if clear:
            return z
    raise AssertionError("no rows away from ties in 1000 draws")


# Fresh random inputs on every run; set VQVAE_FAST_TEST_SEED to replay a failing one.
SEED = int(os.environ.get("VQVAE_FAST_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"vqvae_fast test seed: VQVAE_FAST_TEST_SEED={SEED}"


@pytest.fixture(autouse=True)
def _seed_and_restore_determinism(request):
    torch.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))
    yield
    torch.use_deterministic_algorithms(False)


__all__ = ["ALL_BACKENDS", "HAS_CUDA", "assert_nearest", "away_from_ties", "backend_device", "distance_rtol",
           "vqvae_fast", "_extension"]


def write_cifar_batch(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    with open(path, "wb") as f:
        pickle.dump({b"data": images.reshape(len(images), -1).numpy(), b"labels": labels.tolist()}, f)


@pytest.fixture(scope="session")
def toy_cifar(tmp_path_factory) -> Path:
    """A cifar-10-batches-py folder of 160 + 40 synthetic 32x32 images whose colour is their class."""
    g = torch.Generator().manual_seed(0)
    palette = torch.randint(0, 256, (10, 3, 1, 1), generator=g)
    folder = tmp_path_factory.mktemp("toy") / "cifar-10-batches-py"
    folder.mkdir()
    for name, n in (("data_batch_1", 160), ("test_batch", 40)):
        labels = torch.arange(n) % 10
        noise = torch.randint(-30, 31, (n, 3, 32, 32), generator=g)
        write_cifar_batch(folder / name, (palette[labels] + noise).clamp(0, 255).to(torch.uint8), labels)
    return folder
