"""Training a VQ-VAE (or VQ-VAE-2) to reconstruct images: the task `fit` runs, and its evaluation.

The dataset lives on the device as uint8 (N, 3, H, W); batches are cut and flipped there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torchvision.utils import make_grid, save_image

from ..distributed import Run
from ..models.images import to_images
from ..models.vqvae import VQVAE, VQVAE2
from ..vector_quantizer import code_counts, usage_stats
from .loop import EpochOrder, Task
from .metrics import psnr


@torch.no_grad()
def evaluate_reconstruction(model: VQVAE | VQVAE2, images_uint8: torch.Tensor, batch_size: int = 500,
                            split: str = "test") -> dict:
    """`split`_mse / `split`_psnr of the clamped reconstructions (fp32, as load_checkpoint(...).reconstruct
    gives) and code usage per level over all of `images_uint8` (VQVAE2: `top_` fields too;
    residual stages: `stage<s>_` fields, and the unprefixed ones over all stages)."""
    was_training = model.training
    model.eval()
    squared_error = torch.zeros((), dtype=torch.float64, device=images_uint8.device)
    quantizers = model.quantizers
    counts = [torch.zeros(q.num_codes, device=images_uint8.device) for q in quantizers]
    for chunk in images_uint8.split(batch_size):
        out = model(to_images(chunk))
        squared_error += out.mse.double() * chunk.shape[0]
        for count, indices in zip(counts, model.level_indices(out)):
            count += code_counts(indices, count.shape[0])
    model.train(was_training)
    mse = float(squared_error) / max(1, images_uint8.shape[0])
    metrics = {f"{split}_mse": mse, f"{split}_psnr": psnr(mse)}
    residual = isinstance(model, VQVAE) and model.residual
    if isinstance(model, VQVAE2):
        prefixes = ("top_", "")
    else:
        prefixes = tuple(f"stage{s}_" for s in range(len(quantizers))) if residual else ("",)
    for prefix, quantizer, count in zip(prefixes, quantizers, counts):
        perplexity, codes_used = usage_stats(count)
        metrics.update({f"{prefix}perplexity": float(perplexity), f"{prefix}codes_used": int(codes_used),
                        f"{prefix}dead_codes": int(quantizer.dead_mask().sum())})
    if residual:  # over the stages: their mean perplexity, the codes and dead codes of all
        for name, combine in (("perplexity", lambda v: sum(v) / len(v)), ("codes_used", sum), ("dead_codes", sum)):
            metrics[name] = combine([metrics[f"{prefix}{name}"] for prefix in prefixes])
    return metrics


def save_reconstructions(model: VQVAE | VQVAE2, images_uint8: torch.Tensor, path: Path, count: int = 16) -> None:
    """torchvision grid: the first `count` images above their reconstructions."""
    x = to_images(images_uint8[:count])
    grid = make_grid(torch.cat([x, model.reconstruct(x)]).float().cpu(), nrow=x.shape[0], padding=2)
    save_image(grid, path)


class ReconstructionTask(Task):
    """Minimise the model's loss on random horizontally flipped training images; evaluate on the
    held-out images (`split`: "test", or "val" for images held out of the training set), and
    hand each evaluation to `report(step, metrics)` if given."""

    stat_names = ("loss", "mse", "perplexity")

    def __init__(self, model: VQVAE | VQVAE2, train_uint8: torch.Tensor, test_uint8: torch.Tensor, batch_size: int,
                 seed: int, eval_images: int, split: str = "test",
                 report: Callable[[int, dict], None] | None = None, run: Run = Run(),
                 train_model: torch.nn.Module | None = None):
        """batch_size is the global batch: under torchrun each rank takes its 1/world share of
        every global batch; `train_model` (the DDP wrapper) runs the training forward."""
        if batch_size % run.world:
            raise ValueError(f"the global batch ({batch_size}) must be a multiple of the {run.world} processes")
        self.model, self.train, self.test = model, train_uint8, test_uint8
        self.train_model = train_model or model
        self.run, self.shard = run, batch_size // run.world
        self.batch_size, self.eval_images = batch_size, eval_images
        self.split, self.report, self.last_metrics = split, report, {}
        self.items_per_step = batch_size
        self.steps_per_epoch = train_uint8.shape[0] // batch_size
        self.order = EpochOrder(seed, train_uint8.shape[0], train_uint8.device)

    def batch(self, step: int) -> torch.Tensor:
        rows, flip = self.order.rows(step, self.batch_size)
        mine = slice(self.run.rank * self.shard, (self.run.rank + 1) * self.shard)  # this rank's share
        rows, flip = rows[mine], flip[mine]
        x = to_images(self.train[rows])
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)

    def loss(self, x: torch.Tensor):
        out = self.train_model(x)
        return out.loss, torch.stack([out.loss.detach().float(), out.mse.float(), out.perplexity.float()])

    def progress(self, stats: dict) -> dict:
        return dict(loss=f"{stats['loss']:.4f}", psnr=f"{psnr(stats['mse']):.2f}", ppl=f"{stats['perplexity']:.0f}")

    def log_fields(self, stats: dict) -> dict:
        return {"train_loss": stats["loss"], "train_psnr": psnr(stats["mse"]), "train_perplexity": stats["perplexity"]}

    def evaluate(self, final: bool) -> dict:
        self.last_metrics = evaluate_reconstruction(self.model, self.test if final else self.test[:self.eval_images],
                                                    split=self.split)
        return self.last_metrics

    def on_eval(self, step: int, final: bool) -> None:
        if self.report is not None:
            self.report(step, self.last_metrics)
