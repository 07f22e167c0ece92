"""The cpu backend's forward paths: the fused scan in its AMX form (large D, CPUs with AMX-BF16:
bf16 tile products of split operands), its AVX-512 form, its AVX2 form (x86-64 CPUs without
AVX-512) and its portable form (NEON on aarch64; one std::fma per lane elsewhere, forced only), and
the BLAS GEMM path (every other CPU). VQVAE_FAST_CPU_SCAN=amx | avx512 | avx2 | portable | gemm
forces one. Each must give the exact nearest code; the forward suite runs on the default path, and
once more here on each forced path (a forced avx2 runs every helper of the scan with AVX2 too, as a
CPU without AVX-512 would; a forced portable runs on this x86 machine the logic an aarch64 CPU
runs with NEON)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_nearest
import vqvae_fast  # noqa: F401  (loads the ops)
from vqvae_fast import nearest_code, quantize

TESTS = Path(__file__).parent
# What each forced path reports where the CPU can run it.
REPORTED = {"amx": "fused-amx", "avx512": "fused-avx512", "avx512bf16": "fused-avx512-bf16",
            "avx512bf16rounded": "fused-avx512-bf16-rounded", "avx2": "fused-avx2", "portable": "fused-portable",
            "gemm": "gemm"}
# The dtype a forced path is reported for (the bf16 scan takes bf16 inputs only; others get the float scan).
FORCED_DTYPE = {"avx512bf16": torch.bfloat16}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def force(path: str, monkeypatch) -> None:
    """Forces a forward path, skipping where this CPU cannot run it."""
    monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", path)
    if torch.ops.vqvae_fast.cpu_forward_path(64, FORCED_DTYPE.get(path)) != REPORTED[path]:
        pytest.skip(f"this CPU cannot run the {path} path")


@pytest.fixture(params=list(REPORTED))
def scan(request, monkeypatch):
    force(request.param, monkeypatch)
    return request.param


def test_reported_path_matches_the_cpu(monkeypatch):
    monkeypatch.delenv("VQVAE_FAST_CPU_SCAN", raising=False)
    flags = cpu_flags()
    avx512 = "avx512f" in flags
    avx2 = {"avx2", "fma"} <= flags
    amx = avx512 and {"amx_tile", "amx_bf16", "avx512bw", "avx512vl", "avx512_bf16"} <= flags
    large, small = torch.ops.vqvae_fast.cpu_forward_path(16), torch.ops.vqvae_fast.cpu_forward_path(15)
    native = "fused-portable" if platform.machine() in ("aarch64", "arm64") else "gemm"  # NEON
    assert small == ("fused-avx512" if avx512 else "fused-avx2" if avx2 else native)
    # From D = 16 on: the rounded bf16 scan where the CPU has AVX512-BF16 but AMX does not run.
    # AMX also needs the kernel's permission for this process (Linux 5.16 on): where the flags
    # say AMX, the rounded scan (AMX CPUs have AVX512-BF16) is the only other acceptable answer.
    bf16 = avx512 and "avx512_bf16" in flags  # bf16 inputs below AMX's D: the bf16 scan
    rounded = "fused-avx512-bf16-rounded" if bf16 else small
    assert large == ("fused-amx" if amx else rounded) or (amx and large == rounded)
    assert torch.ops.vqvae_fast.cpu_forward_path(15, torch.bfloat16) == ("fused-avx512-bf16" if bf16 else small)
    # float32 and fp16 from D = 16 on where AMX does not run: the rounded bf16 scan.
    for dtype in (torch.float32, torch.float16):
        assert torch.ops.vqvae_fast.cpu_forward_path(15, dtype) == small
        assert torch.ops.vqvae_fast.cpu_forward_path(16, dtype) in ((large, rounded) if amx else (rounded,))
    assert torch.ops.vqvae_fast.cpu_forward_path(256, torch.float64) == small
    monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", "gemm")
    assert torch.ops.vqvae_fast.cpu_forward_path(256) == "gemm"
    monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", "avx512")
    assert torch.ops.vqvae_fast.cpu_forward_path(256) == small
    monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", "avx2")
    assert torch.ops.vqvae_fast.cpu_forward_path(256) == ("fused-avx2" if avx2 else native)
    monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", "portable")  # runs everywhere
    assert torch.ops.vqvae_fast.cpu_forward_path(256) == "fused-portable"


# Profiler events the kernel records for each stage it runs (csrc/cpu/settle.cpp).
STAGE_EVENTS = {"vqvae_fast::cpu_scan_amx": "fused-amx", "vqvae_fast::cpu_scan_avx512_bf16": "fused-avx512-bf16",
                "vqvae_fast::cpu_scan_avx512_bf16_rounded": "fused-avx512-bf16-rounded",
                "vqvae_fast::cpu_scan_avx512": "fused-avx512",
                "vqvae_fast::cpu_scan_avx2": "fused-avx2", "vqvae_fast::cpu_scan_portable": "fused-portable",
                "vqvae_fast::cpu_settle_gemm": "gemm"}


def path_taken(z: torch.Tensor, codebook: torch.Tensor) -> str:
    """The forward path the kernel takes for (z, codebook), read from the profiler: the first of
    its stages that ran (the AMX scan hands its near-ties to the AVX-512 one, both to the GEMM path)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        quantize(z, codebook, backend="cpu")
    stages = {STAGE_EVENTS[e.name] for e in prof.events() if e.name in STAGE_EVENTS}
    return next(path for path in ("fused-amx", "fused-avx512-bf16", "fused-avx512-bf16-rounded", "fused-avx512",
                                  "fused-avx2", "fused-portable", "gemm")
                if path in stages)


@pytest.mark.parametrize("forced", ("", *REPORTED))
def test_reported_path_is_the_kernels(forced, monkeypatch):
    """cpu_forward_path(D, dtype, K) names the path the kernel takes for those inputs, for every
    dtype, D on both sides of the AMX threshold (16) and each forced path."""
    monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", forced)
    report = torch.ops.vqvae_fast.cpu_forward_path
    k = 40
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for d in (1, 8, 15, 16, 64, 200):
            z, codebook = torch.randn(100, d).to(dtype), torch.randn(k, d).to(dtype)
            reported = report(d, dtype, k)
            assert path_taken(z, codebook) == reported, (dtype, d)
            if dtype == torch.float64:
                assert reported != "fused-amx"
            # Scan states index codes with int32: from 2^31 codes on, only the GEMM path.
            assert report(d, dtype, 2**31 - 1) == reported
            assert report(d, dtype, 2**31) == "gemm"
    assert report(64) == report(64, torch.float32, 1024) == report(D=64, dtype=None)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        report(64, torch.int32)


# Around the fused scan's blocks: 32-row panels, 12-code groups, codebook chunks of
# 65536 / (12 D) groups (D = 200: 27 groups, so K = 700 spans three chunks).
SHAPES = ((1, 1, 1), (31, 11, 3), (33, 13, 17), (64, 12, 8), (65, 25, 31), (500, 700, 200), (97, 1, 64),
          (300, 2000, 2), (1200, 64, 40))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_exact_nearest_on_both_paths(scan, dtype, shape):
    n, k, d = shape
    z = torch.randn(n, d).to(dtype)
    codebook = torch.randn(k, d).to(dtype)
    quantized, indices, loss = quantize(z, codebook, beta=0.25, backend="cpu")
    assert_nearest(z, codebook, indices, 1e-12)
    assert torch.equal(quantized, codebook[indices])
    expected = 1.25 * ((z.double() - codebook[indices].double()) ** 2).mean()
    assert abs(loss.double().item() - expected.item()) <= (1e-12 if dtype == torch.float64 else 1e-2) * expected.item()
    assert torch.equal(nearest_code(z, codebook, backend="cpu"), indices)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_paths_agree_bit_for_bit(dtype, monkeypatch):
    """Same indices and the same loss (exact distances summed in row order) on every path, with
    threads: rows settled by a scan and rows it hands back (near-ties) mixed in one call."""
    base = torch.randn(50, 40)
    codebook = torch.cat([base, torch.randn(400, 40), base]).to(dtype)  # exact duplicates: ties for the GEMM path
    z = torch.cat([torch.randn(3000, 40), base[torch.randint(0, 50, (500,))] + 1e-3 * torch.randn(500, 40)]).to(dtype)
    results = {}
    for path in REPORTED:
        monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", path)
        if torch.ops.vqvae_fast.cpu_forward_path(40, dtype) == REPORTED[path]:
            _, indices, loss = quantize(z, codebook, backend="cpu")
            results[path] = (indices, loss)
    assert "gemm" in results
    for path, (indices, loss) in results.items():
        assert torch.equal(indices, results["gemm"][0]), path
        assert torch.equal(loss, results["gemm"][1]), path
        assert bool((indices < 450).all()), f"{path}: an exact tie must go to the lowest index"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("d", (32, 100, 256))
def test_split_bf16_scores_never_pick_a_wrong_code(scan, dtype, d):
    """Rows a hair from the midpoint of two codes (closer than the bf16 parts can tell, farther
    than float can), a shared offset, and scales from denormal products to float overflow."""
    codebook = torch.randn(300, d)
    a, b = codebook[:150], codebook[150:]
    mid = (a + b) / 2
    step = (b - a) / (b - a).norm(dim=1, keepdim=True)
    z = torch.cat([mid + 1e-4 * step, mid - 1e-4 * step, mid + 3e-3 * step, torch.randn(200, d)])
    for scale, offset in ((1.0, 0.0), (1.0, 1000.0), (1e-30, 0.0), (1e15, 0.0), (1e20, 0.0)):
        zs, cs = (z * scale + offset).to(dtype), (codebook * scale + offset).to(dtype)
        indices = nearest_code(zs, cs, backend="cpu")
        assert_nearest(zs, cs, indices, 1e-12)


@pytest.mark.parametrize("path", list(REPORTED))
def test_forced_path_passes_the_forward_suite(path, monkeypatch):
    """The forward and input-check suites, cpu backend, with one path forced."""
    force(path, monkeypatch)
    env = dict(os.environ, VQVAE_FAST_CPU_SCAN=path)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpu and not triton",
         str(TESTS / "test_nearest_code.py"), str(TESTS / "test_inputs.py")],
        env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("d", (2, 8, 32))
def test_near_ties_inside_and_across_code_groups(scan, d):
    """At small D the scans fold each group of 12 codes as its minimum and find the group's second
    best afterwards: rows a hair from the midpoint of two codes of one group (k, k + 1) and of two
    groups (k, k + 12) must still reach the exact re-check."""
    codebook = torch.randn(120, d)
    pairs = [(k, k + 1) for k in range(0, 108, 12)] + [(k, k + 12) for k in range(3, 100, 12)]
    a, b = codebook[[p[0] for p in pairs]], codebook[[p[1] for p in pairs]]
    mid, step = (a + b) / 2, (b - a) / (b - a).norm(dim=1, keepdim=True)
    z = torch.cat([mid + eps * step for eps in (1e-7, -1e-7, 1e-5, -1e-5, 1e-3)] + [torch.randn(100, d)])
    indices = nearest_code(z, codebook, backend="cpu")
    assert_nearest(z, codebook, indices, 1e-12)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("d", (8, 64, 256))
def test_near_ties_among_short_codes_beside_long_ones(scan, dtype, d):
    """Many short, near-identical codes beside a few long ones (a later residual stage): the
    re-check bounds each code's float score error by its own length, so most short codes drop out;
    rows a hair from the midpoint of two short codes must still get the exact nearest (rtol 0: the
    chosen code's float64 distance is the minimum)."""
    far = torch.randn(2, d) * 100
    short = torch.randn(60, d) * 1e-3
    twin = short + torch.randn(60, d) * 1e-6
    codebook = torch.cat([far, -far, short, twin])  # the long codes cancel in the centre
    mid, gap = (short + twin) / 2, twin - short
    z = torch.cat([mid + f * gap for f in (1e-3, -1e-3, 0.1, -0.1)]
                  + [torch.randn(20, d) * 1e-3, torch.randn(10, d) * 50])
    z, codebook = z.to(dtype), codebook.to(dtype)
    assert_nearest(z, codebook, nearest_code(z, codebook, backend="cpu"), 0.0)


def test_bf16_scan_leaves_subnormals_and_offsets_to_the_float_scan(monkeypatch):
    """VDPBF16PS reads subnormal inputs as zero: a row with one is handed to the float scan, a
    codebook with one takes the float scan, and (unforced) so does a codebook far from the
    origin (its scores would not be centred); the codes are exact every way."""
    force("avx512bf16", monkeypatch)
    codebook = torch.randn(200, 12).bfloat16()  # D < 16: not AMX's, unforced either
    z = torch.randn(300, 12).bfloat16()
    assert path_taken(z, codebook) == "fused-avx512-bf16"
    tiny = z.clone()
    tiny[::7, 3] = 1e-39  # subnormal in bf16
    assert_nearest(tiny, codebook, nearest_code(tiny, codebook, backend="cpu"), 1e-12)
    odd = codebook.clone()
    odd[5, 0] = 1e-39
    assert path_taken(z, odd) == "fused-avx512"
    assert_nearest(z, odd, nearest_code(z, odd, backend="cpu"), 1e-12)
    monkeypatch.delenv("VQVAE_FAST_CPU_SCAN")
    far = codebook + 100
    assert path_taken(z + 100, far) == "fused-avx512"  # the centre is not small: centred float scores
    assert path_taken(z, codebook) == "fused-avx512-bf16"
    assert_nearest(z + 100, far, nearest_code(z + 100, far, backend="cpu"), 1e-12)
    # From D = 16 on the centred values are rounded to bf16 again instead (the rounded scan).
    wide, wide_z = (torch.randn(200, 40) + 100).bfloat16(), (torch.randn(300, 40) + 100).bfloat16()
    assert path_taken(wide_z, wide) == "fused-avx512-bf16-rounded"
    assert_nearest(wide_z, wide, nearest_code(wide_z, wide, backend="cpu"), 1e-12)
    wide[3, 7] = 1e-39  # a subnormal code: rounded off (flushed) like any other dropped part
    assert path_taken(wide_z, wide) == "fused-avx512-bf16-rounded"
    assert_nearest(wide_z, wide, nearest_code(wide_z, wide, backend="cpu"), 1e-12)


# Every body that packs rows for a scan (the op cpu_pack_norms reaches each by name).
def circumcentres(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Per row, the point of the plane through a, b and c equidistant from all three (float64)."""
    u, v = (b - a).double(), (c - a).double()
    gram = torch.stack([torch.stack([(u * u).sum(1), (u * v).sum(1)], 1),
                        torch.stack([(u * v).sum(1), (v * v).sum(1)], 1)], 1)
    rhs = torch.stack([(u * u).sum(1), (v * v).sum(1)], 1) / 2
    st = torch.linalg.solve(gram, rhs)
    return a.double() + st[:, :1] * u + st[:, 1:] * v


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("d", (5, 48, 200))
def test_rounded_bf16_scan_two_three_and_tied_candidates(dtype, d, monkeypatch):
    """float32 (fp16) rows and codes rounded to bf16 move a score by up to ~2^-8 |z| |e|: rows
    with two codes inside that (settled from both exact distances, at every distance from their
    midpoint), with three (handed to the float scan), exact ties of two codes (the lower index,
    whichever of them the scan ranked first), subnormal entries beside normal ones; all exact."""
    force("avx512bf16rounded", monkeypatch)
    g = torch.Generator().manual_seed(d)
    codebook = torch.randn(120, d, generator=g)
    a, b, c = codebook[0:30], codebook[30:60], codebook[60:90]
    mid, step = (a + b) / 2, (b - a) / (b - a).norm(dim=1, keepdim=True)
    pairs = [mid + sign * eps * step for eps in torch.logspace(-7, -1, 13).tolist() for sign in (1, -1)]
    triples = circumcentres(a, b, c).float()
    triples = [triples, triples + 1e-4 * torch.randn(triples.shape, generator=g)]
    tied_book = codebook.clone()
    tied_book[90:100] *= 0.1  # the nearest codes to 0
    tied_book[100:110] = -tied_book[90:100]  # code 90 + j and 100 + j: equal distances from 0
    z = torch.cat(pairs + triples + [torch.randn(64, d, generator=g)]).to(dtype)
    book = codebook.to(dtype)
    assert path_taken(z, book) == "fused-avx512-bf16-rounded"
    assert_nearest(z, book, nearest_code(z, book, backend="cpu"), 1e-12)
    zero, tied_book = torch.zeros(4, d).to(dtype), tied_book.to(dtype)
    indices = nearest_code(zero, tied_book, backend="cpu")
    assert_nearest(zero, tied_book, indices, 0.0)
    norms = (tied_book.double() ** 2).sum(1)
    assert int(indices[0]) == int(torch.nonzero(norms == norms.min())[0]) < 100  # the lower of two equal distances
    tiny = z.clone()
    tiny[::3, :: 2] = 1e-39 if dtype == torch.float32 else 1e-7  # subnormal in the dtype
    tiny_book = book.clone()
    tiny_book[::5, 1] = 1e-39 if dtype == torch.float32 else 1e-7
    assert_nearest(tiny, tiny_book, nearest_code(tiny, tiny_book, backend="cpu"), 1e-12)


@pytest.mark.parametrize("d", (20, 48, 160))
def test_rounded_bf16_scan_third_candidate_in_a_late_group(d, monkeypatch):
    """Rows nearly equidistant from codes a, b (early) and c (after code 576, where the fold skips
    groups whose minimum is below no row's third), a hair nearer c: all three are inside the
    rounding's bound, so c's group must be folded whenever its score is below the row's third."""
    force("avx512bf16rounded", monkeypatch)
    g = torch.Generator().manual_seed(d)
    codebook = torch.randn(700, d, generator=g)
    a, b, c = codebook[0:40], codebook[40:80], codebook[600:640]
    centre = circumcentres(a, b, c)
    toward_c = (c.double() - centre) / (c.double() - centre).norm(dim=1, keepdim=True)
    z = torch.cat([centre + eps * toward_c for eps in (1e-4, 3e-4, 1e-3)]).float()
    assert_nearest(z, codebook, nearest_code(z, codebook, backend="cpu"), 1e-12)


def events(z: torch.Tensor, codebook: torch.Tensor) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        indices = nearest_code(z, codebook, backend="cpu")
    assert_nearest(z, codebook, indices, 1e-12)
    return {e.name for e in prof.events()}


def kmeans_codebook(k: int, d: int, generator: torch.Generator, per_code: int = 8, steps: int = 5) -> torch.Tensor:
    """Codes as k-means leaves them on Gaussian data: means of a few points, short and close together."""
    data = torch.randn(per_code * k, d, generator=generator)
    codes = data[:k].clone()
    for _ in range(steps):
        nearest = nearest_code(data, codes, backend="cpu")
        counts = torch.bincount(nearest, minlength=k)[:, None]
        sums = torch.zeros_like(codes).index_add_(0, nearest, data)
        codes = torch.where(counts > 0, sums / counts.clamp_min(1), codes)
    return codes


def test_rounded_bf16_scan_gives_way_where_it_hands_back_too_many_rows(monkeypatch):
    """With a k-means-like codebook at D = 256 about half the rows have three codes or more inside
    the rounding's bound (benchmarks/rounded_candidates.py): after its first block of rows the scan
    gives way to the float scan (unforced); random codes keep it for every block, and forcing it
    keeps it whatever it hands back. Exact every way."""
    monkeypatch.delenv("VQVAE_FAST_CPU_SCAN", raising=False)
    if torch.ops.vqvae_fast.cpu_forward_path(256) != "fused-avx512-bf16-rounded":
        pytest.skip("this CPU does not take the rounded bf16 scan for float32 rows")
    g = torch.Generator().manual_seed(0)
    trained, z = kmeans_codebook(256, 256, g), torch.randn(5000, 256, generator=g)
    declined = "vqvae_fast::cpu_rounded_scan_declined"
    assert declined in events(z, trained)
    assert declined not in events(z, torch.randn(256, 256, generator=g))
    monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", "avx512bf16rounded")
    assert declined not in events(z, trained)


PACK_BODIES = ("avx512", "avx2", "portable", "amx", "avx512bf16")


def pack_norms(z: torch.Tensor, centre: torch.Tensor, body: str) -> torch.Tensor:
    try:
        return torch.ops.vqvae_fast.cpu_pack_norms(z, centre, body)
    except RuntimeError as error:
        if "cannot run" in str(error):
            pytest.skip(f"this CPU cannot run the {body} body")
        raise


@pytest.mark.parametrize("body, dtype", [(body, dtype) for body in PACK_BODIES
                                          for dtype in (torch.float32, torch.bfloat16, torch.float16)
                                          if body != "avx512bf16" or dtype == torch.bfloat16],  # bf16 rows only
                         ids=str)
@pytest.mark.parametrize("d", (1, 7, 16, 17, 64, 100, 256))
def test_packing_reports_each_rows_squared_distance_to_the_centre(body, dtype, d):
    """The norms a panel's packing reports enter only the float error bound of the scan: too small
    a norm lets a near-tie through as settled, yet no forward result on ordinary inputs shows it
    (a norm of 0 passed the whole forward suite). So they are compared here, for every body,
    with the float64 norm of the rows rounded as the scan reads them (z - centre in float)."""
    generator = torch.Generator().manual_seed(d)
    centre = torch.zeros(d) if body == "avx512bf16" else torch.randn(d, generator=generator) * 3
    for n in (1, 31, 32, 33, 70):
        z = (torch.randn(n, d, generator=generator) * 4 + 1).to(dtype)
        norms = pack_norms(z, centre, body)
        centred = (z.double() - centre.double()).float().double()  # what the packing sums, exactly
        expected = (centred ** 2).sum(1)
        # float sums of d + 1 rounded terms: within (d + 2) units of float rounding of the total.
        tolerance = (d + 2) * 2.0 ** -23 * expected + 1e-30
        assert norms.shape == (n,) and torch.all((norms.double() - expected).abs() <= tolerance), (
            body, n, (norms.double() - expected).abs().max().item())


def test_bf16_packing_marks_rows_with_subnormals():
    z = torch.randn(40, 9).bfloat16()
    z[3, 4] = torch.tensor(1e-40).bfloat16()  # subnormal in bf16: the instruction would read it as 0
    norms = pack_norms(z, torch.zeros(9), "avx512bf16")
    assert torch.isinf(norms[3]) and torch.isfinite(torch.cat([norms[:3], norms[4:]])).all()


def test_pack_norms_refuses_what_it_cannot_pack():
    z = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="unknown body"):
        torch.ops.vqvae_fast.cpu_pack_norms(z, torch.zeros(3), "sse")
    with pytest.raises(RuntimeError, match="float64 rows are not packed"):
        torch.ops.vqvae_fast.cpu_pack_norms(z.double(), torch.zeros(3), "portable")
    with pytest.raises(RuntimeError, match=r"shape \(D,\) = \(3,\)"):
        torch.ops.vqvae_fast.cpu_pack_norms(z, torch.zeros(4), "portable")
