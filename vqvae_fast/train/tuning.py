"""Bayesian hyper-parameter search over the CIFAR-10 trainer's settings, with Optuna (TPE).

Each trial is one `vqvae_fast.train.cifar10.train` run on the training images minus a validation
split (`--val-images`, the same images for every trial); it reports the validation PSNR at every
evaluation, where the pruner may stop it. The study lives in an Optuna storage (by default a
SQLite file in the output folder), so running the same search again adds trials to it, and
several processes given the same storage share one study. Optuna is the optional extra
`pip install -e .[tune]`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import shlex
import time
import warnings
from pathlib import Path
from typing import Callable

from .cifar10 import TrainConfig, parse_args, train

INSTALL_HINT = ("the search needs Optuna: pip install optuna matplotlib  (the extra .[tune] names the same two, "
                "but pip install -e .[tune] also recompiles vqvae_fast's C++ library)")

# name: (trainer flag, how to draw it). Floats on a log scale where their effect is multiplicative.
SEARCH_SPACE: dict[str, tuple[str, Callable]] = {
    "lr": ("--lr", lambda t: t.suggest_float("lr", 3e-4, 6e-3, log=True)),
    "lr_schedule": ("--lr-schedule", lambda t: t.suggest_categorical("lr_schedule", ["constant", "cosine"])),
    "beta": ("--beta", lambda t: t.suggest_float("beta", 0.05, 1.0, log=True)),
    "ema_decay": ("--ema-decay", lambda t: t.suggest_float("ema_decay", 0.7, 0.99)),
    "dead_threshold": ("--dead-threshold", lambda t: t.suggest_float("dead_threshold", 0.005, 0.5, log=True)),
    "code_dim": ("--code-dim", lambda t: t.suggest_categorical("code_dim", [16, 32, 64, 128])),
    "num_codes": ("--num-codes", lambda t: t.suggest_categorical("num_codes", [256, 512, 1024, 2048, 4096, 8192])),
    # Up to 176: the convolutions' cost grows as width squared, and a new default may cost at
    # most 1.25x the old one's (160) wall time.
    "channels": ("--channels", lambda t: t.suggest_categorical("channels", [96, 128, 160, 176])),
    "res_channels": ("--res-channels", lambda t: t.suggest_categorical("res_channels", [64, 128])),
    "activation": ("--activation", lambda t: t.suggest_categorical("activation", ["relu", "silu"])),
    "gradient": ("--gradient", lambda t: t.suggest_categorical("gradient", ["ste", "rotation"])),
}


class TuningUnavailable(RuntimeError):
    """Optuna (or its plotting backend) is not installed."""


def import_optuna():
    try:
        import optuna
    except ImportError as error:
        raise TuningUnavailable(INSTALL_HINT) from error
    return optuna


def trial_flags(params: dict) -> list[str]:
    """The trainer flags of a set of searched values."""
    flags = []
    for name, value in params.items():
        flags += [SEARCH_SPACE[name][0], str(value)]
    return flags


def study_config(data_dir: str, steps: int, val_images: int, fixed_flags: list[str],
                 evaluations: int = 5) -> TrainConfig:
    """The settings every trial shares: the trainer's defaults, the tuner's trailing trainer
    flags (`fixed_flags`, parsed once: a bad one fails before any trial), and the study's
    length, validation split and quiet evaluations."""
    config, _ = parse_args(["--data-dir", data_dir, *fixed_flags])
    return dataclasses.replace(config, no_download=True, steps=steps, epochs=None, val_images=val_images,
                               eval_every=max(1, steps // evaluations), eval_images=val_images, quiet=True)


class Objective:
    """One trial: draw the searched settings, train on the training split, report validation PSNR."""

    def __init__(self, base: TrainConfig, out_dir: Path, searched: list[str]):
        self.base, self.out_dir, self.searched = base, out_dir, searched
        self.steps, self.eval_every = base.steps, base.eval_every

    def trainer_config(self, params: dict, out: Path) -> TrainConfig:
        return dataclasses.replace(self.base, out=str(out), **params)

    def __call__(self, trial) -> float:
        optuna = import_optuna()
        params = {name: SEARCH_SPACE[name][1](trial) for name in self.searched}

        def report(step: int, metrics: dict) -> None:
            trial.set_user_attr("last_step", step)
            if step < self.steps:  # the final evaluation is the trial's value, not an intermediate one
                trial.report(metrics["val_psnr"], step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step}: {metrics['val_psnr']:.2f} dB")

        final = train(self.trainer_config(params, self.out_dir / "trials" / f"{trial.number:04d}"), report=report)
        for key in ("codes_used", "perplexity", "wall_s"):
            trial.set_user_attr(key, final[key])
        return final["val_psnr"]


def progress_line(study, trial) -> str:
    """One line per finished trial: its state and value, the best so far, its settings."""
    value = f"{trial.value:.2f} dB" if trial.value is not None else "-"
    state = trial.state.name.lower()
    if state == "pruned":
        state += f" at step {trial.user_attrs.get('last_step', '?')}"
    try:
        best = f"best {study.best_value:.2f} dB (trial {study.best_trial.number})"
    except ValueError:  # no complete trial yet
        best = "no complete trial yet"
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    settings = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    return f"trial {trial.number}: {state}, {value} in {seconds:.0f} s; {best} | {settings}"


def reproduce_command(data_dir: str, steps: int, fixed_flags: list[str], params: dict) -> str:
    """The train_cifar10.py command that trains the best settings on all training images."""
    argv = ["python", "examples/train_cifar10.py", "--data-dir", data_dir, "--steps", str(steps), *fixed_flags,
            *trial_flags(params), "--out", "runs/best"]
    return shlex.join(argv)


def write_trials_csv(study, path: Path) -> None:
    names = sorted({name for trial in study.trials for name in trial.params})
    attrs = ["codes_used", "perplexity", "wall_s", "last_step"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", "state", "val_psnr", "duration_s", *names, *attrs])
        for trial in study.trials:
            duration = trial.duration.total_seconds() if trial.duration else ""
            writer.writerow([trial.number, trial.state.name, "" if trial.value is None else trial.value, duration,
                             *(trial.params.get(n, "") for n in names), *(trial.user_attrs.get(a, "") for a in attrs)])


def write_plots(study, out_dir: Path) -> list[str]:
    """optimization_history.png and param_importances.png; returns what could not be drawn and why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optuna = import_optuna()
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    notes = []
    for name, draw in (("optimization_history", optuna.visualization.matplotlib.plot_optimization_history),
                       ("param_importances", optuna.visualization.matplotlib.plot_param_importances)):
        try:
            axes = draw(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:  # e.g. fewer than 2 complete trials
            notes.append(f"{name}.png not drawn: {error}")
            continue
        axes.figure.set_size_inches(8, 5)
        axes.figure.tight_layout()
        axes.figure.savefig(out_dir / f"{name}.png", dpi=100)
        plt.close(axes.figure)
    return notes


def run_study(data_dir: str, out_dir: Path, *, trials: int | None, steps: int, timeout: float | None = None,
              storage: str | None = None, study_name: str = "vqvae_cifar10", val_images: int = 1000,
              searched: list[str] | None = None, fixed_flags: list[str] | None = None, sampler_seed: int | None = None,
              pruner=None, first: list[dict] | None = None, log: Callable[[str], None] = print) -> dict:
    """Add `trials` trials (or run until `timeout` seconds) to the study in `storage`, then write
    best.json, trials.csv and the plots into out_dir; returns best.json's content. A new study
    starts with the trainer's defaults, then the changes to them listed in `first` (each a dict
    of searched settings), then TPE's own draws."""
    optuna = import_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial instead
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    searched = list(SEARCH_SPACE) if searched is None else searched
    fixed_flags = fixed_flags or []
    unknown = sorted(set(searched) - set(SEARCH_SPACE))
    if unknown:
        raise ValueError(f"unknown search parameters {unknown}; choose from {sorted(SEARCH_SPACE)}")
    objective = Objective(study_config(data_dir, steps, val_images, fixed_flags), out_dir, searched)
    # Median pruning from the third evaluation on (60% of the steps at the default five): an early
    # evaluation says little, and faster learning rates start lower and finish higher.
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2 * objective.eval_every + 1)
    study = optuna.create_study(study_name=study_name, storage=storage, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=sampler_seed), pruner=pruner)
    before = len(study.trials)
    if before == 0:  # the trainer's defaults go first: the baseline every trial is measured against
        defaults = {name: getattr(objective.base, name) for name in searched}
        for change in [{}] + list(first or []):
            unknown = sorted(set(change) - set(searched))
            if unknown:
                raise ValueError(f"starting point {change} sets {unknown}, which are not searched")
            study.enqueue_trial({**defaults, **change})
    log(f"study {study_name!r} in {storage}: {before} trials so far; adding "
        f"{trials if trials is not None else 'as many as fit'} trials of {steps} steps"
        + (f" within {timeout:.0f} s" if timeout else ""))
    start = time.time()
    study.optimize(objective, n_trials=trials, timeout=timeout, catch=(),
                   callbacks=[lambda s, t: log(progress_line(s, t))])
    write_trials_csv(study, out_dir / "trials.csv")
    for note in write_plots(study, out_dir):
        log(note)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"no trial of the study completed ({len(study.trials)} trials, all pruned or failed)")
    best = study.best_trial
    result = {"study": study_name, "storage": storage, "trials": len(study.trials), "complete": len(complete),
              "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
              "steps": steps, "val_images": val_images, "best_trial": best.number, "val_psnr": best.value,
              "params": best.params, **{k: best.user_attrs.get(k) for k in ("codes_used", "perplexity", "wall_s")},
              "command": reproduce_command(data_dir, steps, fixed_flags, best.params),
              "this_run_s": time.time() - start}
    (out_dir / "best.json").write_text(json.dumps(result, indent=2) + "\n")
    log(f"best: trial {best.number}, {best.value:.2f} dB on {val_images} validation images; "
        f"{len(study.trials) - before} trials added ({len(study.trials)} in the study) -> {out_dir}\n"
        f"reproduce: {result['command']}")
    return result
