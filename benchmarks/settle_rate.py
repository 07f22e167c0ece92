"""How many rows the Triton fp32 search leaves to its exact re-scoring, per first-pass precision.

    python benchmarks/settle_rate.py                       # the default grid, markdown table
    python benchmarks/settle_rate.py --n 4096 --dims 64 256 --codes 1024 16384 --json out.json

The fp32 search scores every code once with tensor-core products (`FP32_PRECISIONS` in
vqvae_fast/ops/triton_plan.py), keeps each row's best and second-best score, and sends
a row to the float64 re-scoring kernel when its second best lies within twice the error bound
(`settle_bound`) of its best. That share of rows is a property of the data and of the bound,
not of the GPU: this script computes it on the CPU with the same operand rounding as the kernel
(centring, fp32, then TF32 or bf16 parts) and the kernel's own bound coefficients; only the
order of the fp32 accumulation differs (the bound covers any order). Two kinds of codebooks:
random Gaussian codes, and codes near the data (a random row of z plus noise, as k-means or
restarts place them; their nearest two are closer, so more rows fall within the bound).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from vqvae_fast.ops import triton_plan as plans


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x (fp32) rounded to the nearest TF32 value, as `_tf32_round` in the kernel."""
    return ((x.view(torch.int32) + 0x1000) & -8192).view(torch.float32)


def _split(x: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's two operand parts (as fp32 values) of x (fp32)."""
    hi = x.bfloat16().float() if precision == "bf16x3" else _tf32(x)
    lo = (x - hi).bfloat16().float() if precision == "bf16x3" else x - hi
    return hi, lo


def scores(z: torch.Tensor, codebook: torch.Tensor, precision: str):
    """(scores (N, K), |x| per row, largest half norm) as the fp32 search computes them."""
    centre = codebook.double().mean(0)
    x, y = (z.double() - centre).float(), (codebook.double() - centre).float()
    half_norm = 0.5 * (y.double() ** 2).sum(1)
    if precision == "tf32":
        dot = _tf32(x) @ _tf32(y).T
    elif precision == "ieee":
        dot = x @ y.T
    else:  # small products first, as _tile_dot
        xh, xl = _split(x, precision)
        yh, yl = _split(y, precision)
        dot = (xl @ yh.T + xh @ yl.T) + xh @ yh.T
    return half_norm.float()[None, :] - dot, x.double().norm(dim=1), float(half_norm.max())


def share_flagged(z: torch.Tensor, codebook: torch.Tensor, precision: str) -> float:
    """The share of rows whose second-best score is within twice the bound of the best."""
    os.environ["VQVAE_FAST_TRITON_FP32_PRECISION"] = precision
    mode = plans.mode_for(torch.float32)
    d_pad = plans.plan_search(z.shape[0], codebook.shape[0], z.shape[1], torch.float32, plans.SM90).d_pad
    rel, norm, absolute = plans.settle_bound(mode, d_pad)
    s, x_norm, largest = scores(z, codebook, precision)
    best_two = s.topk(2, dim=1, largest=False).values.double()
    bound = rel * x_norm * math.sqrt(2 * largest) + norm * largest + absolute
    return float(((best_two[:, 1] - best_two[:, 0]) <= 2 * bound).float().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096, help="rows of z (default 4096)")
    parser.add_argument("--dims", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    parser.add_argument("--codes", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--precisions", nargs="+", default=list(plans.FP32_PRECISIONS),
                        choices=plans.FP32_PRECISIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    previous = os.environ.get("VQVAE_FAST_TRITON_FP32_PRECISION")
    rows = []
    print("| D | K | codebook | " + " | ".join(args.precisions) + " |")
    print("|---:|---:|---|" + "---:|" * len(args.precisions))
    try:
        for d in args.dims:
            for k in args.codes:
                g = torch.Generator().manual_seed(args.seed)
                z = torch.randn(args.n, d, generator=g)
                books = {"random": torch.randn(k, d, generator=g),
                         "near the data": z[torch.randint(args.n, (k,), generator=g)] + 0.3 * torch.randn(k, d, generator=g)}
                for name, codebook in books.items():
                    shares = {p: share_flagged(z, codebook, p) for p in args.precisions}
                    rows.append(dict(n=args.n, d=d, k=k, codebook=name, shares=shares))
                    print(f"| {d} | {k} | {name} | " + " | ".join(f"{100 * shares[p]:.2f} %" for p in args.precisions)
                          + " |", flush=True)
    finally:
        if previous is None:
            os.environ.pop("VQVAE_FAST_TRITON_FP32_PRECISION", None)
        else:
            os.environ["VQVAE_FAST_TRITON_FP32_PRECISION"] = previous
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=" ".join(sys.argv), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
