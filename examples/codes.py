#!/usr/bin/env python
"""Images to code grids and back, with a trained VQ-VAE (or VQ-VAE-2).

    python examples/codes.py encode --vqvae runs/default/checkpoint.pt \
        --data-dir ../shared/data/cifar-10-subset/cifar-10-batches-py --out runs/codes.pt
    python examples/codes.py encode --vqvae runs/default/checkpoint.pt --images my_folder --out runs/mine.pt
    python examples/codes.py decode --codes runs/codes.pt --split test --count 64 --out runs/decoded.png

`--help` lists the settings; the command is vqvae_fast.train.cli.codes.
"""
from __future__ import annotations

import sys

from vqvae_fast.train.cli.codes import main

if __name__ == "__main__":
    sys.exit(main())
