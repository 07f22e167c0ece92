"""Run by tests/test_distributed.py under torchrun: the trainer, with rank 1 raising at step 3."""
import os
import sys

from vqvae_fast import reconstruction, trainer

original_batch = reconstruction.ReconstructionTask.batch


def failing_batch(self, step):
    if step == 3 and os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1 fails on purpose")
    return original_batch(self, step)


reconstruction.ReconstructionTask.batch = failing_batch
sys.exit(trainer.main())
