"""benchmarks/rate_distortion.py: the sweep's bookkeeping (each point one trainer run, kept across
invocations, the plot), with the trainer replaced by a stand-in (a real point takes minutes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def rate_distortion(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import rate_distortion

    runs = []

    def fake_train(config):
        runs.append(config)
        bits = 64 * config.stages * {64: 6, 512: 9, 4096: 12}[config.num_codes]
        return {"code_bits_per_image": bits, "test_psnr": 20.0 + bits / 1000, "test_mse": 0.01, "codes_used": 5}

    monkeypatch.setattr(rate_distortion, "train", fake_train)
    return rate_distortion, runs


def test_each_point_is_one_run_and_a_second_invocation_keeps_them(rate_distortion, tmp_path):
    module, runs = rate_distortion
    argv = ["--data-dir", str(tmp_path), "--steps", "7", "--points", "flat 512,rq 2x64", "--json",
            str(tmp_path / "rd.json"), "--plot", str(tmp_path / "rd.png"), "--out", str(tmp_path / "runs")]
    assert module.main(argv) == 0
    assert [(c.model, c.stages, c.num_codes, c.steps) for c in runs] == [("vqvae", 1, 512, 7), ("rqvae", 2, 64, 7)]
    data = json.loads((tmp_path / "rd.json").read_text())
    assert [r["code_bits_per_image"] for r in data["results"]] == [576, 768]
    assert data["command"].startswith("python benchmarks/rate_distortion.py --data-dir")
    assert (tmp_path / "rd.png").stat().st_size > 1000
    assert module.main([*argv[:5], "flat 512,rq 4x512", *argv[6:]]) == 0  # flat 512 kept, rq 4x512 added
    assert len(runs) == 3 and runs[-1].stages == 4
    with pytest.raises(SystemExit):
        module.main([*argv[:5], "rq 3x7", *argv[6:]])


def test_seeds_run_each_point_per_seed_and_the_summary_averages(rate_distortion, tmp_path):
    module, runs = rate_distortion
    out = tmp_path / "rd.json"
    out.write_text(json.dumps({"results": [  # written before --seeds: seed 0
        {"name": "flat 512", "model": "vqvae", "stages": 1, "num_codes": 512, "code_bits_per_image": 576,
         "test_psnr": 21.0, "test_mse": 0.01, "codes_used": 5, "wall_s": 1.0}]}))
    argv = ["--data-dir", str(tmp_path), "--points", "flat 512", "--seeds", "0", "1", "--json", str(out),
            "--out", str(tmp_path / "runs")]
    assert module.main(argv) == 0
    assert [c.seed for c in runs] == [1]  # seed 0 kept
    data = json.loads(out.read_text())
    [point] = module.summary(data["results"])
    assert point["seeds"] == [0, 1] and point["test_psnr"] == pytest.approx((21.0 + 20.576) / 2)
