"""The models built on the quantizer: VQ-VAE and VQ-VAE-2 (vqvae.py), the class-conditional
code prior (prior.py) and the sample classifier (classifier.py). They import the quantizer
library below them, never the training code (vqvae_fast.train)."""
from __future__ import annotations

from .classifier import Classifier
from .prior import CodePrior
from .vqvae import VQVAE, VQVAE2, load_checkpoint, model_from_checkpoint, save_checkpoint

__all__ = ["VQVAE", "VQVAE2", "Classifier", "CodePrior", "load_checkpoint", "model_from_checkpoint", "save_checkpoint"]
