"""Bayesian hyper-parameter search (Optuna TPE, median pruning) for the CIFAR-10 VQ-VAE trainer.

    python examples/tune_cifar10.py --data-dir DIR --out runs/tune --trials 30 --steps 300

Each trial trains with vqvae_fast.train.cifar10 (as examples/train_cifar10.py does) on the training
images minus --val-images held out for validation (never the test images). Writes OUT/best.json
(the best settings, their validation PSNR and the train_cifar10.py command that reproduces them),
OUT/trials.csv, OUT/optimization_history.png and OUT/param_importances.png. The study lives in
--storage (default: the SQLite file OUT/study.db): the same command run again adds --trials more,
and several processes given the same storage share the study. Trainer flags after `--` are
fixed for every trial (e.g. `-- --res-blocks 1`). Needs Optuna (`pip install optuna matplotlib`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data import DataNotFoundError, find_cifar10
from ..loop import HelpFormatter, NoEmptyFolderLeft
from ..tuning import SEARCH_SPACE, TuningUnavailable, run_study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a cifar-10-batches-py folder or its parent")
    parser.add_argument("--out", required=True, help="output folder (and the default storage's home)")
    parser.add_argument("--trials", type=int, default=20, help="trials to add to the study in this run")
    parser.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    parser.add_argument("--steps", type=int, default=300, help="training steps per trial")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///OUT/study.db)")
    parser.add_argument("--study-name", default="vqvae_cifar10", help="the study's name in the storage")
    parser.add_argument("--val-images", type=int, default=1000,
                        help="training images held out to score the trials (the same ones every trial)")
    parser.add_argument("--search", default=",".join(SEARCH_SPACE),
                        help=f"comma-separated settings to search, of: {', '.join(SEARCH_SPACE)}")
    parser.add_argument("--seed", type=int, help="the TPE sampler's seed (default: random)")
    parser.add_argument("--first", metavar="JSON",
                        help="a JSON file listing changes to the defaults (dicts of searched settings) that a new "
                             "study tries first, after the defaults themselves")
    parser.add_argument("trainer_flags", nargs=argparse.REMAINDER,
                        help="after `--`: train_cifar10.py flags fixed for every trial")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    fixed = args.trainer_flags[1:] if args.trainer_flags[:1] == ["--"] else args.trainer_flags
    searched = [name for name in args.search.split(",") if name]
    for flag, ok, rule in (("--trials", args.trials >= 1, "must be >= 1"), ("--steps", args.steps >= 1, "must be >= 1"),
                           ("--val-images", args.val_images >= 1, "must be >= 1")):
        if not ok:
            parser.error(f"{flag} {rule}, got {getattr(args, flag[2:].replace('-', '_'))}")
    unknown = sorted(set(searched) - set(SEARCH_SPACE))
    if unknown or not searched:
        parser.error(f"--search: unknown settings {unknown}; choose from {', '.join(SEARCH_SPACE)}" if unknown
                     else "--search names no setting")
    first = None
    if args.first:
        try:
            first = json.loads(Path(args.first).read_text())
        except (OSError, ValueError) as error:
            parser.error(f"--first {args.first}: {error}")
    try:  # the trials never download: say where the images should be before a study is made
        find_cifar10(args.data_dir, download=False, no_download_reason="the tuner never downloads")
    except DataNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with NoEmptyFolderLeft(Path(args.out)):
        try:
            run_study(args.data_dir, Path(args.out), trials=args.trials, steps=args.steps, timeout=args.timeout,
                      storage=args.storage, study_name=args.study_name, val_images=args.val_images,
                      searched=searched, fixed_flags=fixed, sampler_seed=args.seed, first=first)
        except (TuningUnavailable, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
