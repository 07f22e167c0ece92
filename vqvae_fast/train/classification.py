"""Training the sample classifier (models/classifier.py) with the shared loop: flips and random crops."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.classifier import Classifier, accuracy
from ..models.images import to_images
from .loop import EpochOrder, Task


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
