"""Generation: train a prior over a VQ-VAE's codes (the task `fit` runs), sample images, grids.

The prior's checkpoint embeds the VQ-VAE (class, config, weights) next to the prior, so that
one file samples images: `load_generator(path)` -> (prior, vqvae, class names).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from ..checkpoint import read_checkpoint
from ..models.images import to_uint8
from ..models.prior import CodePrior, bits_per_code
from ..models.vqvae import VQVAE, VQVAE2, model_from_checkpoint
from .loop import EpochOrder, Task

PRIOR_FORMAT = "vqvae_fast/prior/1"


@torch.no_grad()
def generate(prior: CodePrior, vqvae: VQVAE | VQVAE2, labels: torch.Tensor, *, temperature: float = 1.0,
             top_k: int | None = None, guidance: float = 1.0, seed: int = 0, batch_size: int = 256,
             progress: bool = False) -> torch.Tensor:
    """uint8 images (M, 3, H, W), one per label, sampled from the prior and decoded by the VQ-VAE.

    Deterministic given `seed` (and the device): the sampling generator is seeded once, and
    batches are drawn in order.
    """
    device = prior.position_embed.device
    generator = torch.Generator(device=device).manual_seed(seed)
    images = []
    for start in range(0, labels.shape[0], batch_size):
        codes = prior.sample(labels[start:start + batch_size].to(device), temperature=temperature, top_k=top_k,
                             guidance=guidance, generator=generator, progress=progress)
        images.append(to_uint8(vqvae.decode_levels(codes)).cpu())
    return torch.cat(images) if images else torch.empty(0, 3, 32, 32, dtype=torch.uint8)


def save_labelled_grid(images: torch.Tensor, labels: torch.Tensor, class_names, path, per_row: int) -> None:
    """A PNG grid of uint8 images, `per_row` per row, each row headed by the class name of its
    first image (images are expected grouped by class, `per_row` of each)."""
    grid = make_grid(images, nrow=per_row, padding=2, pad_value=255)  # uint8 (3, H, W)
    margin = 8 + 6 * max((len(str(name)) for name in class_names), default=0)
    canvas = Image.new("RGB", (grid.shape[2] + margin, grid.shape[1]), "white")
    canvas.paste(Image.fromarray(grid.permute(1, 2, 0).numpy()), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = images.shape[2] + 2
    for row in range(math.ceil(images.shape[0] / per_row)):
        label = int(labels[row * per_row])
        name = class_names[label] if label < len(class_names) else str(label)
        draw.text((4, 2 + row * row_height + row_height // 2 - 6), name, fill="black")
    canvas.save(path)


def class_grid_labels(classes, per_class: int) -> torch.Tensor:
    """(len(classes) * per_class,) labels, `per_class` of each class in turn."""
    return torch.tensor(list(classes), dtype=torch.long).repeat_interleave(per_class)


def prior_payload(prior: CodePrior, vqvae: dict, class_names, **extra) -> dict:
    return {"format": PRIOR_FORMAT, "config": prior.config, "model": prior.state_dict(), "vqvae": vqvae,
            "class_names": list(class_names), **extra}


def load_generator(path, map_location="cpu") -> tuple[CodePrior, VQVAE | VQVAE2, list[str], dict]:
    """(prior, VQ-VAE, class names, the whole checkpoint) from a prior checkpoint, in eval mode."""
    checkpoint = read_checkpoint(path, PRIOR_FORMAT, map_location, made_by="examples/train_prior.py")
    prior = CodePrior(**checkpoint["config"])
    prior.load_state_dict(checkpoint["model"])
    vqvae = model_from_checkpoint(checkpoint["vqvae"], str(path))
    return prior.to(map_location).eval(), vqvae.to(map_location).eval(), checkpoint["class_names"], checkpoint


class PriorTask(Task):
    """Minimise the prior's negative log-likelihood of training code grids given their class."""

    stat_names = ("bits",)

    def __init__(self, prior: CodePrior, vqvae: VQVAE | VQVAE2, train: tuple, test: tuple, batch_size: int,
                 seed: int, out_dir: Path, class_names, eval_items: int = 1024, samples_per_class: int = 4,
                 class_dropout: float = 0.0, guidance: float = 1.0):
        """train, test: (per-level code grids, labels) on the training device. class_dropout: the share
        of training labels replaced by "no class" (for guidance); guidance: of the sample grids."""
        self.prior, self.vqvae = prior, vqvae
        self.class_dropout, self.guidance = class_dropout, guidance
        (self.train_codes, self.train_labels), (self.test_codes, self.test_labels) = train, test
        self.batch_size, self.eval_items = batch_size, eval_items
        self.out_dir, self.class_names, self.samples_per_class = out_dir, list(class_names), samples_per_class
        self.items_per_step = batch_size
        self.steps_per_epoch = max(1, self.train_labels.shape[0] // batch_size)
        self.order = EpochOrder(seed, self.train_labels.shape[0], self.train_labels.device)

    def batch(self, step: int):
        rows, _ = self.order.rows(step, self.batch_size)
        labels = self.prior.drop_labels(self.train_labels[rows], self.class_dropout)
        return self.prior.flatten(tuple(c[rows] for c in self.train_codes)), labels

    def loss(self, batch):
        tokens, labels = batch
        loss = self.prior.nll(tokens, labels).mean()
        return loss, (loss.detach() / math.log(2))[None]

    def progress(self, stats: dict) -> dict:
        return {"bits": f"{stats['bits']:.3f}"}

    def log_fields(self, stats: dict) -> dict:
        return {"train_bits_per_code": stats["bits"]}

    def evaluate(self, final: bool) -> dict:
        n = self.test_labels.shape[0] if final else min(self.eval_items, self.test_labels.shape[0])
        held_out = bits_per_code(self.prior, tuple(c[:n] for c in self.test_codes), self.test_labels[:n])
        return {f"test_{key}": value for key, value in held_out.items()}

    def on_eval(self, step: int, final: bool) -> None:
        """samples.png: a few samples of every class with the current weights (fixed seed)."""
        labels = class_grid_labels(range(len(self.class_names)), self.samples_per_class)
        images = generate(self.prior, self.vqvae, labels, guidance=self.guidance, seed=0)
        save_labelled_grid(images, labels, self.class_names, self.out_dir / "samples.png", self.samples_per_class)
