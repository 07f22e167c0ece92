"""The generation pipeline end to end at toy sizes: VQ-VAE (VQ-VAE-2, the residual RQ-VAE), codes, prior, samples."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.io import read_image

from vqvae_fast import CheckpointError
from vqvae_fast.models.images import to_images
from vqvae_fast.models.vqvae import load_checkpoint
from vqvae_fast.train import cifar10, prior_trainer
from vqvae_fast.train.codes import decode_codes, encode_images, load_codes
from vqvae_fast.train.generation import load_generator

REPO = Path(__file__).resolve().parents[1]


def load_example(name: str):
    """The command behind examples/<name>.py (vqvae_fast.train.cli.<name>): tests import the library."""
    return importlib.import_module(f"vqvae_fast.train.cli.{name}")


VQ_TINY = ["--batch-size", "32", "--num-codes", "16", "--code-dim", "8", "--channels", "16", "--res-channels", "8",
           "--res-blocks", "1", "--eval-every", "5", "--eval-images", "40", "--stages", "3", "--quiet"]
# One thread, named: the default follows the machine's load, and a resumed run must add its
# floats as the uninterrupted one did.
PRIOR_TINY = ["--steps", "12", "--batch-size", "32", "--dim", "32", "--depth", "1", "--heads", "2", "--eval-every", "6",
              "--warmup", "2", "--quiet", "--workers", "1"]


@pytest.fixture(scope="module", params=["vqvae", "vqvae2", "rqvae"])
def pipeline(request, toy_cifar, tmp_path_factory):
    """(model kind, VQ-VAE checkpoint, prior run folder) after the README's three commands, tiny."""
    root = tmp_path_factory.mktemp(request.param)
    assert cifar10.main(["--model", request.param, "--data-dir", str(toy_cifar), "--steps", "10", "--out",
                         str(root / "vqvae"), *VQ_TINY]) == 0
    assert prior_trainer.main(["--vqvae", str(root / "vqvae/checkpoint.pt"), "--data-dir", str(toy_cifar), "--out",
                               str(root / "prior"), *PRIOR_TINY]) == 0
    return request.param, root / "vqvae/checkpoint.pt", root / "prior"


def test_prior_run_writes_what_the_interface_promises(pipeline):
    kind, _, prior_dir = pipeline
    final = json.loads((prior_dir / "final.json").read_text())
    for key in ("test_bits_per_code", "unigram_bits_per_code", "unigram_entropy_bits", "gain_bits_per_code",
                "test_bits_per_image", "wall_s"):
        assert key in final, key
    assert final["train_grids"] == 320 and final["test_grids"] == 40  # mirror images' codes included
    assert len(final["levels"]) == {"vqvae": 1, "vqvae2": 2, "rqvae": 3}[kind]
    lines = [json.loads(line) for line in (prior_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [6, 12]
    assert lines[-1]["test_bits_per_code"] == final["test_bits_per_code"]
    assert read_image(str(prior_dir / "samples.png")).shape[0] == 3
    codes = load_codes(prior_dir / "codes.pt")
    assert set(codes["splits"]) == {"train", "train_flipped", "test"}


def test_sampling_command_is_deterministic_and_labelled(pipeline, tmp_path):
    kind, _, prior_dir = pipeline
    sampler = load_example("sample")
    for name in ("a", "b"):
        assert sampler.main(["--prior", str(prior_dir / "checkpoint.pt"), "--model", kind, "--per-class", "2", "--out",
                             str(tmp_path / name), "--seed", "5", "--classes", "cat", "1", "--quiet"]) == 0
    a, b = (torch.load(tmp_path / name / "samples.pt", weights_only=True) for name in ("a", "b"))
    assert a["images"].dtype == torch.uint8 and a["images"].shape == (4, 3, 32, 32)
    assert torch.equal(a["labels"], torch.tensor([3, 3, 1, 1]))
    assert torch.equal(a["images"], b["images"])
    grid = read_image(str(tmp_path / "a" / "samples.png"))
    assert grid.shape[1] == 2 * 34 + 2  # two rows of 32-pixel images, 2-pixel padding


def test_resume_of_the_prior_continues_the_same_run(pipeline, toy_cifar, tmp_path, monkeypatch):
    """A run killed after its step-6 checkpoint, resumed, ends where the uninterrupted run ended."""
    _, vqvae, prior_dir = pipeline

    def crash(task, step, final):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(prior_trainer.PriorTask, "on_eval", crash)
        with pytest.raises(KeyboardInterrupt):
            prior_trainer.main(["--vqvae", str(vqvae), "--data-dir", str(toy_cifar), "--out", str(tmp_path),
                                *PRIOR_TINY])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 6
    assert prior_trainer.main(["--resume", str(tmp_path / "checkpoint.pt"), "--quiet", "--workers", "1"]) == 0
    resumed = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    straight = torch.load(prior_dir / "checkpoint.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 12
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


def test_codes_round_trip_through_the_command(pipeline, toy_cifar, tmp_path):
    kind, vqvae_path, _ = pipeline
    codes_cli = load_example("codes")
    assert codes_cli.main(["encode", "--vqvae", str(vqvae_path), "--data-dir", str(toy_cifar), "--out",
                           str(tmp_path / "codes.pt")]) == 0
    payload = load_codes(tmp_path / "codes.pt")
    model = load_checkpoint(vqvae_path)
    test_images = torch.stack([img for img in _test_images(toy_cifar)])
    expected = encode_images(model, test_images)
    assert all(torch.equal(a, b) for a, b in zip(payload["splits"]["test"]["codes"], expected))
    assert codes_cli.main(["decode", "--codes", str(tmp_path / "codes.pt"), "--count", "8", "--out",
                           str(tmp_path / "decoded.png"), "--tensor", str(tmp_path / "decoded.pt")]) == 0
    decoded = torch.load(tmp_path / "decoded.pt", weights_only=True)["images"]
    reconstruction = model.reconstruct(to_images(test_images))
    assert torch.equal(decoded, decode_codes(model, expected))
    assert (decoded.float() / 255 - reconstruction).abs().max() <= 0.5 / 255 + 1e-6  # uint8 rounding only


def _test_images(folder: Path) -> torch.Tensor:
    from vqvae_fast.train.data import load_split

    return load_split(folder, train=False)[0]


def test_load_generator_rejects_other_files(tmp_path, pipeline):
    _, vqvae_path, _ = pipeline
    with pytest.raises(CheckpointError, match=r"expected a 'vqvae_fast/prior/1' checkpoint \(made by examples/train_prior"):
        load_generator(vqvae_path)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt: not a readable checkpoint"):
        load_generator(tmp_path / "broken.pt")


def test_sample_command_fails_cleanly_on_a_wrong_file(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"junk")
    done = subprocess.run([sys.executable, str(REPO / "examples/sample.py"), "--prior", str(tmp_path / "x.pt"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "x.pt" in done.stderr


def test_classifier_and_sample_scores(pipeline, toy_cifar, tmp_path, monkeypatch):
    """train_classifier.py then evaluate_samples.py: recognition rates of samples and of the
    VQ-VAE's reconstructions; --fid without the weights stops with the install hint."""
    kind, vqvae_path, prior_dir = pipeline
    assert load_example("train_classifier").main(["--data-dir", str(toy_cifar), "--out", str(tmp_path / "clf"),
                                                  "--steps", "6", "--eval-every", "3", "--batch-size", "32",
                                                  "--width", "8", "--quiet"]) == 0
    assert "test_accuracy" in json.loads((tmp_path / "clf/final.json").read_text())
    assert load_example("sample").main(["--prior", str(prior_dir / "checkpoint.pt"), "--per-class", "2", "--out",
                                        str(tmp_path / "s"), "--quiet"]) == 0
    evaluate = load_example("evaluate_samples")
    samples = str(tmp_path / "s/samples.pt")
    assert evaluate.main(["--samples", samples, "--classifier", str(tmp_path / "clf/checkpoint.pt"), "--data-dir",
                          str(toy_cifar), "--vqvae", str(vqvae_path), "--out", str(tmp_path / "scores.json")]) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores[samples]["samples"] == 20 and 0 <= scores[samples]["class_recognised"] <= 1
    assert scores["reconstructions"]["samples"] == 40 and 0 <= scores["reconstructions"]["class_recognised"] <= 1
    from vqvae_fast.train import metrics

    monkeypatch.setenv(metrics.INCEPTION_ENV, str(tmp_path / "missing.pt"))
    assert evaluate.main(["--samples", samples, "--data-dir", str(toy_cifar), "--fid"]) == 2
