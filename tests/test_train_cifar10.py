"""examples/train_cifar10.py end to end on a handful of real CIFAR-10 images (CPU, seconds)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import read_image
from torchvision.utils import make_grid

from vqvae_fast import load_checkpoint
from vqvae_fast.models.images import to_images
from vqvae_fast.train import cifar10
from vqvae_fast.train.data import load_cifar10, load_split

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared/data/cifar-10-subset/cifar-10-batches-py"
TRAINER = REPO / "examples/train_cifar10.py"



def source_images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Real CIFAR-10 images where the subset sits beside the repo; else synthetic ones (smooth
    colour fields with noise, so there is something to learn): the tests never skip for data."""
    if SHARED_CIFAR.is_dir():
        return (*load_split(SHARED_CIFAR, train=True), *load_split(SHARED_CIFAR, train=False))
    g = torch.Generator().manual_seed(0)
    base = torch.rand(240, 3, 2, 2, generator=g) * 255
    images = torch.nn.functional.interpolate(base, size=32, mode="bilinear", align_corners=False)
    images = (images + torch.randn(240, 3, 32, 32, generator=g) * 2).clamp(0, 255).to(torch.uint8)
    labels = torch.arange(240) % 10
    return images[:192], labels[:192], images[192:], labels[192:]


def load_trainer():
    """The trainer's library module (examples/train_cifar10.py is its command line: TRAINER)."""
    return cifar10


@pytest.fixture(scope="module")
def trainer():
    return load_trainer()


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory) -> Path:
    """A cifar-10-batches-py folder of 192 training images in two batches and 48 test images, with
    stray files beside them. One batch has str keys (as in the shared subset), the others bytes
    keys (as in the official release).
    """
    images, labels, test_images, test_labels = source_images()
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
    for stray in ("readme.html", "batches.meta.txt", "data_batch_1.bak", "data_batch_2 (copy)"):
        (folder / stray).write_bytes(b"not a batch")
    return folder


# Exact resume is a CPU property: on a GPU, atomic adds and cuDNN's algorithms reorder sums run to
# run (seen on an H200: weights 1e-6..1e-4 apart after 20 resumed steps). --device is not stored
# in the checkpoint, so each --resume below names it again.
# One thread, named: the default follows the machine's load (set_cpu_threads), and float sums
# of a different thread count would break the bit-for-bit resume tests on a busy machine.
ON_CPU = ["--device", "cpu", "--workers", "1"]
TINY = [*ON_CPU, "--batch-size", "32", "--num-codes", "32", "--code-dim", "8", "--channels", "32", "--res-channels", "16",
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
    x = to_images(test_images)
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
                         "--resume", str(tmp_path / "checkpoint.pt"), "--quiet", *ON_CPU]) == 0
    resumed = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    uninterrupted = torch.load(full_run / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == uninterrupted["step"] == 40
    final = json.loads((tmp_path / "final.json").read_text())  # the time of both invocations, and this one's
    assert 0 < final["this_run_s"] < final["wall_s"]
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    states_a, states_b = resumed["optimizer"]["state"], uninterrupted["optimizer"]["state"]
    assert states_a.keys() == states_b.keys() and len(states_b) > 0
    for index, state_b in states_b.items():
        assert states_a[index].keys() == state_b.keys()
        for name, value in state_b.items():
            assert torch.equal(states_a[index][name], value), (index, name)
    assert resumed["rng"].keys() == uninterrupted["rng"].keys()
    for device, state in uninterrupted["rng"].items():  # "cpu", and "cuda" where present
        assert torch.equal(resumed["rng"][device], state), device
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


def test_an_interrupted_cosine_schedule_resumes_exactly(trainer, tiny_cifar, tmp_path):
    """A run killed at step 20 of 40 and resumed ends where the uninterrupted run does: the
    learning-rate schedule's state travels in the checkpoint."""
    from vqvae_fast.train.cifar10 import parse_args, train

    argv = ["--data-dir", str(tiny_cifar), "--steps", "40", "--lr-schedule", "cosine", *TINY]

    def killed_at_20(step, metrics):
        if step == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(parse_args([*argv, "--out", str(tmp_path / "cut")])[0], report=killed_at_20)
    assert trainer.main(["--resume", str(tmp_path / "cut/checkpoint.pt"), "--quiet", *ON_CPU]) == 0
    assert trainer.main([*argv, "--out", str(tmp_path / "whole")]) == 0
    resumed = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)
    whole = torch.load(tmp_path / "whole/checkpoint.pt", weights_only=True)
    assert resumed["step"] == whole["step"] == 40 and resumed["scheduler"] == whole["scheduler"]
    for key, value in whole["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_resume_after_a_crash_between_metrics_and_checkpoint_logs_each_step_once(trainer, tiny_cifar, tmp_path):
    assert trainer.main(["--data-dir", str(tiny_cifar), "--steps", "20", "--out", str(tmp_path), *TINY]) == 0
    saved = tmp_path / "checkpoint.pt"
    # the run died after writing step 30's metrics line (and half of another), before its checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 30, "test_mse": 1.0}) + "\n" + '{"step": 4')
    assert trainer.main(["--data-dir", str(tiny_cifar), "--steps", "40", "--out", str(tmp_path),
                         "--resume", str(saved), "--quiet"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20, 30, 40] and lines[2]["test_mse"] != 1.0


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from vqvae_fast import checkpoint

    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"format": "vqvae_fast/1", "step": 1}, path)
    before = path.read_bytes()

    def crash(payload, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed in the middle of the write

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"format": "vqvae_fast/1", "step": 2}, path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", bytes(range(256)) * 4], ids=["empty", "truncated",
                                                                                            "random"])
def test_damaged_checkpoints_are_named_in_a_clear_error(trainer, tmp_path, capsys, content):
    from vqvae_fast import CheckpointError

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(path)
    with pytest.raises(SystemExit):
        trainer.main(["--resume", str(path)])
    err = capsys.readouterr().err
    assert "checkpoint.pt" in err and "weights_only" not in err and "Traceback" not in err


def test_a_foreign_dict_is_not_taken_for_a_checkpoint(trainer, tmp_path, capsys):
    from vqvae_fast import CheckpointError

    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match="not a vqvae_fast model checkpoint"):
        load_checkpoint(path)
    with pytest.raises(SystemExit):
        trainer.main(["--resume", str(path)])
    assert "weights.pt" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["data_batch_3", "test_batch"])
def test_an_empty_batch_file_is_named(tmp_path, tiny_cifar, name):
    import shutil

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(tiny_cifar, folder)
    (folder / name).write_bytes(b"")
    with pytest.raises(ValueError, match=f"{name}.*the file is empty"):
        load_cifar10(folder, download=False)


def test_a_malicious_batch_file_is_refused_not_run(tmp_path, tiny_cifar):
    import shutil

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(tiny_cifar, folder)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": Payload(), "labels": []}, f)
    with pytest.raises(ValueError, match="refusing to build"):
        load_cifar10(folder, download=False)
    assert not (tmp_path / "pwned").exists()


def test_a_mistyped_data_dir_creates_no_folders_and_no_download_mentions_no_network(trainer, tmp_path, capsys):
    typo = tmp_path / "dat" / "cifar"
    assert trainer.main(["--data-dir", str(typo), "--steps", "1", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "dat").exists() and "does not exist" in capsys.readouterr().err
    assert trainer.main(["--data-dir", str(tmp_path), "--no-download", "--steps", "1", "--out",
                         str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--no-download" in err and "network" not in err


def test_models_refuse_uint8_and_channels_last_images():
    from vqvae_fast import InputError, VQVAE, VQVAE2

    for model in (VQVAE(num_codes=8, code_dim=4, channels=16, res_channels=8, num_res_blocks=1),
                  VQVAE2(num_codes=8, code_dim=4, channels=16, res_channels=8, num_res_blocks=1)):
        model.eval()
        images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
        for call in (model.reconstruct, model.encode_levels, model):
            with pytest.raises(InputError, match="uint8"):
                call(images)
            with pytest.raises(InputError, match="channels last"):
                call(images.permute(0, 2, 3, 1).float() / 255)


@pytest.mark.parametrize("flag, value", [("--beta", "-1"), ("--beta", "nan"), ("--lr", "0"), ("--ema-decay", "1"),
                                         ("--batch-size", "0"), ("--steps", "-5")])
def test_bad_settings_are_refused_by_name(trainer, flag, value, capsys):
    with pytest.raises(SystemExit):
        trainer.parse_args([flag, value])
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_every_trainer_flag_has_help(trainer):
    for action in trainer.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"


def test_missing_data_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(TRAINER), "--data-dir", str(tmp_path / "nothing"), "--no-download",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--data-dir" in result.stderr


def test_train_config_is_the_command_line_typed():
    """TrainConfig has one field per flag, the parser's defaults are its defaults, and train()
    takes only a TrainConfig, checked before anything runs."""
    import argparse
    import dataclasses

    from vqvae_fast.train.cifar10 import TrainConfig, build_parser, parse_args, train

    flags = {action.dest for action in build_parser()._actions if action.dest != "help"}
    assert flags == {field.name for field in dataclasses.fields(TrainConfig)}
    assert parse_args([])[0] == TrainConfig(steps=300)  # neither --steps nor --epochs: 300 steps
    assert parse_args(["--lr", "0.01", "--no-ema"])[0] == TrainConfig(steps=300, lr=0.01, ema=False)
    with pytest.raises(TypeError, match="TrainConfig"):
        train(argparse.Namespace(**dataclasses.asdict(TrainConfig())))
    with pytest.raises(ValueError, match="--ema-decay must be in"):
        train(TrainConfig(ema_decay=1.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0


def test_the_checkpoint_keeps_the_typed_settings(full_run):
    from vqvae_fast.train.cifar10 import TrainConfig

    saved = torch.load(full_run / "checkpoint.pt", weights_only=True)["args"]
    config = TrainConfig(**saved)
    assert config.steps == 40 and config.out == str(full_run)


def test_residual_model_trains_and_reports_its_code_budget(trainer, tiny_cifar, tmp_path, full_run):
    """--model rqvae --stages 3: codes (8, 8, 3) from one run; final.json gives the bits an image's
    codes take (8 x 8 positions x 3 stages x log2 32) beside the flat model's (8 x 8 x log2 32)."""
    assert trainer.main(["--data-dir", str(tiny_cifar), "--steps", "4", "--model", "rqvae", "--stages", "3",
                         "--quantizer-dropout", "0.5", "--out", str(tmp_path), *TINY]) == 0
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["model"] == "rqvae" and final["codes"] == 96 and final["code_bits_per_image"] == 8 * 8 * 3 * 5
    assert {"stage0_perplexity", "stage2_codes_used"} <= set(final)
    flat = json.loads((full_run / "final.json").read_text())
    assert flat["codes"] == 32 and flat["code_bits_per_image"] == 8 * 8 * 5
    model = load_checkpoint(tmp_path / "checkpoint.pt")
    assert model.encode(torch.rand(2, 3, 32, 32)).shape == (2, 8, 8, 3)
