"""Run by tests/test_distributed.py under torchrun: the trainer, with rank 1 failing at step 3,
by raising (DDP_FAIL=raise) or by dying on SIGKILL (DDP_FAIL=kill), as a crashed process does."""
import os
import signal
import sys

from vqvae_fast.train import cifar10 as trainer
from vqvae_fast.train import reconstruction

original_batch = reconstruction.ReconstructionTask.batch


def failing_batch(self, step):
    if step == 3 and os.environ.get("RANK") == "1":
        if os.environ.get("DDP_FAIL") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("rank 1 fails on purpose")
    return original_batch(self, step)


reconstruction.ReconstructionTask.batch = failing_batch
sys.exit(trainer.main())
