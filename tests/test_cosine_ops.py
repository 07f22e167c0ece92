"""quantize(..., distance="cosine") on every backend: the l2-normalisation inside the Triton
kernels against the float64 reference, exactness rules as for the Euclidean search, gradients
through the normalisation, and the per-code statistics of the normalised rows."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ALL_BACKENDS, assert_nearest, backend_device, distance_rtol
from vqvae_fast import InputError, quantize
from vqvae_fast.functional import quantize_with_code_stats

SHAPES = ((37, 19, 11), (1, 1, 5), (0, 7, 3), (130, 1, 9), (70, 45, 67))
DTYPES = (torch.float64, torch.float32, torch.bfloat16)


def kernel_unit(x: torch.Tensor) -> torch.Tensor:
    """The rows as the kernels normalise them: a float64 norm, then one rounding to x's dtype."""
    x64 = x.detach().cpu().double()
    return (x64 * (1.0 / x64.norm(dim=1).clamp_min(1e-12))[:, None]).to(x.dtype)


def inputs(n, k, d, dtype, device):
    """Rows and codes of very different norms (and one zero row and code): only directions count."""
    z = torch.randn(n, d, dtype=torch.float64) * torch.rand(n, 1, dtype=torch.float64).mul(30).exp()
    codebook = torch.randn(k, d, dtype=torch.float64) * torch.rand(k, 1, dtype=torch.float64).mul(10).exp()
    if n > 2:
        z[1] = 0.0
    if k > 2:
        codebook[2] = 0.0
    return z.to(dtype).to(device), codebook.to(dtype).to(device)


def test_unknown_distance_raises_input_error():
    z = torch.randn(4, 3)
    with pytest.raises(InputError, match="euclidean.*cosine"):
        quantize(z, z, distance="dot")
    with pytest.raises(InputError, match="euclidean.*cosine"):
        quantize_with_code_stats(z, z, distance="Cosine")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nearest_normalised_code_loss_and_output(backend, shape, dtype):
    device = backend_device(backend)
    z, codebook = inputs(*shape, dtype, device)
    quantized, indices, loss = quantize(z, codebook, beta=0.3, backend=backend, distance="cosine")
    # the vectors compared: normalised inside the kernels (triton), else by F.normalize in torch
    unit = kernel_unit if backend == "triton" else (lambda x: F.normalize(x.cpu(), dim=1, eps=1e-12))
    unit_z, unit_codes = unit(z), unit(codebook)
    # exact (1e-12 of the scale) on the vectors compared; 16-bit triton within 2e-5
    assert_nearest(unit_z, unit_codes, indices.cpu(), distance_rtol(backend, dtype))
    chosen = unit_codes[indices.cpu()]
    ulp = {torch.float64: 1e-15, torch.float32: 1.2e-7, torch.bfloat16: 8e-3}[dtype]
    if backend == "triton":  # the norm's float64 sum in another order: a last-bit difference at most
        torch.testing.assert_close(quantized.cpu(), chosen, rtol=ulp, atol=0)
    else:
        assert torch.equal(quantized.cpu(), chosen)
    if shape[0]:
        expected = 1.3 * (unit_z.double() - chosen.double()).square().mean()
        torch.testing.assert_close(loss.cpu().double(), expected, rtol=max(ulp, 1e-12) * 8, atol=1e-12)
    else:
        assert bool(torch.isnan(loss))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_scaled_copies_of_a_code_tie_to_the_lowest_index(dtype):
    """Codes that are positive multiples of each other are one direction: the first wins, on
    triton as in the reference (float64 norms make the normalised copies equal or within an ulp)."""
    device = backend_device("triton")
    base = torch.randn(40, 24, dtype=torch.float64)
    codebook = torch.cat([base, base * 4.0, base * 0.25]).to(dtype)  # powers of two: bitwise equal directions
    z = (base[torch.randint(0, 40, (90,))] + 0.05 * torch.randn(90, 24, dtype=torch.float64)).to(dtype)
    out = quantize(z.to(device), codebook.to(device), backend="triton", distance="cosine")
    reference = quantize(z, codebook, backend="reference", distance="cosine")
    assert torch.equal(out.indices.cpu() % 40, reference.indices % 40)  # the same direction
    if dtype == torch.float32 or device != "cpu":
        # bf16 is not re-scored, so the copies' equal scores must come out equal: true of a GPU's
        # tensor cores, not of the interpreter's tl.dot (numpy's OpenBLAS sums the columns of a
        # tile in different orders on some CPUs: columns 0-7 against the rest on an AMD Zen 5).
        assert bool((out.indices.cpu() < 40).all())
        assert torch.equal(out.indices.cpu(), reference.indices)


@pytest.mark.parametrize("scale", (1e-30, 1e-9, 1e20), ids=lambda s: f"{s:g}")
def test_fp32_extreme_scales_are_exact(scale):
    """float64 norms: |z|^2 neither overflows nor underflows. Above the eps of 1e-12 the scale
    is irrelevant (the codes found at 1); below it, as torch.nn.functional.normalize, the
    vectors are divided by 1e-12 instead, and the search among them is still exact."""
    device = backend_device("triton")
    z, codebook = torch.randn(60, 13) * scale, torch.randn(33, 13) * scale
    out = quantize(z.to(device), codebook.to(device), backend="triton", distance="cosine")
    assert_nearest(kernel_unit(z), kernel_unit(codebook), out.indices, 1e-12)
    if scale > 1e-12:
        assert_nearest(kernel_unit(z / scale), kernel_unit(codebook / scale), out.indices, 1e-6)
    assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(out.quantized).all())


@pytest.mark.parametrize("deterministic", (False, True), ids=("atomics", "deterministic"))
@pytest.mark.parametrize("gradient", ("ste", "rotation"))
def test_triton_gradients_match_autograd_through_the_normalisation(gradient, deterministic):
    """float64: the fused backward (straight through or rotated, commitment and codebook terms,
    back through both normalisations, a zero row and a zero code included) against autograd of
    torch.nn.functional.normalize followed by the reference quantizer."""
    device = backend_device("triton")
    torch.use_deterministic_algorithms(deterministic)
    z, codebook = inputs(50, 21, 10, torch.float64, device)
    z.requires_grad_()
    codebook.requires_grad_()
    weight = torch.randn(50, 10, dtype=torch.float64, device=device)
    grads = []
    for backend in ("triton", "reference"):
        quantized, _, loss = quantize(z, codebook, beta=0.4, backend=backend, gradient=gradient, distance="cosine")
        grads.append(torch.autograd.grad((quantized * weight).sum() + 3.0 * loss, (z, codebook)))
    (gz, gc), (rz, rc) = grads
    torch.testing.assert_close(gz, rz, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gc, rc, rtol=1e-10, atol=1e-12)
    assert bool(gc.any()) and bool(torch.isfinite(gz).all())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_triton_gradients_in_lower_precision(dtype):
    """Against the reference in the same dtype (F.normalize there, float64 norms here: a near tie,
    e.g. with the zero code at distance exactly 1, may go either way). Rows of z that chose the
    same code on both sides, and codes no disagreeing row chose, are compared, row by row, to the
    row's largest entry (a zero code's gradient is divided by the eps of 1e-12, and a bf16
    reference sums in bf16)."""
    device = backend_device("triton")
    z, codebook = inputs(64, 30, 12, dtype, device)
    z.requires_grad_()
    codebook.requires_grad_()
    weight = torch.randn(64, 12, device=device).to(dtype)
    results = []
    for backend in ("triton", "reference"):
        quantized, indices, loss = quantize(z, codebook, backend=backend, distance="cosine")
        grads = torch.autograd.grad((quantized * weight).float().sum() + loss.float(), (z, codebook))
        results.append((indices.cpu(), [g.double().cpu() for g in grads]))
    (ours_idx, (ours_z, ours_codes)), (ref_idx, (ref_z, ref_codes)) = results
    agree = ours_idx == ref_idx
    assert float(agree.float().mean()) >= 0.9, f"{int((~agree).sum())} of 64 rows chose another code"
    untouched = torch.ones(30, dtype=torch.bool)
    untouched[ours_idx[~agree]] = False
    untouched[ref_idx[~agree]] = False
    rtol = 1e-4 if dtype == torch.float32 else 3e-2
    for ours, reference in ((ours_z[agree], ref_z[agree]), (ours_codes[untouched], ref_codes[untouched])):
        scale = reference.abs().amax(dim=1, keepdim=True)
        excess = (ours - reference).abs() - rtol * scale
        assert float(excess.max()) <= 1e-30, f"worst row error {float(excess.max()):.3g} beyond {rtol} of the row"


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
@pytest.mark.parametrize("deterministic", (False, True), ids=("atomics", "deterministic"))
def test_code_stats_are_of_the_normalised_rows(dtype, deterministic):
    device = backend_device("triton")
    torch.use_deterministic_algorithms(deterministic)
    z, codebook = inputs(120, 17, 9, dtype, device)
    out = quantize_with_code_stats(z, codebook, backend="triton", with_sums=True, distance="cosine")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    unit_z = kernel_unit(z).to(acc)
    expected = torch.zeros(17, 9, dtype=acc).index_add_(0, out.indices.cpu(), unit_z)
    assert torch.equal(out.counts.cpu(), torch.bincount(out.indices.cpu(), minlength=17).float())
    torch.testing.assert_close(out.sums.cpu(), expected, rtol=1e-6, atol=1e-6)
    plain = quantize(z, codebook, backend="triton", distance="cosine")
    assert torch.equal(plain.indices, out.indices)


def test_cpu_and_reference_normalise_in_torch_like_the_layer_did():
    """Off triton, cosine is F.normalize first: the same as normalising by hand."""
    z, codebook = inputs(40, 12, 7, torch.float32, "cpu")
    for backend in ("cpu", "reference"):
        fused = quantize(z, codebook, backend=backend, distance="cosine")
        by_hand = quantize(F.normalize(z, dim=1, eps=1e-12), F.normalize(codebook, dim=1, eps=1e-12), backend=backend)
        for a, b in zip(fused, by_hand):
            assert torch.equal(a, b)
