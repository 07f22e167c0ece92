#!/usr/bin/env python
"""Train a class-conditional prior over the codes of a trained VQ-VAE (or VQ-VAE-2).

    python examples/train_prior.py --vqvae runs/default/checkpoint.pt \
        --data-dir ../shared/data/cifar-10-subset/cifar-10-batches-py --out runs/prior

Encodes the dataset with the VQ-VAE (OUT/codes.pt), trains a small causal transformer over the
code grids given the class, and writes OUT/metrics.jsonl, OUT/samples.png, OUT/checkpoint.pt (what
examples/sample.py reads) and OUT/final.json. `--help` lists the settings; the work is done by
vqvae_fast.train.prior_trainer, on the same training loop as the VQ-VAE trainer.
"""
from __future__ import annotations

import sys

from vqvae_fast.train.prior_trainer import main

if __name__ == "__main__":
    sys.exit(main())
