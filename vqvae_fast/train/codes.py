"""Datasets as code grids: images encoded by a trained VQ-VAE, saved in one file, and back.

A codes file (`save_codes` / `load_codes`) holds, for each split, the code grids of every level
(top level first; one level for VQVAE, two for VQVAE2) as int16 and the labels, plus the
VQ-VAE itself (class, config, weights), so that the codes can always be decoded to images.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import atomic_save, read_checkpoint
from ..models.images import to_images, to_uint8
from ..models.vqvae import VQVAE, VQVAE2, model_from_checkpoint

FORMAT = "vqvae_fast/codes/1"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@torch.no_grad()
def encode_images(model: VQVAE | VQVAE2, images_uint8: torch.Tensor, batch_size: int = 500,
                  flip: bool = False) -> tuple[torch.Tensor, ...]:
    """Code grids (N, h, w) int16 of every level for uint8 images (N, 3, H, W) (flipped
    horizontally first with `flip`), on the images' device."""
    model.eval()
    levels = None
    for chunk in images_uint8.split(batch_size):
        x = to_images(chunk)
        codes = model.encode_levels(x.flip(3) if flip else x)
        levels = [[] for _ in codes] if levels is None else levels
        for out, grid in zip(levels, codes):
            out.append(grid.to(torch.int16))
    if levels is None:  # no images: empty grids of the right shape
        h, w = images_uint8.shape[-2:]
        codes = model.encode_levels(torch.zeros(1, 3, h, w, device=images_uint8.device))
        return tuple(torch.empty((0, *c.shape[1:]), dtype=torch.int16, device=c.device) for c in codes)
    return tuple(torch.cat(parts) for parts in levels)


@torch.no_grad()
def decode_codes(model: VQVAE | VQVAE2, codes: tuple[torch.Tensor, ...], batch_size: int = 500) -> torch.Tensor:
    """uint8 images (N, 3, H, W) from code grids of every level (top level first)."""
    model.eval()
    device = next(model.parameters()).device
    n = codes[0].shape[0]
    images = [to_uint8(model.decode_levels(tuple(c[i:i + batch_size].to(device).long() for c in codes)))
              for i in range(0, n, batch_size)]
    return torch.cat(images) if images else torch.empty(0, 3, 32, 32, dtype=torch.uint8)


def vqvae_payload(checkpoint: dict) -> dict:
    """The part of a VQ-VAE training checkpoint needed to rebuild the model (no optimizer)."""
    return {key: checkpoint[key] for key in ("model_class", "config", "model") if key in checkpoint}


def encode_dataset(checkpoint: dict, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                   device: torch.device, flips: bool = True, class_names=CIFAR10_CLASSES) -> dict:
    """A codes payload from a VQ-VAE checkpoint dict and {split: (uint8 images, labels)}.

    With `flips`, the training split's horizontally flipped images are encoded too (as the
    split "train_flipped"): augmentation for the prior, for the price of one more pass.
    """
    model = model_from_checkpoint(checkpoint).to(device)
    payload = {"format": FORMAT, "vqvae": vqvae_payload(checkpoint), "class_names": list(class_names), "splits": {}}
    for name, (images, labels) in splits.items():
        variants = [(name, False)] + ([(f"{name}_flipped", True)] if flips and name == "train" else [])
        for split, flip in variants:
            codes = encode_images(model, images.to(device), flip=flip)
            payload["splits"][split] = {"codes": [c.cpu() for c in codes], "labels": labels.cpu()}
    first = next(iter(payload["splits"].values()))["codes"]
    payload["levels"] = [{"shape": tuple(c.shape[1:]), "num_codes": q.num_codes}
                         for c, q in zip(first, model.quantizers)]
    return payload


def save_codes(payload: dict, path) -> None:
    atomic_save(payload, path)


def load_codes(path) -> dict:
    """A codes payload from `path`, checked: a clear error for anything else."""
    return read_checkpoint(path, FORMAT, made_by="`examples/codes.py encode`")


def load_image_folder(folder, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images (N, 3, size, size), labels (N,) and class names from an image folder.

    Images directly in `folder` get label 0 (one class named after the folder); sub-folders are
    classes, in sorted order (torchvision's ImageFolder layout). Every image is resized (bilinear,
    antialiased) to size x size; grayscale and RGBA images are converted to RGB.
    """
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import resize

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of images")
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    groups = [(c.name, sorted(f for f in c.rglob("*") if f.suffix.lower() in suffixes)) for c in classes]
    if not classes:
        groups = [(folder.name, sorted(f for f in folder.iterdir() if f.suffix.lower() in suffixes))]
    images, labels = [], []
    for label, (_, files) in enumerate(groups):
        for file in files:
            try:
                image = decode_image(str(file), mode=ImageReadMode.RGB)
            except RuntimeError as error:
                raise ValueError(f"{file}: not a readable image ({error})") from None
            images.append(resize(image, [size, size], antialias=True))
            labels.append(label)
    if not images:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(sorted(suffixes))})")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), [name for name, _ in groups]
