"""Checkpoint files: the one writer (`atomic_save`) and the one reader (`read_checkpoint`) of
every file this package writes (model, training, prior and codes checkpoints), and the error
both raise. Below the models and the training code, which both use it; it knows nothing of
what a checkpoint holds beyond its "format" tag. Every file carries a checksum of its contents
(`content_digest`), checked on reading: a flipped bit or a hand edit is an error naming the file,
not a model that loads with a changed weight."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch


CHECKSUM_KEY = "sha256"  # the payload's content_digest, beside its other keys


def content_digest(value) -> str:
    """sha256 of a payload's contents: every tensor's dtype, shape and bytes and every other
    value's repr, dict keys in sorted order (so the same contents give the same digest)."""
    digest = hashlib.sha256()

    def feed(item) -> None:
        if isinstance(item, torch.Tensor):
            data = item.detach().cpu().contiguous()
            digest.update(f"tensor {data.dtype} {tuple(data.shape)};".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        elif isinstance(item, dict):
            digest.update(b"{")
            for key in sorted(item, key=repr):
                digest.update(repr(key).encode() + b":")
                feed(item[key])
            digest.update(b"}")
        elif isinstance(item, (list, tuple)):
            digest.update(b"[" if isinstance(item, list) else b"(")
            for element in item:
                feed(element)
            digest.update(b"]")
        else:
            digest.update(repr(item).encode() + b";")

    feed(value)
    return digest.hexdigest()


def atomic_save(payload: dict, path) -> None:
    """torch.save of payload and its content_digest to a unique temporary file beside `path`,
    flushed to disk, then renamed over `path`: a crash mid-write leaves the previous file intact."""
    payload = {k: v for k, v in payload.items() if k != CHECKSUM_KEY}
    payload[CHECKSUM_KEY] = content_digest(payload)
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
    if isinstance(checkpoint, dict) and CHECKSUM_KEY in checkpoint:  # files from before checksums have none
        stored = checkpoint.pop(CHECKSUM_KEY)
        if stored != content_digest(checkpoint):
            raise CheckpointError(f"{path}: its contents do not match its checksum: the file was changed or "
                                  f"damaged after it was written")
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
