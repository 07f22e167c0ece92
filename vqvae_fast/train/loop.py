"""The training loop every trainer here shares (VQ-VAE, prior), and its small helpers.

A trainer describes its job as a `Task` (how to cut a batch, the loss, the evaluation, what
to write at each evaluation); `fit` runs the loop with the same habits for all of them:
a tqdm progress bar, one `metrics.jsonl` line per evaluation, an atomic checkpoint after each
(written by the caller's `save`, with train/checkpoint.py), exact `--resume` (model, optimizer,
step, RNG states), bf16 autocast, and host syncs only when logging.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..distributed import Run, mean_over_ranks


class EpochOrder:
    """Shuffle order and flip decisions of each epoch, a pure function of (seed, epoch).

    Resuming needs no data-loader state: step s always sees the same items.
    """

    def __init__(self, seed: int, num_items: int, device: torch.device):
        self.seed, self.num_items, self.device = seed, num_items, device
        self.epoch = None

    def get(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.num_items, generator=generator)
            flip = torch.rand(self.num_items, generator=generator) < 0.5
            self.perm, self.flip = perm.to(self.device), flip.to(self.device)  # one copy per epoch
            self.epoch = epoch
        return self.perm, self.flip

    def rows(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(item indices, flip flags) of global step `step`, epochs of num_items // batch_size steps."""
        epoch, position = divmod(step, max(1, self.num_items // batch_size))
        perm, flip = self.get(epoch)
        rows = slice(position * batch_size, (position + 1) * batch_size)
        return perm[rows], flip[rows]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where there is none (None, a switch) or the help
    already says what it is."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_device_and_seed(parser: argparse.ArgumentParser, seed: str = "seed of the weights and the data order") -> None:
    """The --device and --seed flags every command shares."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="'auto': CUDA when available")
    parser.add_argument("--seed", type=int, default=0, help=seed)


class NoEmptyFolderLeft:
    """`with NoEmptyFolderLeft(out):` a command that fails (an exception, or `failed()` called)
    removes `out` if it created it and left it empty: a mistake leaves nothing behind."""

    def __init__(self, folder: Path):
        self.created = []  # the folder and its missing parents, innermost first
        folder = Path(folder).absolute()
        while not folder.exists() and folder != folder.parent:
            self.created.append(folder)
            folder = folder.parent
        self.ok = True

    def failed(self) -> None:
        self.ok = False

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is not None or not self.ok:
            for folder in self.created:
                if not folder.is_dir() or any(folder.iterdir()):
                    break
                folder.rmdir()
        return False


_TORCH_THREADS = torch.get_num_threads()  # torch's own default, before any trainer changed it


def _read_cpu_times() -> dict[int, tuple[int, int]] | None:
    """{cpu: (busy, total) jiffies} from /proc/stat, or None where there is none (not Linux)."""
    try:
        with open("/proc/stat") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
            total = user + nice + system + idle + iowait + irq + softirq + steal
            times[int(name[3:])] = (total - idle - iowait, total)  # steal counts as busy: not ours to use
    return times


def busy_cores(cpus: set[int], interval: float = 0.2) -> float:
    """How many of `cpus` other processes keep busy: their CPU time over `interval` seconds
    (/proc/stat, this process's own time taken off), or where there is no /proc/stat the 1-minute
    load average, spread evenly over the machine's CPUs."""
    before = _read_cpu_times()
    if before is None or not cpus <= before.keys():
        return os.getloadavg()[0] * len(cpus) / max(len(cpus), os.cpu_count() or 1)
    own, start = time.process_time(), time.perf_counter()
    time.sleep(interval)
    after, own, wall = _read_cpu_times(), time.process_time() - own, time.perf_counter() - start
    busy = sum(after[c][0] - before[c][0] for c in cpus)
    total = sum(after[c][1] - before[c][1] for c in cpus)
    return max(0.0, len(cpus) * busy / max(total, 1) - own / max(wall, 1e-9))


def set_cpu_threads(workers: int) -> int:
    """Set torch's CPU threads for a trainer and return their number: `workers` when > 0, else
    OMP_NUM_THREADS when set (torchrun sets 1), else the cores other processes leave free, at
    least 1 and at most torch's default; one line says so when that is fewer than torch's default.

    Why: a parallel region waits for its slowest thread, and a thread that shares its core with
    another process is the slowest by far. On 2 cores with other jobs running, 2 threads made a
    quantizer step's scatter_add_ 150 ms against 1.6 ms with 1 thread (issue 22)."""
    if workers <= 0 and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        workers = int(os.environ["OMP_NUM_THREADS"])
    if workers <= 0:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        busy = busy_cores(cpus)
        workers = max(1, min(_TORCH_THREADS, len(cpus) - math.floor(busy + 0.5)))
        if workers < _TORCH_THREADS:
            print(f"CPU threads: {workers} of {_TORCH_THREADS}: other processes keep {busy:.1f} of the "
                  f"{len(cpus)} cores busy (--workers N sets the number)", flush=True)
    torch.set_num_threads(workers)
    return workers


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return torch.device(name)


class Task:
    """One training job, as `fit` sees it. Subclasses set `stat_names` and implement the methods."""

    stat_names: tuple[str, ...] = ("loss",)  # what `loss` returns next to the loss, averaged for the logs
    items_name: str = "images"  # what a step consumes, for the throughput field `<items_name>_per_s`
    items_per_step: int = 1
    steps_per_epoch: int = 1

    def batch(self, step: int):
        """The batch of global step `step` (a pure function of the step: resuming is exact)."""
        raise NotImplementedError

    def loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to minimise, 0-dim float tensors of `stat_names` stacked): run under autocast."""
        raise NotImplementedError

    def progress(self, stats: dict) -> dict:
        """The progress bar's postfix from the averaged stats."""
        return {name: f"{value:.4f}" for name, value in stats.items()}

    def log_fields(self, stats: dict) -> dict:
        """The metrics line's training fields from the averaged stats."""
        return {f"train_{name}": value for name, value in stats.items()}

    def evaluate(self, final: bool) -> dict:
        """Held-out metrics (floats); `final`: the last evaluation, on everything."""
        return {}

    def on_eval(self, step: int, final: bool) -> None:
        """Called after each evaluation (write sample grids, say)."""


@dataclass
class FitResult:
    step: int
    metrics: dict  # the last evaluation
    wall_s: float  # all of the run's invocations together
    items_per_s: float  # this invocation, evaluations excluded


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of the learning rate at `steps`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep only the metrics lines of steps <= `step` (the checkpoint a run resumes from): a run
    that died between writing a metrics line and its checkpoint must not log those steps twice."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # a torn last line from a crash mid-write
            continue
    if kept != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def fit(task: Task, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, steps: int, out_dir: Path,
        save: Callable[[int, float], None], device: torch.device, eval_every: int = 100, log_every: int = 10,
        amp: bool = False, quiet: bool = False, desc: str = "train", start_step: int = 0,
        elapsed_before: float = 0.0, scheduler=None, run: Run = Run()) -> FitResult:
    """Train from `start_step` to `steps`; every `eval_every` steps (and at the end) append a line to
    out_dir/metrics.jsonl and, except at the end (the caller saves the final state), call
    save(step, elapsed_s). `scheduler`, if given, steps after every optimizer step.

    Under torchrun (`run.distributed`) every rank trains its shard and the training statistics
    are averaged over ranks at each evaluation (a collective all ranks reach at the same step);
    evaluation, metrics, checkpoints and the progress bar are rank 0's alone, with no collective
    inside them. `metrics` of the result are then rank 0's; other ranks get {}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if run.is_main:
        drop_metrics_after(out_dir / "metrics.jsonl", start_step)
    n_stats = len(task.stat_names)
    log_sums = torch.zeros(n_stats, device=device)  # running sums on the device: read only when logging
    eval_sums = torch.zeros(n_stats, device=device)
    log_count = eval_count = 0
    step, start_time = start_step, time.perf_counter()
    eval_seconds, metrics = 0.0, None
    progress = tqdm(total=steps, initial=step, disable=quiet or not run.is_main, desc=desc, unit="step",
                    dynamic_ncols=True)
    model.train()
    while step < steps:
        batch = task.batch(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, stats = task.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        step += 1
        stats = stats.detach().float()
        log_sums += stats
        eval_sums += stats
        log_count, eval_count = log_count + 1, eval_count + 1
        progress.update(1)
        if step % log_every == 0 or step == steps:
            progress.set_postfix(task.progress(dict(zip(task.stat_names, (log_sums / log_count).tolist()))))
            log_sums.zero_()
            log_count = 0
        final = step == steps
        if step % eval_every == 0 or final:
            eval_start = time.perf_counter()
            train_stats = dict(zip(task.stat_names, mean_over_ranks(eval_sums / eval_count, run).tolist()))
            eval_sums.zero_()
            eval_count = 0
            if not run.is_main:  # rank 0 evaluates, logs and saves; the others go on training
                eval_seconds += time.perf_counter() - eval_start
                continue
            metrics = task.evaluate(final)
            wall = time.perf_counter() - start_time
            line = {"step": step, "epoch": round(step / task.steps_per_epoch, 3), **task.log_fields(train_stats),
                    **metrics, "elapsed_s": elapsed_before + wall,
                    f"{task.items_name}_per_s": (step - start_step) * task.items_per_step
                    / max(wall - eval_seconds, 1e-9)}
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            if not final:
                save(step, elapsed_before + wall)
            task.on_eval(step, final)
            eval_seconds += time.perf_counter() - eval_start
            model.train()
    progress.close()
    if metrics is None and run.is_main:  # nothing trained in this invocation
        metrics = task.evaluate(True)
    train_seconds = time.perf_counter() - start_time - eval_seconds
    return FitResult(step, metrics or {}, elapsed_before + time.perf_counter() - start_time,
                     (step - start_step) * task.items_per_step / max(train_seconds, 1e-9))
