"""Inputs at the edges of the floating-point range, near-ties and non-finite values, on every
backend: the index is still the nearest code, the loss is the formula's value (or +inf where
that value does not fit the dtype), gradients stay finite, and nothing is silently wrong."""
from __future__ import annotations

import pytest
import torch

from conftest import ALL_BACKENDS, assert_nearest, backend_device, distance_rtol
from vqvae_fast import nearest_code, quantize
from vqvae_fast.reference import rotation_gradient

# (dtype, scale): from denormal products to squares beyond the dtype's range.
SCALES = [(torch.float32, s) for s in (1e-40, 1e-30, 1e-22, 1e-19, 1e15, 1e18, 1e20, 1e30)]
SCALES += [(torch.bfloat16, s) for s in (1e-30, 1e-22, 1e18, 1e20)]
SCALES += [(torch.float64, s) for s in (1e-300, 1e-160, 1e160, 1e300)]


def _midpoint_rows(codebook: torch.Tensor, n_random: int) -> torch.Tensor:
    """Rows a hair from the midpoints of pairs of codes (closer than any one-pass tensor-core
    score can tell apart, farther than float32 can), and random rows."""
    half = codebook.shape[0] // 2
    a, b = codebook[:half], codebook[half:2 * half]
    mid = (a + b) / 2
    step = (b - a) / (b - a).norm(dim=1, keepdim=True)
    return torch.cat([mid + 1e-5 * step, mid - 1e-4 * step, mid + 3e-3 * step, torch.randn(n_random, a.shape[1])])


def _expected_loss(z, codebook, indices, beta):
    error = z.double().cpu() - codebook.double().cpu()[indices.cpu()]
    return (1 + beta) * (error ** 2).mean()


def _check_loss(loss, expected, dtype):
    """The loss is the true value rounded to the dtype (+inf beyond its range, 0 or a denormal
    below it), within a relative tolerance and one denormal step."""
    rounded = torch.tensor(expected, dtype=torch.float64).to(dtype).double().item()
    if rounded == float("inf"):
        assert loss.item() == float("inf"), f"loss {loss.item()} for a true value {expected:.3g} beyond {dtype}"
        return
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 1e-2
    denormal = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    assert abs(loss.double().item() - rounded) <= tol * rounded + denormal, (loss.item(), expected)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype, scale", SCALES, ids=lambda v: str(v).removeprefix("torch."))
def test_any_scale_gives_the_nearest_code_and_the_true_loss(backend, dtype, scale):
    device = backend_device(backend)
    codebook = torch.randn(70, 24, dtype=torch.float64)
    z = _midpoint_rows(codebook, 40).double()
    zs, cs = (z * scale).to(dtype).to(device), (codebook * scale).to(dtype).to(device)
    quantized, indices, loss = quantize(zs, cs, beta=0.25, backend=backend)
    assert_nearest(zs, cs, indices, distance_rtol(backend, dtype))
    assert torch.equal(quantized, cs[indices])
    _check_loss(loss, _expected_loss(zs, cs, indices, 0.25).item(), dtype)
    assert torch.equal(nearest_code(zs, cs, backend=backend), indices)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
def test_the_loss_of_large_values_is_finite(backend, dtype):
    """quantize(full((64, 8), 1e18), zeros(1, 8)).loss is 1.25 * 1e36 (fp32 sums of the squares overflow)."""
    device = backend_device(backend)
    z = torch.full((64, 8), 1e18, dtype=dtype, device=device)
    codebook = torch.zeros(1, 8, dtype=dtype, device=device)
    loss = quantize(z, codebook, beta=0.25, backend=backend).loss
    expected = 1.25 * float(z[0, 0].double()) ** 2
    assert abs(loss.double().item() - expected) <= (1e-5 if dtype != torch.bfloat16 else 1e-2) * expected


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype, scale", [(torch.float32, s) for s in (1e-30, 1e-22, 1e18, 1e20)]
                         + [(torch.bfloat16, 1e18), (torch.float64, 1e-100), (torch.float64, 1e100)],
                         ids=lambda v: str(v).removeprefix("torch."))
def test_rotation_gradient_at_any_scale(backend, dtype, scale):
    """The rotation trick's gradient is the formula's (not NaN, and not the straight-through
    fallback) whatever the scale: it depends only on directions and the norms' ratio."""
    device = backend_device(backend)
    z = (torch.randn(50, 16, dtype=torch.float64) * scale).to(dtype).to(device).requires_grad_()
    codebook = (torch.randn(30, 16, dtype=torch.float64) * scale).to(dtype).to(device)
    quantized, indices, _ = quantize(z, codebook, backend=backend, gradient="rotation")
    grad = torch.randn(50, 16, dtype=torch.float64).to(dtype).to(device)
    (got,) = torch.autograd.grad(quantized, z, grad)
    expected = rotation_gradient(grad.double(), z.detach().double(), codebook[indices].double())
    assert bool(torch.isfinite(got).all())
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2) \
        if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.double(), expected, **tol)
    assert not torch.allclose(got.double(), grad.double(), rtol=1e-3, atol=1e-3), "fell back to straight-through"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_a_nan_code_with_huge_entries_changes_no_other_choice(backend, dtype):
    """[1e30, nan] must not enter the centre (a mean over its finite entries would move it by
    5e29 and cancel every other code's score)."""
    device = backend_device(backend)
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1e30, float("nan")]], dtype=dtype, device=device)
    z = torch.tensor([[0.2, 0.1], [0.8, -0.3], [0.45, 2.0], [0.55, -1.0], [1e3, 0.0]], dtype=dtype, device=device)
    indices = nearest_code(z, codebook, backend=backend)
    assert indices.tolist() == [0, 1, 0, 1, 1]
    assert torch.equal(quantize(z, codebook, backend=backend).indices, indices)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64), ids=str)
def test_a_non_finite_row_takes_code_zero(backend, dtype):
    """Every distance from a row with a NaN/Inf entry is NaN or +inf: no code is nearer than
    another, and the row takes index 0 on every backend (its loss term is NaN or +inf)."""
    device = backend_device(backend)
    z = torch.randn(40, 5).to(dtype)
    z[3, 1], z[7, :], z[11, 0], z[12, 2] = float("nan"), float("nan"), float("inf"), -float("inf")
    codebook = torch.randn(333, 5).to(dtype)
    z, codebook = z.to(device), codebook.to(device)
    indices = nearest_code(z, codebook, backend=backend).cpu()
    assert indices[[3, 7, 11, 12]].tolist() == [0, 0, 0, 0]
    finite = torch.isfinite(z.cpu()).all(1)
    assert_nearest(z[finite], codebook, indices[finite].to(device), distance_rtol(backend, dtype))


def test_near_midpoint_rows_are_told_apart_exactly_in_every_fp32_precision(monkeypatch):
    """Triton fp32, every scoring precision: rows 1e-5 from a midpoint (and exact ties, and
    a shared offset) give the exact nearest code; such rows are within the error bound of a
    tensor-core score, so this runs the re-scoring kernel."""
    kernels = pytest.importorskip("vqvae_fast.ops.triton_nearest_code")
    plans = pytest.importorskip("vqvae_fast.ops.triton_plan")
    device = backend_device("triton")
    codebook = torch.randn(120, 40, dtype=torch.float64)
    z = _midpoint_rows(codebook, 30)
    z = torch.cat([z, codebook[:10]])  # rows exactly on a code: exact ties with nothing
    codebook = torch.cat([codebook, codebook[5:9]])  # duplicates 115 codes apart: the lower index wins
    for precision in plans.FP32_PRECISIONS:
        monkeypatch.setenv("VQVAE_FAST_TRITON_FP32_PRECISION", precision)
        for offset in (0.0, 1000.0):
            zs, cs = (z + offset).float().to(device), (codebook + offset).float().to(device)
            indices = nearest_code(zs, cs, backend="triton")
            assert_nearest(zs, cs, indices, 1e-12)
            assert not bool(((indices >= 120) & (indices < 124)).any()), precision
            flagged = _flagged_rows(kernels, zs, cs)
            assert flagged >= 60, f"{precision}: only {flagged} rows re-scored: the data no longer tests it"


def _flagged_rows(kernels, z, codebook) -> int:
    """How many rows a search of z flags for re-scoring (the count it leaves in its scratch)."""
    seen = {}
    prepare = kernels.prepare_operands

    def spy(*args):
        seen["ops"] = prepare(*args)
        return seen["ops"]

    kernels.prepare_operands = spy
    try:
        kernels.nearest_code(z, codebook)
    finally:
        kernels.prepare_operands = prepare
    return int(seen["ops"].scratch[0])


def test_without_the_bound_a_one_pass_score_picks_wrong_codes(monkeypatch):
    """The re-scoring is what makes fp32 exact: with the bound set to zero, rows near a
    midpoint are settled from their bf16x3 scores alone, and some pick a farther code."""
    kernels = pytest.importorskip("vqvae_fast.ops.triton_nearest_code")
    device = backend_device("triton")
    codebook = torch.randn(120, 40, dtype=torch.float64)
    z = _midpoint_rows(codebook, 0)[:120]  # 1e-5 and 1e-4 from the midpoints
    zs, cs = z.float().to(device), codebook.float().to(device)
    monkeypatch.setattr(kernels, "settle_bound", lambda mode, d_pad: (0.0, 0.0, 0.0))
    with pytest.raises(AssertionError, match="farther than the nearest"):
        assert_nearest(zs, cs, nearest_code(zs, cs, backend="triton"), 1e-12)


@pytest.fixture
def flushed_denormals():
    """torch.set_flush_denormal(True) (FTZ/DAZ) on one thread, so that every operation flushes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", ("gemm", "portable", "avx2", "avx512", "amx"))
def test_cpu_rows_with_distances_below_fp32_normals_under_flush_denormal(path, monkeypatch, flushed_denormals):
    """fp32 rows ~1e-19.5 have float scores ~1e-39, below 2^-126: with denormals flushed each
    operation can lose up to 2^-126, which the scans' bound must cover (it assumed gradual underflow)."""
    monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", path)  # an unavailable path falls back to one that is
    h = float.fromhex
    z = torch.tensor([[h("-0x1.f276a8p-64")]])
    codebook = torch.tensor([[h("-0x1.35281ap-63")], [h("-0x1.1dbecap-63")], [h("0x1.55c5bep-63")]])
    assert nearest_code(z, codebook, backend="cpu").tolist() == [1]
    for d, k in ((1, 3), (4, 10), (16, 40)):
        z, codebook = torch.randn(256, d) * 3e-20, torch.randn(k, d) * 3e-20
        expected = nearest_code(z, codebook, backend="reference")  # float64 squares of 1e-20: normal
        assert torch.equal(nearest_code(z, codebook, backend="cpu"), expected), (d, k)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fp64_distances_beyond_the_range_still_give_the_nearest_code(backend):
    """|z - e|^2 beyond 1.8e308 (+inf in float64) for every code: the nearest code is still chosen
    (as the distances compare at 2^-600), and the loss is +inf."""
    device = backend_device(backend)
    z = torch.tensor([[0.0], [1e200]], dtype=torch.float64, device=device)
    codebook = torch.tensor([[3e200], [float("nan")], [2e200], [-5e200]], dtype=torch.float64, device=device)
    assert nearest_code(z, codebook, backend=backend).tolist() == [2, 2]
    z, codebook = torch.randn(60, 24, dtype=torch.float64) * 1e300, torch.randn(70, 24, dtype=torch.float64) * 1e300
    expected = nearest_code(z * 2.0 ** -1000, codebook * 2.0 ** -1000, backend="reference")
    _, indices, loss = quantize(z.to(device), codebook.to(device), backend=backend)
    assert torch.equal(indices.cpu(), expected)
    assert loss.item() == float("inf")


def _rotation_cases():
    """(z, codebook, grad) at float64 scales whose squared norms underflow or overflow, at D = 1 and 16."""
    cases = []
    for d in (1, 16):
        for scale in (1e-170, 1e-300, 1e160, 1e300):
            z, codebook = torch.rand(8, d, dtype=torch.float64) + 0.5, torch.rand(5, d, dtype=torch.float64) + 0.5
            cases.append((z * scale, codebook * scale, torch.randn(8, d, dtype=torch.float64)))
    return cases


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rotation_gradient_at_fp64_extremes(backend):
    """The rotation depends only on the directions and the ratio of the norms: at 1e-170 or 1e300
    it is the gradient of the same inputs scaled to 1 by a power of two (not straight-through, not NaN)."""
    for z, codebook, grad in _rotation_cases():
        z.requires_grad_()
        quantized, indices, _ = quantize(z, codebook, backend=backend, gradient="rotation")
        (got,) = torch.autograd.grad(quantized, z, grad)
        peak = 2.0 ** torch.frexp(z.detach().abs().max()).exponent.item()
        expected = rotation_gradient(grad, z.detach() / peak, codebook[indices] / peak)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got, grad), "fell back to straight-through"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("gradient", ("ste", "rotation"))
def test_the_gradient_through_a_code_with_a_nan_entry_is_straight_through(backend, gradient):
    """A code with a NaN entry is chosen only when every code has one; its norm is NaN, so the
    rotation falls back to the straight-through gradient, as for a code beyond [1e-6, 1e6] of |z|;
    the loss, unused, adds nothing (not 0 * NaN)."""
    z = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64, requires_grad=True)
    codebook = torch.tensor([[float("nan"), 1.0], [2.0, float("inf")]], dtype=torch.float64)
    grad = torch.tensor([[0.5, -2.0], [1.0, 3.0]], dtype=torch.float64)
    quantized = quantize(z, codebook, backend=backend, gradient=gradient).quantized
    (got,) = torch.autograd.grad(quantized, z, grad)
    assert torch.equal(got, grad)
