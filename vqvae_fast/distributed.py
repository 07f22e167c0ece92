"""Multi-process training with torchrun: the process group, and the rules that keep it from hanging.

`torchrun --nproc_per_node=N script.py ...` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous
variables; `start` turns them into a process group (NCCL on GPUs, gloo on CPUs) whose collectives
time out after `timeout_s`, so a rank that died or stalls makes the others raise instead of
waiting forever, and torchrun's agent then stops the whole run with an error. Without those
variables everything here is a no-op and the run is a plain single process.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Run:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device, timeout_s: float = 600.0) -> tuple[Run, torch.device]:
    """Join the process group torchrun describes (if any); returns the run and this rank's device."""
    if not launched_by_torchrun():
        return Run(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices here")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Run(rank, world, local_rank), device


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(x: torch.Tensor, run: Run) -> torch.Tensor:
    """x averaged over the ranks (every rank must call it at the same point)."""
    if not run.distributed:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / run.world


def ddp_without_buffer_sync() -> dict:
    """DistributedDataParallel's keyword that stops it broadcasting buffers in forward (the
    quantizers keep theirs in step themselves): `forward_sync_buffers=False` where torch has it
    (2.13+, which deprecates `broadcast_buffers` with a FutureWarning on every rank), else
    `broadcast_buffers=False`. Buffers are equal at the start on every rank (same seed), so the
    newer keyword's sync at construction changes nothing."""
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}
