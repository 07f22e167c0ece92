"""Forward: every backend picks the nearest code (within its dtype's rounding) on awkward inputs."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, assert_nearest, backend_device, distance_rtol
from vqvae_fast import nearest_code, quantize
from vqvae_fast.reference import exact_sq_distances

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# (N, K, D): none a multiple of any block size, plus K=1, D=1, N=1, N=0, D=0, wide D.
# Shaped like the GPU plans at the interpreter's toy sizes: K >= 300 with few rows splits the
# codebook across programs, with many rows it does not; D = 520 takes the split-D path.
SHAPES = ((37, 19, 5), (100, 130, 37), (7, 1, 4), (33, 17, 1), (1, 50, 3), (0, 5, 3), (4, 3, 0), (21, 40, 200),
          (40, 333, 24), (150, 301, 7), (9, 45, 520))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_quantize_matches_reference(backend, dtype, shape):
    device = backend_device(backend)
    n, k, d = shape
    z = torch.randn(n, d, device=device).to(dtype)
    codebook = torch.randn(k, d, device=device).to(dtype)
    quantized, indices, loss = quantize(z, codebook, beta=0.3, backend=backend)
    assert_nearest(z, codebook, indices, distance_rtol(backend, dtype))
    assert quantized.dtype == dtype and quantized.shape == (n, d)
    assert torch.equal(quantized, codebook[indices]), "quantized must be codebook[indices] bit for bit"
    assert loss.shape == () and loss.dtype == dtype
    if n == 0 or d == 0:
        assert torch.isnan(loss)
        return
    expected = 1.3 * ((z.double() - codebook[indices].double()) ** 2).mean()
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    if backend == "reference" and dtype in (torch.bfloat16, torch.float16):
        tol = 3e-2  # plain PyTorch in 16-bit: a rounding per op (difference, square, mean, scale), not one
    assert abs(loss.double().item() - expected.item()) <= tol * expected.item()
    assert torch.equal(nearest_code(z, codebook, backend=backend), indices)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_input(backend, layout):
    device = backend_device(backend)
    if layout == "transposed":
        z, codebook = torch.randn(12, 45, device=device).T, torch.randn(12, 29, device=device).T
    else:
        z, codebook = torch.randn(45, 24, device=device)[:, ::2], torch.randn(29, 36, device=device)[:, 1::3]
    assert not z.is_contiguous() and not codebook.is_contiguous()
    quantized, indices, _ = quantize(z, codebook, backend=backend)
    assert_nearest(z, codebook, indices, distance_rtol(backend, z.dtype))
    assert torch.equal(quantized, codebook[indices])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spread", (1.0, 30.0), ids=("tight", "wide"))
def test_large_common_offset(backend, dtype, spread):
    """||z||^2 - 2 z.e + ||e||^2 cancels catastrophically when everything sits far from 0.

    In 16 bits the values near 1000 are multiples of 4 or 8: "tight" data collapses onto a few
    points (exact ties everywhere), "wide" data puts z rows far from the codebook, where z - c
    is not exact in 16 bits (the GPU kernels' re-scoring pass).
    """
    device = backend_device(backend)
    z = (spread * torch.randn(150, 16, dtype=torch.float64) + 1000).to(dtype).to(device)
    codebook = (3 * torch.randn(300, 16, dtype=torch.float64) + 1000).to(dtype).to(device)
    indices = nearest_code(z, codebook, backend=backend)
    assert_nearest(z, codebook, indices, distance_rtol(backend, dtype))
    assert torch.equal(quantize(z, codebook, backend=backend).indices, indices)


def test_naive_cdist_fails_the_offset_check():
    """The offset check can fail: the naive formulation picks wrong codes there."""
    z = torch.randn(150, 16, dtype=torch.float64).float() + 1000
    codebook = torch.randn(70, 16, dtype=torch.float64).float() + 1000
    with pytest.raises(AssertionError):
        assert_nearest(z, codebook, torch.cdist(z, codebook).argmin(1), distance_rtol("triton", torch.float32))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("n", (40, 300), ids=("split-codebook", "one-split"))
def test_ties_across_tiles_and_splits(backend, n):
    """Duplicates 150 and 300 codes apart (other GPU tiles, other codebook splits): the
    lowest index wins; near-duplicates 1e-4 apart at the same distances are told apart."""
    device = backend_device(backend)
    base = torch.randn(100, 12, dtype=torch.float64)
    near = base + 1e-4 * torch.randn_like(base)
    codebook = torch.cat([base, torch.randn(50, 12, dtype=torch.float64), base, near])  # K = 350
    pick = torch.randint(0, 100, (n,))
    z = base[pick] + 0.05 * torch.randn(n, 12, dtype=torch.float64)
    z, codebook = z.float().to(device), codebook.float().to(device)
    indices = nearest_code(z, codebook, backend=backend)
    assert_nearest(z, codebook, indices, distance_rtol(backend, torch.float32))
    exact_copy = (indices >= 150) & (indices < 250)
    assert not bool(exact_copy.any()), "an exact duplicate further down the codebook won a tie"
    assert torch.equal(quantize(z, codebook, backend=backend).indices, indices)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_exact_ties_choose_the_lowest_index(backend):
    device = backend_device(backend)
    half = torch.randn(20, 6, device=device)
    codebook = torch.cat([half, half])  # every code twice, across tile boundaries
    z = torch.randn(90, 6, device=device)
    indices = nearest_code(z, codebook, backend=backend)
    assert bool((indices < 20).all()), "an exact tie must go to the lowest index"
    assert_nearest(z, codebook, indices, distance_rtol(backend, z.dtype))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_near_duplicate_codes(backend):
    """Codes 1e-4 apart: the scores must not be clamped or rounded into ties."""
    device = backend_device(backend)
    base = torch.randn(30, 8, dtype=torch.float64)
    codebook = torch.cat([base, base + 1e-4 * torch.randn_like(base)]).float().to(device)
    z = (base[torch.randint(0, 30, (80,))] + 1e-3 * torch.randn(80, 8, dtype=torch.float64)).float().to(device)
    indices = nearest_code(z, codebook, backend=backend)
    assert_nearest(z, codebook, indices, distance_rtol(backend, torch.float32))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_finite_rows_give_indices_in_range(backend):
    device = backend_device(backend)
    z = torch.randn(40, 5, device=device)
    z[3, 1], z[7, :] = float("nan"), float("nan")
    z[11, 0], z[12, 2] = float("inf"), -float("inf")
    codebook = torch.randn(23, 5, device=device)
    quantized, indices, _ = quantize(z, codebook, backend=backend)
    assert bool(((indices >= 0) & (indices < 23)).all())
    assert torch.equal(quantized, codebook[indices])
    finite = torch.isfinite(z).all(1)
    assert_nearest(z[finite], codebook, indices[finite], distance_rtol(backend, z.dtype))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_codes_are_never_chosen(backend, dtype):
    """A NaN/Inf code is never chosen and changes no other row's choice (not even through
    the centre the kernels score around); a non-finite row of z still gets a real index."""
    device = backend_device(backend)
    clean = (torch.randn(330, 10, dtype=torch.float64) + 500).to(dtype)
    z = (torch.randn(60, 10, dtype=torch.float64) + 500).to(dtype)
    codebook = clean.clone()
    bad = torch.tensor([0, 7, 140, 329])
    codebook[0, 3], codebook[7, :], codebook[140, 0], codebook[329, 9] = (
        float("nan"), float("nan"), float("inf"), -float("inf"))
    z[5, 2] = float("nan")
    z, codebook = z.to(device), codebook.to(device)
    indices = nearest_code(z, codebook, backend=backend).cpu()
    assert bool(((indices >= 0) & (indices < 330)).all())
    finite_rows = torch.isfinite(z.cpu()).all(1)
    assert not bool(torch.isin(indices[finite_rows], bad).any()), "a non-finite code was chosen"
    good = torch.ones(330, dtype=torch.bool)
    good[bad] = False
    remap = good.nonzero()[:, 0]  # index among the finite codes -> index in the codebook
    expected = remap[nearest_code(z.cpu()[finite_rows].double(), clean[good].double(), backend="reference")]
    chosen = indices[finite_rows]
    d = exact_sq_distances(z.cpu()[finite_rows], codebook.cpu())
    excess = d.gather(1, chosen[:, None]) - d.gather(1, expected[:, None])
    scale = d.gather(1, expected[:, None]).abs() + 1.0
    assert bool((excess <= distance_rtol(backend, dtype) * 1e3 * scale).all())
    assert torch.equal(quantize(z, codebook, backend=backend).indices.cpu(), indices)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_code_non_finite_still_gives_indices_in_range(backend):
    device = backend_device(backend)
    codebook = torch.full((40, 4), float("nan"), device=device)
    codebook[::3, 1] = float("inf")
    indices = nearest_code(torch.randn(25, 4, device=device), codebook, backend=backend)
    assert bool(((indices >= 0) & (indices < 40)).all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_indices_match_reference_on_separated_data(backend):
    """Away from near-ties every backend returns exactly the float64 argmin."""
    device = backend_device(backend)
    codebook = torch.randn(60, 12, device=device) * 3
    z = codebook[torch.randint(0, 60, (120,), device=device)] + 0.01 * torch.randn(120, 12, device=device)
    expected = exact_sq_distances(z, codebook).argmin(1)
    assert torch.equal(nearest_code(z, codebook, backend=backend).cpu(), expected.cpu())
