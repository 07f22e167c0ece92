"""examples/tune_cifar10.py and vqvae_fast.train.tuning on tiny synthetic CIFAR-10 data (CPU, seconds)."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from vqvae_fast.train.cifar10 import TrainConfig, split_validation

optuna = pytest.importorskip("optuna", reason="the search is the optional extra [tune]; CI installs it")

TINY = ["--", "--batch-size", "16", "--channels", "16", "--res-channels", "8", "--res-blocks", "1"]
SEARCH = "lr,beta,gradient,code_dim"


def load_tuner():
    """The command behind examples/tune_cifar10.py: tests import the library."""
    from vqvae_fast.train.cli import tune_cifar10

    return tune_cifar10


def test_the_same_command_twice_continues_one_study(toy_cifar, tmp_path):
    tuner = load_tuner()
    first = tmp_path / "first.json"
    first.write_text(json.dumps([{"lr": 0.002, "gradient": "rotation"}]))
    argv = ["--data-dir", str(toy_cifar), "--out", str(tmp_path), "--trials", "2", "--steps", "4",
            "--val-images", "32", "--search", SEARCH, "--seed", "1", "--first", str(first), *TINY]
    assert tuner.main(argv) == 0
    assert tuner.main(argv) == 0
    study = optuna.load_study(study_name="vqvae_cifar10", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert len(study.trials) == 4
    baseline = {name: getattr(TrainConfig(), name) for name in SEARCH.split(",")}
    assert study.trials[0].params == baseline  # the defaults first, then the listed changes
    assert study.trials[1].params == {**baseline, "lr": 0.002, "gradient": "rotation"}
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["trials"] == 4 and best["val_psnr"] == study.best_value and best["params"] == study.best_params
    assert "examples/train_cifar10.py" in best["command"] and "--res-blocks 1" in best["command"]
    with open(tmp_path / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3]
    assert all(r["state"] == "COMPLETE" and 0 < float(r["val_psnr"]) < 60 for r in rows)
    for name in ("optimization_history.png", "param_importances.png"):
        assert (tmp_path / name).stat().st_size > 1000
    # every trial scored on validation images, never on the test images
    lines = [json.loads(x) for x in (tmp_path / "trials/0003/metrics.jsonl").read_text().splitlines()]
    assert lines and all("val_psnr" in x and "test_psnr" not in x for x in lines)


def test_a_pruned_trial_stops_at_its_first_evaluation(toy_cifar, tmp_path):
    from vqvae_fast.train.tuning import run_study

    never_good_enough = optuna.pruners.ThresholdPruner(lower=1e9)
    with pytest.raises(RuntimeError, match="no trial of the study completed"):
        run_study(str(toy_cifar), tmp_path, trials=1, steps=20, val_images=32, searched=["lr"],
                  fixed_flags=TINY[1:], pruner=never_good_enough, log=lambda line: None)
    (trial,) = optuna.load_study(study_name="vqvae_cifar10", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["last_step"] == 4  # 20 steps, 5 evaluations: stopped at the first
    assert len((tmp_path / "trials/0000/metrics.jsonl").read_text().splitlines()) == 1


def test_missing_optuna_gives_the_install_hint(toy_cifar, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    assert load_tuner().main(["--data-dir", str(toy_cifar), "--out", str(tmp_path), "--trials", "1"]) == 2
    assert "pip install optuna matplotlib" in capsys.readouterr().err


def test_unknown_search_parameter_is_refused(toy_cifar, tmp_path):
    from vqvae_fast.train.tuning import run_study

    with pytest.raises(ValueError, match="unknown search parameters"):
        run_study(str(toy_cifar), tmp_path, trials=1, steps=2, searched=["learning_rate"])


def test_validation_split_is_fixed_and_disjoint():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 3, 2, 2)
    train, val = split_validation(images, 10)
    again_train, again_val = split_validation(images, 10)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    ids = lambda x: set(x[:, 0, 0, 0].tolist())  # noqa: E731
    assert len(ids(val)) == 10 and len(ids(train)) == 40 and not ids(val) & ids(train)
    with pytest.raises(ValueError, match="val-images"):
        split_validation(images, 50)
