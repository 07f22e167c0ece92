"""vqvae_fast: a fused nearest-codebook vector quantizer for VQ-VAEs, and the model around it."""
from __future__ import annotations

from . import _extension
from .functional import (BACKENDS, InputError, QuantizeOutput, QuantizeStats, nearest_code, quantize,
                         quantize_with_code_stats)
from .model import VQVAE, VQVAE2, load_checkpoint
from .training import CheckpointError
from .vector_quantizer import VectorQuantizer, VQOutput

__all__ = [
    "BACKENDS",
    "CheckpointError",
    "InputError",
    "QuantizeOutput",
    "QuantizeStats",
    "VQVAE",
    "VQVAE2",
    "VQOutput",
    "VectorQuantizer",
    "load_checkpoint",
    "nearest_code",
    "quantize",
    "quantize_with_code_stats",
]
__version__ = "0.1.0"
