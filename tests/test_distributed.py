"""Two processes over gloo on the CPU: the codebook stays identical on every rank, DDP training
matches a single process fed the same global batches, and a failing rank never hangs the run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqvae_fast import VectorQuantizer
from vqvae_fast.train.cifar10 import parse_args, train
from vqvae_fast.vector_quantizer import kmeans

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
TINY = ["--batch-size", "16", "--num-codes", "16", "--code-dim", "8", "--channels", "16", "--res-channels", "8",
        "--res-blocks", "1", "--eval-every", "3", "--eval-images", "40", "--quiet", "--no-download"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch build has no gloo backend")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _rank_batches(rank: int) -> list[torch.Tensor]:
    """Different data on each rank: different sizes, an offset per rank, one empty batch on rank 1."""
    g = torch.Generator().manual_seed(100 + rank)
    sizes = [40 + 7 * rank, 40 + 7 * rank, 0 if rank == 1 else 30, 33, 35, 37]
    return [torch.randn(n, 4, generator=g) + rank for n in sizes]


def _quantizer_worker(rank: int, port: int, out: str) -> None:
    _env(rank, port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    # k-means init from the vectors of both ranks, computed once and broadcast
    torch.manual_seed(0)
    init_only = VectorQuantizer(16, 4, kmeans_init=True, backend="cpu")
    init_only.init_codebook(_rank_batches(rank)[0], synced=True)
    # a forced restart of five codes: refilled from the vectors of both ranks
    torch.manual_seed(7)
    restart = VectorQuantizer(16, 4, restart_dead=True, backend="cpu")
    restart.usage[:5] = -10.0  # dead after the step whatever it uses: restarted at its end
    restart(_rank_batches(rank)[1])
    # a training run: k-means init, EMA, restarts (some forced), an empty batch on one rank
    torch.manual_seed(rank)  # different RNG states: the synced draws must not depend on them
    vq = VectorQuantizer(16, 4, kmeans_init=True, restart_dead=True, ema_decay=0.8, backend="cpu")
    states, stats = [], []
    for step, x in enumerate(_rank_batches(rank)):
        if step == 3:
            vq.usage[:5] = 0.0  # force five dead codes on every rank
        out_ = vq(x)
        states.append({k: v.clone() for k, v in vq.state_dict().items()})
        stats.append((float(out_.perplexity), int(out_.codes_used)))
    # seeds and restarts drawn by weight (a residual stage's): odd rows only, every code restarted
    torch.manual_seed(rank)
    weighted = VectorQuantizer(8, 4, kmeans_init=True, kmeans_iters=0, restart_dead=True, dead_threshold=1e9,
                               backend="cpu")
    x = _rank_batches(rank)[4]
    odd = (torch.arange(x.shape[0]) % 2).float()
    weighted.init_codebook(x, synced=True, weights=odd)  # k-means seeds on rank 0 from both ranks' rows
    seeded = weighted.codebook.detach().clone()
    weighted(x, seed_weights=odd)
    torch.save({"init": init_only.codebook.detach().clone(), "restart": restart.codebook.detach().clone(),
                "seeded": seeded, "weighted": weighted.codebook.detach().clone(), "states": states, "stats": stats},
               Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_codebook_state_is_identical_on_every_rank(tmp_path):
    mp.spawn(_quantizer_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for step, (a, b) in enumerate(zip(ranks[0]["states"], ranks[1]["states"])):
        for name in a:
            assert torch.equal(a[name], b[name]), f"step {step}: {name} differs between ranks"
    assert ranks[0]["stats"] == ranks[1]["stats"]  # usage statistics are global
    # k-means ran on the vectors of both ranks, with rank 0's random draws
    torch.manual_seed(0)
    VectorQuantizer(16, 4, kmeans_init=True, backend="cpu")  # the same draws as rank 0 before k-means
    both = torch.cat([_rank_batches(0)[0], _rank_batches(1)[0]])
    torch.testing.assert_close(ranks[0]["init"], kmeans(both, 16, 10, "cpu"), rtol=1e-6, atol=1e-6)
    assert torch.equal(ranks[0]["init"], ranks[1]["init"])
    # the forced restart moved code k onto a vector of rank k % 2, the same on both ranks; no other code moved
    assert torch.equal(ranks[0]["restart"], ranks[1]["restart"])
    for k in range(5):
        source = _rank_batches(k % WORLD)[1]
        assert (source == ranks[0]["restart"][k]).all(1).any(), f"code {k} is not a vector of rank {k % WORLD}"
    torch.manual_seed(7)
    untouched = VectorQuantizer(16, 4, restart_dead=True, backend="cpu").codebook.detach()
    assert torch.equal(ranks[0]["restart"][5:], untouched[5:])
    # weighted draws: the same on both ranks; seeds odd rows of either rank, restart k an odd row of rank k % 2
    assert torch.equal(ranks[0]["seeded"], ranks[1]["seeded"])
    odd_rows = torch.cat([_rank_batches(r)[4][1::2] for r in range(WORLD)])
    assert all(bool((odd_rows == code).all(1).any()) for code in ranks[0]["seeded"]), "a seed on a zero-weight row"
    assert torch.equal(ranks[0]["weighted"], ranks[1]["weighted"])
    for k, code in enumerate(ranks[0]["weighted"]):
        matches = (_rank_batches(k % WORLD)[4] == code).all(1).nonzero()[:, 0]
        assert len(matches) > 0 and bool((matches % 2 == 1).all()), f"code {k}: rows {matches.tolist()}"


def _trainer_worker(rank: int, port: int, data_dir: str, out: str, resume: bool = False) -> None:
    _env(rank, port)
    if resume:
        args, checkpoint = parse_args(["--resume", str(Path(out) / "checkpoint.pt"), "--steps", "9"])
    else:
        args, checkpoint = parse_args(["--data-dir", data_dir, "--steps", "6", "--out", out, *TINY])

    def check_identical(model):
        flat = torch.cat([t.detach().reshape(-1).double() for t in model.state_dict().values()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        torch.save({"identical": all(torch.equal(gathered[0], g) for g in gathered), "state": model.state_dict()},
                   Path(out) / f"rank{rank}.pt")

    train(args, checkpoint, on_finish=check_identical)


def test_ddp_training_matches_one_process_and_ranks_agree(toy_cifar, tmp_path):
    ddp_out = tmp_path / "ddp"
    mp.spawn(_trainer_worker, args=(free_port(), str(toy_cifar), str(ddp_out)), nprocs=WORLD, join=True)
    ranks = [torch.load(ddp_out / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["identical"] and ranks[1]["identical"], "weights or codebook differ between ranks"
    assert (ddp_out / "checkpoint.pt").is_file() and (ddp_out / "final.json").is_file()
    assert len((ddp_out / "metrics.jsonl").read_text().splitlines()) == 2  # steps 3 and 6, rank 0 alone

    single = {}
    args, _ = parse_args(["--data-dir", str(toy_cifar), "--steps", "6", "--out", str(tmp_path / "one"), *TINY])
    train(args, on_finish=lambda model: single.update(model.state_dict()))
    for name, value in single.items():
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)

    # --resume under DDP: every rank loads the checkpoint and the run goes on to step 9
    mp.spawn(_trainer_worker, args=(free_port(), str(toy_cifar), str(ddp_out), True), nprocs=WORLD, join=True)
    ranks = [torch.load(ddp_out / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["identical"] and ranks[1]["identical"]
    steps = [json.loads(line)["step"] for line in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6, 9]


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_whole_run_with_an_error(toy_cifar, tmp_path, how):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
               str(free_port()), str(REPO / "tests/helpers/ddp_fail.py"), "--data-dir", str(toy_cifar),
               "--steps", "20", "--out", str(tmp_path), "--dist-timeout", "30", *TINY]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DDP_FAIL": how})
    assert done.returncode != 0, done.stdout + done.stderr
    assert time.monotonic() - start < 120
    assert ("rank 1 fails on purpose" if how == "raise" else "Signal 9") in done.stderr, done.stderr[-3000:]
