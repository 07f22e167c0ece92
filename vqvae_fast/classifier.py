"""A small CIFAR-10 classifier, to measure how often samples show the class they were asked for.

Trained by the shared loop (`ClassifierTask`) on the training images only, with flips and
random crops; its held-out accuracy is the yardstick next to the rate it gives the samples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import CIFAR10_MEAN, CIFAR10_STD
from .training import EpochOrder, Task, to_images


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class Classifier(nn.Module):
    """Three stages of two 3x3 convolutions (width, 2x, 4x), max-pooled, then a linear layer."""

    def __init__(self, num_classes: int = 10, width: int = 32, dropout: float = 0.2):
        super().__init__()
        self.config = dict(num_classes=num_classes, width=width, dropout=dropout)
        w = width
        self.features = nn.Sequential(_conv(3, w), _conv(w, w), nn.MaxPool2d(2), _conv(w, 2 * w), _conv(2 * w, 2 * w),
                                      nn.MaxPool2d(2), _conv(2 * w, 4 * w), _conv(4 * w, 4 * w),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(4 * w, num_classes)
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) of images x in [0, 1]."""
        return self.head(self.features((x - self.mean) / self.std))

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        out = torch.cat([self(to_images(c.to(device))).argmax(1).cpu() for c in images_uint8.split(batch_size)])
        self.train(was_training)
        return out


def accuracy(model: Classifier, images_uint8: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model.predict(images_uint8) == labels.cpu()).double().mean()) if labels.numel() else float("nan")


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to `pad` pixels (zero padding), as the usual CIFAR augmentation."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


class ClassifierTask(Task):
    stat_names = ("loss", "accuracy")

    def __init__(self, model: Classifier, train: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int):
        self.model, (self.train_images, self.train_labels), (self.test_images, self.test_labels) = model, train, test
        self.batch_size, self.seed = batch_size, seed
        self.items_per_step = batch_size
        self.steps_per_epoch = max(1, self.train_labels.shape[0] // batch_size)
        self.order = EpochOrder(seed, self.train_labels.shape[0], self.train_labels.device)

    def batch(self, step: int):
        rows, flip = self.order.rows(step, self.batch_size)
        x = to_images(self.train_images[rows])
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        return random_crop(x, 4, torch.Generator().manual_seed(self.seed * 7919 + step)), self.train_labels[rows]

    def loss(self, batch):
        x, labels = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
        return loss, torch.stack([loss.detach(), (logits.argmax(1) == labels).float().mean()])

    def progress(self, stats: dict) -> dict:
        return {"loss": f"{stats['loss']:.3f}", "acc": f"{stats['accuracy']:.3f}"}

    def evaluate(self, final: bool) -> dict:
        return {"test_accuracy": accuracy(self.model, self.test_images, self.test_labels)}
