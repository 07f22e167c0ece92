"""vqvae_fast: a fused nearest-codebook vector quantizer for VQ-VAEs, and the model around it.

Layers, each importing only those below it (tests/test_layout.py checks):
    vqvae_fast.ops                  the kernels, registered as torch custom ops
    functional, reference, vector_quantizer, residual, residual_quantizer, distributed,
    checkpoint (files)              the library
    vqvae_fast.models               VQ-VAE, VQ-VAE-2, the code prior, the sample classifier
    vqvae_fast.train                the training loop and the commands' work (examples/ are thin CLIs)
"""
from __future__ import annotations

from . import _extension
from .checkpoint import CheckpointError
from .functional import (BACKENDS, InputError, QuantizeOutput, QuantizeStats, nearest_code, quantize,
                         quantize_with_code_stats)
from .models import VQVAE, VQVAE2, load_checkpoint
from .residual import ResidualQuantizeOutput, residual_decode, residual_nearest_code, residual_quantize
from .residual_quantizer import ResidualVectorQuantizer, RVQOutput
from .vector_quantizer import VectorQuantizer, VQOutput

__all__ = [
    "BACKENDS",
    "CheckpointError",
    "InputError",
    "QuantizeOutput",
    "QuantizeStats",
    "RVQOutput",
    "ResidualQuantizeOutput",
    "ResidualVectorQuantizer",
    "VQVAE",
    "VQVAE2",
    "VQOutput",
    "VectorQuantizer",
    "load_checkpoint",
    "nearest_code",
    "quantize",
    "quantize_with_code_stats",
    "residual_decode",
    "residual_nearest_code",
    "residual_quantize",
]
__version__ = "0.1.0"
