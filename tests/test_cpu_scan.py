"""The cpu backend's two forward paths: the fused AVX-512 scan (used where the CPU has it) and the
BLAS GEMM path (every other CPU; VQVAE_FAST_CPU_SCAN=gemm forces it). Both must give the exact
nearest code; the forward suite runs on the default path, and once more here on the GEMM path."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_nearest
import vqvae_fast  # noqa: F401  (loads the ops)
from vqvae_fast import nearest_code, quantize

TESTS = Path(__file__).parent


def cpu_has_avx512f() -> bool:
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")


@pytest.fixture(params=["fused", "gemm"])
def scan(request, monkeypatch):
    if request.param == "fused":
        monkeypatch.delenv("VQVAE_FAST_CPU_SCAN", raising=False)
        if torch.ops.vqvae_fast.cpu_forward_path() != "fused-avx512":
            pytest.skip("this CPU has no AVX-512F: the fused scan cannot run")
    else:
        monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", "gemm")
    return request.param


def test_reported_path_matches_the_cpu(monkeypatch):
    monkeypatch.delenv("VQVAE_FAST_CPU_SCAN", raising=False)
    expected = "fused-avx512" if cpu_has_avx512f() else "gemm"
    assert torch.ops.vqvae_fast.cpu_forward_path() == expected
    monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", "gemm")
    assert torch.ops.vqvae_fast.cpu_forward_path() == "gemm"


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


def test_paths_agree_bit_for_bit(monkeypatch):
    """Same indices and the same loss (exact distances summed in row order) on both paths, with
    threads: rows settled by the scan and rows it hands back (near-ties) mixed in one call."""
    base = torch.randn(50, 24)
    codebook = torch.cat([base, torch.randn(400, 24), base])  # exact duplicates: ties for the GEMM path
    z = torch.cat([torch.randn(3000, 24), base[torch.randint(0, 50, (500,))] + 1e-3 * torch.randn(500, 24)])
    results = {}
    for path in ("default", "gemm"):
        if path == "gemm":
            monkeypatch.setenv("VQVAE_FAST_CPU_SCAN", "gemm")
        _, indices, loss = quantize(z, codebook, backend="cpu")
        results[path] = (indices, loss)
    assert torch.equal(results["default"][0], results["gemm"][0])
    assert torch.equal(results["default"][1], results["gemm"][1])
    assert bool((results["default"][0] < 450).all()), "an exact tie must go to the lowest index"


def test_gemm_path_passes_the_forward_suite():
    """The forward and input-check suites, cpu backend, with the GEMM path forced."""
    env = dict(os.environ, VQVAE_FAST_CPU_SCAN="gemm")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpu and not triton",
         str(TESTS / "test_nearest_code.py"), str(TESTS / "test_inputs.py")],
        env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]
