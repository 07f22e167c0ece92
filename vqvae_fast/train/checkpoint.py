"""Training checkpoints: the RNG state saved with them, and a trainer's command line on
`--resume` (its settings come from the checkpoint). Files are written and read by
vqvae_fast.checkpoint (`atomic_save`, `read_checkpoint`, `CheckpointError`), re-exported here so
that the training code has one place to import them from."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from ..checkpoint import CheckpointError, atomic_save, read_checkpoint

__all__ = ["CheckpointError", "atomic_save", "parse_with_resume", "read_checkpoint", "rng_state", "set_rng_state"]


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def parse_with_resume(build_parser: Callable[[], argparse.ArgumentParser], argv: list[str] | None,
                      run_control: tuple[str, ...], expected_format: str) -> tuple[argparse.Namespace, dict | None]:
    """(settings, checkpoint or None) of a trainer's command line. On --resume the run's settings come
    from the checkpoint, and only the run-control flags given on this command line replace them
    (a new --steps / --epochs included)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "resume", None):
        return args, None
    try:
        checkpoint = read_checkpoint(args.resume, expected_format)
    except CheckpointError as error:
        parser.error(f"--resume: {error}")
    if "args" not in checkpoint:
        parser.error(f"--resume: {args.resume} holds no run settings (a model file, not a training checkpoint)")
    unset = object()  # a default no flag can produce: what remains `unset` was not given
    explicit = build_parser()
    explicit.set_defaults(**{key: unset for key in vars(args)})
    given = {key: value for key, value in vars(explicit.parse_args(argv)).items() if value is not unset}
    ignored = sorted(f"--{key.replace('_', '-')}" for key in given if key not in run_control)
    if ignored:
        print(f"warning: ignored on --resume (the checkpoint's settings are used): {' '.join(ignored)}",
              file=sys.stderr)
    defaults = {action.dest: action.default for action in parser._actions if action.dest != "help"}
    # Settings added since the checkpoint was written take their defaults.
    args = argparse.Namespace(**{**defaults, **checkpoint["args"],
                                 **{k: v for k, v in given.items() if k in run_control}, "resume": args.resume})
    if "steps" in given or "epochs" in given:  # a new length replaces the saved one
        args.steps, args.epochs = given.get("steps"), given.get("epochs")
    return args, checkpoint
