"""Checkpoint files: the one writer (`atomic_save`) and the one reader (`read_checkpoint`) of
every file this package writes (model, training, prior and codes checkpoints), and the error
both raise. Below the models and the training code, which both use it; it knows nothing of
what a checkpoint holds beyond its "format" tag."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_save(payload: dict, path) -> None:
    """torch.save to a unique temporary file beside `path`, flushed to disk, then renamed over
    `path`: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private: give it the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or not what was expected."""


def read_checkpoint(path, expected_format: str | None = None, map_location="cpu", *, made_by: str = "") -> dict:
    """torch.load of a checkpoint written here, or CheckpointError naming the file and the problem.
    `made_by`: what writes the expected kind of file, for the message when the format differs."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty (a crash while it was written?)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, random bytes, a pickle needing arbitrary code, ...
        reason = _first_sentence(str(error))
        if "weights_only" in reason:  # torch's advice to load it unsafely: wrong for a damaged file
            reason = "its contents are not a checkpoint's"
        raise CheckpointError(f"{path}: not a readable checkpoint, the file is damaged or of another kind "
                              f"({type(error).__name__}{': ' + reason if reason else ''})") from None
    found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
    if expected_format is not None and found != expected_format:
        what = repr(found) if found else "something else"
        source = f" (made by {made_by})" if made_by else ""
        raise CheckpointError(f"{path}: expected a {expected_format!r} checkpoint{source}, found {what}")
    return checkpoint


def _first_sentence(message: str, limit: int = 200) -> str:
    """The first sentence of an error message, whole (torch's go on with advice that does not
    apply to a damaged file), or its first `limit` characters and an ellipsis."""
    line = (message.strip().splitlines() or [""])[0]
    end = line.find(". ")
    sentence = line if end < 0 else line[:end + 1]
    return sentence if len(sentence) <= limit else sentence[:limit].rstrip() + "..."
