"""Issue 22's first-hour trips, each a clear error (or warning) naming the problem."""
from __future__ import annotations

import pytest
import torch

from vqvae_fast import VQVAE, VQVAE2, InputError, VectorQuantizer, quantize
from vqvae_fast.checkpoint import CheckpointError, read_checkpoint

TINY = dict(num_codes=16, code_dim=8, channels=16, res_channels=8, num_res_blocks=1)


def test_typos_in_backend_and_gradient_are_input_errors():
    z = torch.randn(4, 3)
    with pytest.raises(InputError, match="unknown backend 'tritn'"):
        quantize(z, z, backend="tritn")
    with pytest.raises(InputError, match="unknown gradient estimator 'rotate'"):
        quantize(z, z, gradient="rotate")
    with pytest.raises(InputError, match="beta must be"):
        VectorQuantizer(8, 3, beta=-1.0)
    with pytest.raises(ValueError):  # still a ValueError for existing except clauses
        quantize(z, z, backend="nope")


@pytest.mark.parametrize("model_class", (VQVAE, VQVAE2))
def test_decoding_bad_codes_names_them(model_class):
    model = model_class(**TINY).eval()
    codes = model.encode_levels(torch.rand(2, 3, 32, 32))
    decode = model.decode_levels
    for bad, match in ((16, r"in \[0, 16\), got values from"), (-1, r"in \[0, 16\)")):
        broken = tuple(c.clone() for c in codes)
        broken[-1][0, 0, 0] = bad
        with pytest.raises(InputError, match=match):
            decode(broken)
    with pytest.raises(InputError, match="integer code indices, got torch.float32"):
        decode(tuple(c.float() for c in codes))


def test_encoding_0_to_255_floats_warns():
    model = VQVAE(**TINY).eval()
    with pytest.warns(UserWarning, match=r"floats in \[0, 1\].*divide by 255"):
        model.encode(torch.rand(2, 3, 32, 32) * 255)
    with pytest.warns(UserWarning, match="divide by 255"):
        VQVAE2(**TINY).eval().encode_levels(torch.rand(2, 3, 32, 32) * 255)


def test_a_truncated_checkpoint_message_is_a_whole_sentence(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "vqvae_fast/1", "weights": torch.randn(4096)}, path)
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and message.endswith(".)"), message
    assert "likelihood" not in message  # torch's advice, cut mid-sentence before


def test_a_resumed_run_says_which_time_is_its_own():
    from vqvae_fast.train.cifar10 import seconds

    assert seconds({"wall_s": 12.2, "this_run_s": 12.2}) == "12 s"
    assert seconds({"wall_s": 30.0, "this_run_s": 12.0}) == "30 s in all (12 s this run)"


def test_every_flag_of_every_command_has_help_and_no_empty_default():
    """--help of each command: a line for every flag, and no "(default: None)" or a default said twice."""
    import argparse
    import re

    from vqvae_fast.train import cifar10, prior_trainer
    from vqvae_fast.train.cli import codes, evaluate_samples, sample, train_classifier, tune_cifar10

    parsers = [module.build_parser() for module in (cifar10, prior_trainer, sample, train_classifier,
                                                     evaluate_samples, tune_cifar10, codes)]
    for parser in list(parsers):  # codes' encode and decode
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    for parser in parsers:
        for action in parser._actions:
            if action.dest != "help" and not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help"
        text = parser.format_help()
        assert "default: None" not in text, parser.prog
        assert not re.search(r"\(default: [^)]*\)\s*\(default:", text), parser.prog


def test_tuner_mistakes_are_one_line_and_leave_nothing(tmp_path, capsys):
    from vqvae_fast.train.cli import tune_cifar10

    out = tmp_path / "runs" / "tune"
    for flags, message in ((["--trials", "0"], "--trials must be >= 1"), (["--search", "lr,foo"], "unknown settings"),
                           (["--first", str(tmp_path / "none.json")], "--first")):
        with pytest.raises(SystemExit) as exit_:
            tune_cifar10.main(["--data-dir", str(tmp_path), "--out", str(out), *flags])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert tune_cifar10.main(["--data-dir", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "the tuner never downloads" in error and "--no-download" not in error
    assert not (tmp_path / "runs").exists()


def test_a_failed_prior_command_leaves_no_empty_folder(tmp_path, capsys):
    from vqvae_fast.train import prior_trainer

    (tmp_path / "not_a_checkpoint.pt").write_text("readme")
    out = tmp_path / "runs" / "e6"
    assert prior_trainer.main(["--vqvae", str(tmp_path / "not_a_checkpoint.pt"), "--data-dir", str(tmp_path),
                               "--out", str(out)]) == 2
    assert "--vqvae" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert prior_trainer.main(["--out", str(out)]) == 2  # neither --vqvae nor --codes
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("damage, message", [
    (dict(data=lambda d: d.astype("int64") + 44), "pixel values must be in 0..255"),
    (dict(data=lambda d: d.astype("int64") - 300), "pixel values must be in 0..255"),
    (dict(labels=lambda l: [99] + l[1:]), "labels must be classes 0..9"),
    (dict(labels=lambda l: [-1] + l[1:]), "labels must be classes 0..9"),
    (dict(labels=lambda l: [l]), "n labels"),
    (dict(data=lambda d: d.astype("float32")), "integers"),
])
def test_damaged_cifar_batches_are_named(tmp_path, damage, message):
    """A batch whose pixels would wrap (300 -> 44), whose labels are not classes or are nested is
    named in the error, not loaded."""
    import pickle

    import numpy as np

    from vqvae_fast.train.data import load_split

    data = np.random.default_rng(0).integers(0, 256, (20, 3072)).astype(np.uint8)
    labels = list(range(10)) * 2
    batch = {b"data": damage.get("data", lambda d: d)(data), b"labels": damage.get("labels", lambda l: l)(labels)}
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(ValueError, match=message):
        load_split(tmp_path, train=False)


def test_a_changed_or_inconsistent_checkpoint_is_named(tmp_path):
    """Every checkpoint carries a checksum of its contents: one changed weight is an error naming
    the file; a config that does not fit the weights, an unknown key, a non-dict config or another
    model class are CheckpointErrors naming it too, not bare RuntimeError/TypeError."""
    from vqvae_fast import load_checkpoint
    from vqvae_fast.checkpoint import CHECKSUM_KEY, content_digest
    from vqvae_fast.models.vqvae import save_checkpoint

    path = tmp_path / "model.pt"
    save_checkpoint(path, VQVAE(**TINY))
    assert isinstance(load_checkpoint(path), VQVAE)
    raw = torch.load(path, weights_only=True)
    raw["model"]["quantizer.codebook"][0, 0] += 1e-3  # one weight changed after writing
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match="model.pt: its contents do not match its checksum"):
        load_checkpoint(path)

    def resigned(change):  # a consistent checksum over a changed payload: the model checks must hold
        payload = torch.load(tmp_path / "good.pt", weights_only=True)
        payload.pop(CHECKSUM_KEY)
        change(payload)
        payload[CHECKSUM_KEY] = content_digest(payload)
        torch.save(payload, path)

    save_checkpoint(tmp_path / "good.pt", VQVAE(**TINY))
    for change, match in ((lambda p: p["config"].update(num_codes=32), "do not make a vqvae"),
                          (lambda p: p["model"].pop("quantizer.codebook"), "do not make a vqvae"),
                          (lambda p: p["config"].update(colour="red"), "do not make a vqvae"),
                          (lambda p: p.update(config=[1, 2]), "not a dict"),
                          (lambda p: p.update(model_class="vqvae3"), "unknown model class")):
        resigned(change)
        with pytest.raises(CheckpointError, match=f"model.pt: .*{match}"):
            load_checkpoint(path)


def test_sparse_and_mkldnn_inputs_are_input_errors():
    z, codebook = torch.randn(5, 3), torch.randn(4, 3)
    with pytest.raises(InputError, match="dense.*sparse_coo.*to_dense"):
        quantize(z.to_sparse(), codebook)
    with pytest.raises(InputError, match="codebook must be a dense"):
        quantize(z, codebook.to_sparse())
    with pytest.raises(InputError, match="mkldnn"):
        quantize(z.to_mkldnn(), codebook)
