#!/usr/bin/env python
"""Bayesian hyper-parameter search (Optuna TPE, median pruning) for the CIFAR-10 VQ-VAE trainer.

    python examples/tune_cifar10.py --data-dir DIR --out runs/tune --trials 30 --steps 300

`--help` lists the settings; the command is vqvae_fast.train.cli.tune_cifar10.
"""
from __future__ import annotations

import sys

from vqvae_fast.train.cli.tune_cifar10 import main

if __name__ == "__main__":
    sys.exit(main())
