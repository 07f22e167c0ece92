"""CIFAR-10 as uint8 tensors, read from the standard python-pickle folder (`cifar-10-batches-py`).

The reader is our own (a few lines of pickle) so that any folder in the standard layout works,
whatever its size or checksums: torchvision's CIFAR10 rejects files whose md5 differs from the
official release. torchvision is used only to download the official release when no folder exists.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch

FOLDER_NAME = "cifar-10-batches-py"


class DataNotFoundError(FileNotFoundError):
    """CIFAR-10 is not in the given folder and could not be downloaded; the message says what to pass."""


TRAIN_BATCH = re.compile(r"data_batch_(\d+)")  # the whole name: data_batch_1.bak is not a batch


class _BatchUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds (dicts, lists, strings, numbers and numpy uint8
    arrays): a file that asks for anything else (os.system, say) is refused, not run."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
               ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to build {module}.{name}: not part of a CIFAR-10 batch")


def _read_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(io.BufferedReader(f), encoding="bytes").load()
        if not isinstance(batch, dict):
            raise ValueError(f"a {type(batch).__name__}, not a dict")
        # The official release has bytes keys (b"data"); re-packed copies often have str keys.
        batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
        pixels = torch.as_tensor(batch["data"])  # as stored: checked before it becomes uint8
        labels = torch.as_tensor(list(batch["labels"]))
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
        what = "the file is empty" if path.stat().st_size == 0 else f"{type(error).__name__}: {error}"
        raise ValueError(f"{path}: not a CIFAR-10 python-pickle batch ({what})") from None
    problem = _batch_problem(pixels, labels)
    if problem:
        raise ValueError(f"{path}: not a CIFAR-10 batch: {problem}")
    return pixels.to(torch.uint8).reshape(-1, 3, 32, 32), labels.to(torch.int64)


def _batch_problem(pixels: torch.Tensor, labels: torch.Tensor) -> str | None:
    """What is wrong with a batch's arrays (a damaged or foreign file), or None: pixels (n, 3072)
    integers in 0..255 (a wider type must not wrap: 300 is not 44), n labels, integers in 0..9."""
    if pixels.dim() != 2 or pixels.shape[1] != 3 * 32 * 32 or labels.dim() != 1 or pixels.shape[0] != labels.shape[0]:
        return f"expected 'data' of shape (n, 3072) and n labels, got {tuple(pixels.shape)} and {tuple(labels.shape)}"
    if pixels.is_floating_point() or pixels.dtype == torch.bool or labels.is_floating_point():
        return f"pixels and labels must be integers, got {pixels.dtype} and {labels.dtype}"
    if pixels.numel() and (int(pixels.min()) < 0 or int(pixels.max()) > 255):
        return f"pixel values must be in 0..255, got {int(pixels.min())}..{int(pixels.max())}"
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
        return f"labels must be classes 0..9, got {int(labels.min())}..{int(labels.max())}"
    return None


def is_cifar10_folder(folder: Path) -> bool:
    """True when `folder` holds a test batch and at least one training batch in the pickle layout."""
    return (folder / "test_batch").is_file() and bool(training_batches(folder))


def training_batches(folder: Path) -> list[Path]:
    """The `data_batch_<i>` files of a folder in order of i; other files (readme.html,
    data_batch_1.bak, 'data_batch_2 (copy)') are not batches and are ignored."""
    found = [(int(m.group(1)), p) for p in folder.glob("data_batch_*") if (m := TRAIN_BATCH.fullmatch(p.name))]
    return [p for _, p in sorted(found) if p.is_file()]


def load_split(folder: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one split of a `cifar-10-batches-py` folder.

    The training split is every `data_batch_<i>` file present, in order of i; the test split is `test_batch`.
    """
    folder = Path(folder)
    if train:
        paths = training_batches(folder)
    else:
        paths = [folder / "test_batch"]
    if not paths or not all(p.is_file() for p in paths):
        raise DataNotFoundError(f"no CIFAR-10 {'training' if train else 'test'} batches in {folder}")
    parts = [_read_batch(p) for p in paths]
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


def find_cifar10(data_dir: str | Path, download: bool = True, no_download_reason: str = "--no-download") -> Path:
    """The `cifar-10-batches-py` folder for `data_dir`, downloading the official release if needed.

    `data_dir` may be the `cifar-10-batches-py` folder itself or its parent. When neither holds the
    data, the official release is downloaded into `data_dir` through torchvision (if `download`);
    if that fails, DataNotFoundError explains what to pass instead.
    """
    data_dir = Path(data_dir).expanduser()
    for folder in (data_dir, data_dir / FOLDER_NAME):
        if is_cifar10_folder(folder):
            return folder
    why = f"downloading is disabled ({no_download_reason})"
    if download and not data_dir.parent.is_dir():
        why = f"its parent folder {data_dir.parent} does not exist either (a typo?), so nothing was downloaded"
    elif download:
        existed = data_dir.exists()
        try:
            import torchvision

            torchvision.datasets.CIFAR10(root=str(data_dir), train=True, download=True)
            if is_cifar10_folder(data_dir / FOLDER_NAME):
                return data_dir / FOLDER_NAME
            why = "the download finished but the folder is incomplete"
        except Exception as error:  # no network, proxy, disk full, ...: all mean the same to the caller
            why = f"downloading it failed ({type(error).__name__}: {error})"
            if not existed and data_dir.is_dir() and not any(data_dir.iterdir()):
                data_dir.rmdir()  # torchvision created it; leave no empty folder behind
    raise DataNotFoundError(
        f"CIFAR-10 not found in {data_dir} and {why}.\n"
        f"Pass --data-dir pointing at an existing '{FOLDER_NAME}' folder (python-pickle format, any number "
        f"of images) or at its parent"
        + (", or run where the network allows the download." if download else "."))


def load_cifar10(data_dir: str | Path, download: bool = True) -> dict[str, torch.Tensor]:
    """{"train": (N, 3, 32, 32) uint8, "train_labels": (N,), "test": (M, 3, 32, 32) uint8, "test_labels": (M,)}."""
    folder = find_cifar10(data_dir, download=download)
    train, train_labels = load_split(folder, train=True)
    test, test_labels = load_split(folder, train=False)
    return {"train": train, "train_labels": train_labels, "test": test, "test_labels": test_labels}
