"""Checks that what was timed computed the right thing, so a fast but wrong kernel cannot win.

Checked on a sample of rows against float64 distances: the chosen code's distance may exceed the
true minimum by at most `rtol` times the row's scale ||z - c||^2 + max_k ||e_k - c||^2 (c: the
codebook mean; the same measure as the project's tests). A random index scores about 0.5 on
random data, so even the loose tolerances of the 16-bit baselines catch a broken search.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from providers import BETA, upstream_weights

SAMPLE_ROWS = 2048  # rows checked per call: enough to catch a wrong kernel, cheap at any K
_CHUNK_ROWS = 512  # float64 distance rows computed at a time (bounds memory at K = 65536)


def index_rtol(kind: str, backend: str | None, dtype: torch.dtype, name: str = "") -> float:
    """Largest allowed excess of the chosen distance over the minimum, relative to the scale."""
    if kind == "ours":
        # The README's guarantees: the CPU kernel re-checks in float64 (exact); the GPU kernels
        # score centred values in fp32 (3xTF32, or exact 16-bit products; fp64 for fp64 input).
        return 1e-12 if backend == "cpu" or dtype == torch.float64 else 2e-5
    if name == "flash-kmeans" and dtype == torch.float32:
        return 1e-2  # flash-kmeans runs fp32 as one TF32 pass (10-bit mantissas)
    # The baselines (and FAISS, which expands ||z||^2 - 2 z.e + ||e||^2 in fp32) round their
    # distances to the input dtype: 16-bit ones often pick a code
    # that is only nearly nearest (measured: up to ~1e-2 in bf16), which is theirs to lose.
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]


def gradient_rtol(dtype: torch.dtype) -> float:
    """Allowed max |grad - expected| relative to max |expected|."""
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]


@dataclass
class IndexCheck:
    worst_excess: float  # largest (chosen - nearest) / scale over the sampled rows
    inexact_fraction: float  # sampled rows whose code is not the exact nearest (beyond 1e-12)
    rows: int

    def as_dict(self) -> dict:
        return dict(worst_excess=self.worst_excess, inexact_fraction=self.inexact_fraction, rows_checked=self.rows)


def sample_rows(n: int, device, limit: int = SAMPLE_ROWS) -> torch.Tensor:
    """Evenly spaced row numbers: deterministic and spread over the whole input."""
    return torch.linspace(0, n - 1, min(n, limit), device=device).round().long()


def check_indices(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                  rows: torch.Tensor | None = None) -> IndexCheck:
    n, k = z.shape[0], codebook.shape[0]
    if indices.shape != (n,) or indices.dtype != torch.int64:
        raise AssertionError(f"indices must be ({n},) int64, got {tuple(indices.shape)} {indices.dtype}")
    if rows is None:
        rows = sample_rows(n, z.device)
    chosen_idx = indices[rows]
    if bool(((chosen_idx < 0) | (chosen_idx >= k)).any()):
        raise AssertionError(f"index out of range [0, {k})")
    # Centred on the codebook mean so the float64 expansion below loses nothing that matters.
    e64 = codebook.detach().double()
    centre = e64.mean(0)
    e_c = e64 - centre
    e_sq = (e_c * e_c).sum(1)
    worst, inexact = 0.0, 0
    for part, part_idx in zip(rows.split(_CHUNK_ROWS), chosen_idx.split(_CHUNK_ROWS)):
        z_c = z.detach()[part].double() - centre
        z_sq = (z_c * z_c).sum(1)
        dist = z_sq[:, None] - 2 * z_c @ e_c.T + e_sq
        excess = (dist.gather(1, part_idx[:, None])[:, 0] - dist.min(1).values) / (z_sq + e_sq.max())
        worst = max(worst, float(excess.max()))
        inexact += int((excess > 1e-12).sum())
    return IndexCheck(worst, inexact / len(rows), len(rows))


def check_gradients(z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, grad_z: torch.Tensor,
                    grad_codebook: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """Worst gradient error of a `providers.training_step`, relative to the largest expected value.

    With upstream weight s on the straight-through output and w on the loss (means over N*D):
    grad z = s + w / (N*D) * 2 beta (z - e[idx]) and grad e_k = w / (N*D) * sum over the rows
    choosing k of 2 (e_k - z).
    """
    if rows is None:
        rows = sample_rows(z.shape[0], z.device)
    output_weight, loss_weight = upstream_weights(z)
    per_element = loss_weight / z.numel()
    z64, e64 = z.detach().double(), codebook.detach().double()
    chosen = e64[indices]
    expected_z = output_weight + per_element * 2 * BETA * (z64[rows] - chosen[rows])
    expected_e = torch.zeros_like(e64).index_add_(0, indices, per_element * 2 * (chosen - z64))
    errors = []
    for got, want in ((grad_z[rows], expected_z), (grad_codebook, expected_e)):
        if got is None or got.shape != want.shape:
            raise AssertionError(f"gradient has shape {None if got is None else tuple(got.shape)}, "
                                 f"expected {tuple(want.shape)}")
        errors.append(float((got.double() - want).abs().max()) / max(float(want.abs().max()), 1e-30))
    return max(errors)
