"""examples/train_cifar10.py end to end on a handful of real CIFAR-10 images (CPU, seconds)."""
from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import read_image
from torchvision.utils import make_grid

from vqvae_fast import load_checkpoint
from vqvae_fast.data import load_split

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared/data/cifar-10-subset/cifar-10-batches-py"
TRAINER = REPO / "examples/train_cifar10.py"

pytestmark = pytest.mark.skipif(
    not SHARED_CIFAR.is_dir(),
    reason=f"real CIFAR-10 images not found at {SHARED_CIFAR} (CI clones shared/ beside the repo)")


def load_trainer():
    spec = importlib.util.spec_from_file_location("train_cifar10", TRAINER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trainer():
    return load_trainer()


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> Path:
    """A cifar-10-batches-py folder of 192 real training images in two batches and 48 test images.

    One batch has str keys (as in the shared subset), the others bytes keys (as in the official release).
    """
    images, labels = load_split(SHARED_CIFAR, train=True)
    test_images, test_labels = load_split(SHARED_CIFAR, train=False)
    folder = tmp_path_factory.mktemp("data") / "cifar-10-batches-py"
    folder.mkdir()

    def write(name, x, y, bytes_keys):
        batch = {"data": x.reshape(len(x), -1).numpy(), "labels": y.tolist(), "batch_label": name}
        if bytes_keys:
            batch = {key.encode(): value for key, value in batch.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)

    write("data_batch_1", images[:128], labels[:128], bytes_keys=False)
    write("data_batch_2", images[128:192], labels[128:192], bytes_keys=True)
    write("test_batch", test_images[:48], test_labels[:48], bytes_keys=True)
    return folder


TINY = ["--batch-size", "32", "--num-codes", "32", "--code-dim", "8", "--channels", "32", "--res-channels", "16",
        "--res-blocks", "1", "--ema", "--eval-every", "10", "--lr", "1e-3", "--seed", "3", "--quiet"]


@pytest.fixture(scope="module")
def full_run(trainer, tiny_cifar, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full")
    assert trainer.main(["--data-dir", str(tiny_cifar), "--steps", "40", "--out", str(out), *TINY]) == 0
    return out


def test_run_writes_every_output_and_learns(full_run):
    lines = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20, 30, 40]
    assert lines[-1]["train_loss"] < 0.8 * lines[0]["train_loss"]
    assert lines[-1]["test_mse"] < 0.8 * lines[0]["test_mse"]
    final = json.loads((full_run / "final.json").read_text())
    for key in ("test_mse", "test_psnr", "perplexity", "codes_used", "wall_s", "images_per_s"):
        assert key in final, key
    assert final["steps"] == 40 and final["test_images"] == 48 and final["train_images"] == 192
    assert final["test_mse"] == lines[-1]["test_mse"]
    assert 1 <= final["codes_used"] <= 32 and final["images_per_s"] > 0
    assert not (full_run / "checkpoint.pt.tmp").exists()


def test_load_checkpoint_reproduces_the_runs_reconstructions(full_run, tiny_cifar, trainer):
    model = load_checkpoint(full_run / "checkpoint.pt")
    assert not model.training
    test_images, _ = load_split(tiny_cifar, train=False)
    x = trainer.to_images(test_images)
    reconstruction = model.reconstruct(x)
    assert torch.equal(model.decode(model.encode(x)), reconstruction)
    final = json.loads((full_run / "final.json").read_text())
    assert abs(float(torch.mean((reconstruction - x) ** 2)) - final["test_mse"]) < 1e-7
    # recon.png: the first 16 test images above their reconstructions, pixel for pixel.
    grid = make_grid(torch.cat([x[:16], reconstruction[:16]]), nrow=16, padding=2)
    expected = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)
    assert torch.equal(read_image(str(full_run / "recon.png")), expected)


def test_resume_continues_the_same_run_exactly(full_run, trainer, tiny_cifar, tmp_path):
    # Stop at step 20 (mid-epoch: 6 steps per epoch), then resume to 40.
    assert trainer.main(["--data-dir", str(tiny_cifar), "--steps", "20", "--out", str(tmp_path), *TINY]) == 0
    assert trainer.main(["--data-dir", str(tiny_cifar), "--steps", "40", "--out", str(tmp_path),
                         "--resume", str(tmp_path / "checkpoint.pt"), "--quiet"]) == 0
    resumed = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    uninterrupted = torch.load(full_run / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == uninterrupted["step"] == 40
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for state_a, state_b in zip(resumed["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_b)
    assert torch.equal(resumed["rng"]["cpu"], uninterrupted["rng"]["cpu"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30, 40]


def test_recipes_and_ema_flags(trainer):
    plain = trainer.build_model(trainer.parse_args(["--recipe", "plain"])[0]).config
    assert plain["backend"] == "reference" and plain["ema_decay"] is None
    assert not plain["kmeans_init"] and not plain["restart_dead"]
    default = trainer.build_model(trainer.parse_args([])[0]).config
    assert default["backend"] == "auto" and default["kmeans_init"] and default["restart_dead"]
    assert default["ema_decay"] is not None
    assert trainer.build_model(trainer.parse_args(["--no-ema"])[0]).config["ema_decay"] is None
    plain_ema = trainer.build_model(trainer.parse_args(["--recipe", "plain", "--ema", "--ema-decay", "0.9"])[0])
    assert plain_ema.config["ema_decay"] == 0.9


def test_missing_data_that_cannot_be_downloaded_fails_cleanly(trainer, tmp_path, monkeypatch, capsys):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    assert trainer.main(["--data-dir", str(tmp_path / "nothing"), "--steps", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "cifar-10-batches-py" in err and "network unreachable" in err
    assert not (tmp_path / "nothing").exists()


def test_missing_data_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(TRAINER), "--data-dir", str(tmp_path / "nothing"), "--no-download",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--data-dir" in result.stderr
