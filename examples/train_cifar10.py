#!/usr/bin/env python
"""Train a VQ-VAE (or the two-level VQ-VAE-2, `--model vqvae2`) on CIFAR-10.

    python examples/train_cifar10.py --data-dir ../shared/data/cifar-10-subset/cifar-10-batches-py \
        --steps 300 --batch-size 128 --out runs/default

Writes OUT/metrics.jsonl (one line per evaluation), OUT/final.json, OUT/recon.png (test images
above their reconstructions) and OUT/checkpoint.pt (for --resume and vqvae_fast.load_checkpoint).
`--recipe plain` trains the classic VQ-VAE (cdist lookup, uniform codebook init, no restarts,
no EMA) with everything else equal, for comparison. The work is done by vqvae_fast.train.cifar10.
"""
from __future__ import annotations

import sys

from vqvae_fast.train.cifar10 import main

if __name__ == "__main__":
    sys.exit(main())
