"""A small CIFAR-10 classifier, to measure how often samples show the class they were asked for.

Trained by the shared loop (`vqvae_fast.train.classification.ClassifierTask`) on the training
images only, with flips and random crops; its held-out accuracy is the yardstick next to the rate
it gives the samples.
"""
from __future__ import annotations

import torch
from torch import nn

from .images import to_images
from .vqvae import CIFAR10_MEAN, CIFAR10_STD


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
