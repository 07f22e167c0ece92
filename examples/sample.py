#!/usr/bin/env python
"""Sample images of chosen classes from a trained prior (examples/train_prior.py).

    python examples/sample.py --prior runs/prior/checkpoint.pt --per-class 10 --out runs/samples

`--help` lists the settings; the command is vqvae_fast.train.cli.sample.
"""
from __future__ import annotations

import sys

from vqvae_fast.train.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
