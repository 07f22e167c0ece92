"""The rounded bf16 scan (csrc/cpu/settle.cpp, RoundedBf16Scan) on two kinds of codebook.

The scan scores centred rows x and codes c = -2 (e - mu) rounded to bf16; the rounding moves a
score by at most ||x|| max_k ||c_k - c^_k|| + ||x - x^|| max_k ||c^_k||, so every code whose
rounded score is within twice that of the row's best is a candidate. The scan settles rows with
one or two from their exact distances and hands the rest back to the float scan.

Counts, in float64, the share of rows with at least 2, 3 and 4 candidates (the float
accumulation term, ~1e-6 of these, left out), for Gaussian codebooks and for k-means-like ones
(means of 8 Gaussian points after 5 k-means steps: shorter codes, closer together); with
--time, also times nearest_code (N = 16384, 1 thread, median of 5) with the float scan forced,
the rounded scan forced and unforced (which gives way to the float scan after its first block
where that hands back too many rows).

    python benchmarks/rounded_scan.py            # the tables in benchmarks/RESULTS.md
    python benchmarks/rounded_scan.py --time     # plus the timings (CPUs with AVX512-BF16)
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

SHAPES = ((32, 4096), (64, 1024), (128, 512), (256, 1024), (8, 8192))


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


def candidate_shares(z: torch.Tensor, codebook: torch.Tensor, at_least=(2, 3, 4)) -> list[float]:
    mu = codebook.mean(0)
    x, c = z - mu, -2 * (codebook - mu)
    xr, cr = bf16(x), bf16(c)
    scores = ((codebook - mu) ** 2).sum(1)[None] + xr @ cr.T
    bound = x.norm(dim=1) * (c - cr).norm(dim=1).max() + (x - xr).norm(dim=1) * cr.norm(dim=1).max()
    inside = (scores <= scores.min(1).values[:, None] + 2 * bound[:, None]).sum(1)
    return [float((inside >= n).double().mean()) for n in at_least]


def kmeans_codebook(k: int, d: int, generator: torch.Generator, per_code: int = 8, steps: int = 5) -> torch.Tensor:
    data = torch.randn(per_code * k, d, generator=generator, dtype=torch.float64)
    codes = data[:k].clone()
    for _ in range(steps):
        nearest = torch.cdist(data, codes).argmin(1)
        counts = torch.bincount(nearest, minlength=k)[:, None]
        sums = torch.zeros_like(codes).index_add_(0, nearest, data)
        codes = torch.where(counts > 0, sums / counts.clamp_min(1), codes)
    return codes


def time_paths(z: torch.Tensor, codebook: torch.Tensor, calls: int = 5) -> dict[str, float]:
    from vqvae_fast import nearest_code
    times = {}
    for name, forced in (("float scan", "avx512"), ("rounded, forced", "avx512bf16rounded"), ("unforced", "")):
        os.environ["VQVAE_FAST_CPU_SCAN"] = forced
        nearest_code(z, codebook, backend="cpu")
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            nearest_code(z, codebook, backend="cpu")
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples) * 1e3
    os.environ.pop("VQVAE_FAST_CPU_SCAN")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time", action="store_true", help="also time the paths (N = 16384, 1 thread)")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    books = {"Gaussian": lambda k, d: torch.randn(k, d, generator=g, dtype=torch.float64),
             "k-means-like": lambda k, d: kmeans_codebook(k, d, g)}
    print("| codebook | D × K | ≥ 2 | ≥ 3 | ≥ 4 |\n|---|---|---:|---:|---:|")
    made = {}
    for kind, make in books.items():
        for d, k in SHAPES:
            made[kind, d, k] = make(k, d)
            z = torch.randn(args.rows, d, generator=g, dtype=torch.float64)
            shares = candidate_shares(z, made[kind, d, k])
            print(f"| {kind} | {d} × {k} | " + " | ".join(f"{100 * s:.1f} %" for s in shares) + " |")
    if args.time:
        torch.set_num_threads(1)
        print("\n| codebook | N × K × D | float scan ms | rounded, forced ms | unforced ms | float / unforced |")
        print("|---|---|---:|---:|---:|---:|")
        for (kind, d, k), book in made.items():
            if d < 24:
                continue
            z = torch.randn(16384, d, generator=g)
            t = time_paths(z, book.float())
            print(f"| {kind} | 16384 × {k} × {d} | {t['float scan']:.2f} | {t['rounded, forced']:.2f} | "
                  f"{t['unforced']:.2f} | {t['float scan'] / t['unforced']:.2f}× |")


if __name__ == "__main__":
    main()
