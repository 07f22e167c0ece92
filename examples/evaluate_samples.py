#!/usr/bin/env python
"""Score samples: how often a classifier recognises the requested class, and FID.

    python examples/evaluate_samples.py --samples runs/samples/samples.pt \
        --classifier runs/classifier/checkpoint.pt --data-dir ../shared/data/cifar-10-subset/cifar-10-batches-py \
        [--fid] [--vqvae runs/vqvae/checkpoint.pt] --out runs/samples/scores.json

`--help` lists the settings; the command is vqvae_fast.train.cli.evaluate_samples.
"""
from __future__ import annotations

import sys

from vqvae_fast.train.cli.evaluate_samples import main

if __name__ == "__main__":
    sys.exit(main())
