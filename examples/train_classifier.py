#!/usr/bin/env python
"""Train a small CIFAR-10 classifier: the yardstick of class-conditional samples.

    python examples/train_classifier.py --data-dir ../shared/data/cifar-10-subset/cifar-10-batches-py \
        --out runs/classifier

`--help` lists the settings; the command is vqvae_fast.train.cli.train_classifier.
"""
from __future__ import annotations

import sys

from vqvae_fast.train.cli.train_classifier import main

if __name__ == "__main__":
    sys.exit(main())
