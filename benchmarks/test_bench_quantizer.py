"""pytest-benchmark: every provider, every task, on the same inputs; each asserts what it timed.

    pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-columns=median,iqr,min,max,rounds
    VQVAE_FAST_BENCH_SHAPES=262144x16384x256:bfloat16 pytest benchmarks/ --benchmark-only

Without --benchmark-only (a plain `pytest` from the repository root, say) every benchmark here
is skipped: they take minutes, and the test suite proper is tests/. Settings, by environment
(not pytest options: a conftest.py here would shadow the `conftest` module tests/ imports):

    VQVAE_FAST_BENCH_DEVICE   cpu or cuda (default: cuda when available)
    VQVAE_FAST_BENCH_SHAPES   comma-separated NxKxD[:dtype] (default: CPU- or GPU-sized set below)
    VQVAE_FAST_BENCH_ROUNDS   timed rounds per benchmark (default 5 on CPU, 20 on CUDA)
    VQVAE_FAST_BENCH_MEMORY   1: on CPU also measure peak RSS (a fresh process per benchmark)

Groups are "<task> N=.. K=.. D=.. <dtype>", so pytest-benchmark's table puts the providers of a
point next to each other. extra_info holds GFLOP/s, the check's numbers and the peak extra
memory (always on CUDA). compare.py and sweep.py time the same providers interleaved round by
round, which is fairer on a loaded machine: RESULTS.md uses those.
"""
from __future__ import annotations

import os

import pytest
import torch

from harness import (DTYPES, Point, available_memory_bytes, check_result, make_inputs, peak_extra_bytes_cpu,
                     run_measuring_peak_cuda, sync)
from providers import TASKS, all_provider_names, providers

# A few minutes on a 2-core CPU; on a GPU, the tokenizer size of the goals.
CPU_SHAPES = "65536x1024x64:float32,16384x4096x256:float32"
GPU_SHAPES = "262144x16384x256:bfloat16,262144x16384x256:float32,65536x1024x64:float32"

DEVICE = os.environ.get("VQVAE_FAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = int(os.environ.get("VQVAE_FAST_BENCH_ROUNDS") or (20 if DEVICE == "cuda" else 5))
MEASURE_CPU_MEMORY = os.environ.get("VQVAE_FAST_BENCH_MEMORY") == "1"


def parse_shape(text: str) -> Point:
    """'NxKxD:dtype' (dtype defaults to float32) -> Point."""
    dims, _, dtype = text.strip().partition(":")
    n, k, d = (int(x) for x in dims.lower().split("x"))
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"shape {text!r}: dtype must be one of {sorted(DTYPES)}")
    return Point(n, k, d, dtype)


POINTS = [parse_shape(s) for s in
          (os.environ.get("VQVAE_FAST_BENCH_SHAPES") or (GPU_SHAPES if DEVICE == "cuda" else CPU_SHAPES)).split(",")]


@pytest.fixture(scope="module", autouse=True)
def _only_with_benchmark_only(request):
    if not request.config.getoption("benchmark_only", default=False):
        pytest.skip("benchmark: run with `pytest benchmarks/ --benchmark-only`")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("VQVAE_FAST_BENCH_DEVICE=cuda: no CUDA device here")


@pytest.fixture(scope="module", params=POINTS, ids=lambda p: p.label().replace(" ", "-"))
def point(request):
    return request.param


@pytest.fixture(scope="module")
def inputs(point):
    return make_inputs(point, DEVICE)


@pytest.mark.parametrize("provider_name", all_provider_names())
@pytest.mark.parametrize("task", TASKS)
def test_quantizer(benchmark, point, task, provider_name, inputs):
    available = {p.name: p for p in providers(DEVICE)}
    if provider_name not in available:
        pytest.skip(f"{provider_name} does not run on {DEVICE} on this machine")
    provider = available[provider_name]
    z, codebook = inputs
    needs = provider.nk_bytes_per_element(z.dtype, task) * point.n * point.k
    if needs > 0.7 * available_memory_bytes(DEVICE):
        pytest.skip(f"its N x K matrices need ~{needs / 2**30:.1f} GiB")

    torch._dynamo.reset()  # compiled providers: fresh code, no recompile limit across tests
    fn = provider.make(task)

    def timed(z, codebook):
        result = fn(z, codebook)
        sync(DEVICE)  # GPU work counts until it has finished
        return result

    benchmark.group = f"{task} {point.label()}"
    benchmark.pedantic(timed, args=(z, codebook), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    if DEVICE == "cuda":
        result, peak = run_measuring_peak_cuda(fn, z, codebook)
    else:  # RSS needs a fresh process (a few seconds each): only on request
        result = fn(z, codebook)
        peak = peak_extra_bytes_cpu(point, task, [provider_name]).get(provider_name) if MEASURE_CPU_MEMORY else None
    check = check_result(provider, task, z, codebook, result)
    benchmark.extra_info.update(
        flops=point.flops, gflops=point.flops / benchmark.stats.stats.median / 1e9,
        peak_extra_mib=None if peak is None else peak / 2**20, **check)
    if check:
        assert check["worst_excess"] <= check["rtol"], (
            f"{provider_name} chose codes farther than the nearest: excess {check['worst_excess']:.3g} of the "
            f"scale > {check['rtol']:g} ({100 * check['inexact_fraction']:.1f}% of sampled rows inexact)")
        if task == "backward":
            assert check["grad_error"] <= check["grad_rtol"], (
                f"{provider_name} gradients off by {check['grad_error']:.3g} (allowed {check['grad_rtol']:g})")
