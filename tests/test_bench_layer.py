"""Smoke test of benchmarks/bench_layer.py: its main on one tiny shape, 1 round, on the CPU.

Checks the JSON it writes: every provider that can run here ran, passed its check and has a
time; vector-quantize-pytorch, an optional dependency, is skipped with the install hint when it
is absent (simulated here too). No timing is judged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--shape", "256", "64", "16", "--rounds", "1", "--no-memory"]


@pytest.fixture
def bench_layer(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_layer

    # The floor's large GEMM (2048^3, 9 calls) is most of a tiny run's time: a fixed rate here.
    monkeypatch.setattr(bench_layer, "gemm_rate", lambda device, dtype: 1e11)
    return bench_layer


def run(bench_layer, tmp_path, *extra: str) -> dict:
    out = tmp_path / "bench_layer.json"
    assert bench_layer.main([*TINY, *extra, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def rows_by_name(result: dict) -> dict:
    [shape] = result["results"]
    assert shape["shape"] == dict(n=256, k=64, d=16, cosine=shape["shape"]["cosine"], name="custom")
    return {row["provider"]: row for row in shape["rows"]}


def assert_timed(row: dict) -> None:
    assert row["status"] == "ok", row
    assert row["check"]["ok"] and row["check"]["rows_checked"] == 256
    assert row["median_s"] > 0 and len(row["samples_s"]) == 1


def test_tiny_shape_writes_json(bench_layer, tmp_path, capsys):
    result = run(bench_layer, tmp_path)
    assert result["machine"]["cpu"] and result["machine"]["torch_threads"] >= 1
    assert result["settings"]["device"] == "cpu" and result["settings"]["autocast"] == "none"
    rows = rows_by_name(result)
    assert set(rows) == {"vqvae_fast", "vector-quantize-pytorch", "cdist layer"}
    for name in ("vqvae_fast", "cdist layer"):
        assert_timed(rows[name])
    assert rows["vqvae_fast"]["check"]["inexact_fraction"] == 0  # our CPU search is exact
    assert rows["vqvae_fast"]["ours_speedup"] == 1.0
    peer = rows["vector-quantize-pytorch"]
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        assert peer["status"] == "skipped" and "pip install vector-quantize-pytorch" in peer["reason"]
    else:
        assert_timed(peer)
        assert peer["ours_speedup"] > 0
    assert "vqvae_fast" in capsys.readouterr().out


def test_peer_absent_is_skipped_with_hint(bench_layer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)  # import fails as if not installed
    rows = rows_by_name(run(bench_layer, tmp_path, "--autocast", "bf16", "--providers", "vqvae_fast",
                            "vector-quantize-pytorch"))
    assert rows["vector-quantize-pytorch"]["status"] == "skipped"
    assert "pip install vector-quantize-pytorch" in rows["vector-quantize-pytorch"]["reason"]
    assert_timed(rows["vqvae_fast"])


def test_cosine_shape(bench_layer, tmp_path):
    rows = rows_by_name(run(bench_layer, tmp_path, "--cosine", "--providers", "vqvae_fast", "cdist layer"))
    assert_timed(rows["cdist layer"])
    if bench_layer.ours_has_cosine():
        assert_timed(rows["vqvae_fast"])
    else:
        assert rows["vqvae_fast"]["status"] == "skipped" and "distance" in rows["vqvae_fast"]["reason"]
