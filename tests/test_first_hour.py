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
