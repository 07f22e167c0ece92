"""Loads the compiled library `vqvae_fast._C` (the C++ CPU kernels; the GPU kernels are Triton).

Importing `_C` registers the ops `vqvae_fast::nearest_code`, `quantize_fwd` and `quantize_bwd`. If it
cannot load, the package still works through the Triton and reference backends and says
so once.
"""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (libtorch must be loaded before _C)

try:
    from . import _C  # noqa: F401  (registers the ops)

    LOAD_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    LOAD_ERROR = str(error)
    warnings.warn(
        f"vqvae_fast: the compiled extension could not be loaded ({error}); the 'cpu' backend "
        "is unavailable and backend='auto' falls back to 'triton'/'reference'. "
        "Rebuild with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )


def has_compiled() -> bool:
    """True when the C++ library loaded (the 'cpu' backend is available)."""
    return LOAD_ERROR is None


if has_compiled():
    from .ops.registration import register_ops

    register_ops()
