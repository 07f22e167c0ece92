"""Smoke test of benchmarks/bench_layer.py: its main on one tiny shape, 1 round, on the CPU.

Checks the JSON it writes: every provider that can run here ran, passed its check and has a
time; vector-quantize-pytorch, an optional dependency, is skipped with the install hint when it
is absent (simulated here too), while the drop-in vqvae_fast.compat, which does not need it, still
runs; the drop-in is built with the peer's arguments and its ratio to the peer is recorded. No
timing is judged.
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
    assert set(rows) == {"vqvae_fast", "vqvae_fast.compat", "vector-quantize-pytorch", "cdist layer"}
    assert rows["vqvae_fast.compat"]["kind"] == "compat"
    for name in ("vqvae_fast", "vqvae_fast.compat", "cdist layer"):
        assert_timed(rows[name])
    for name in ("vqvae_fast", "vqvae_fast.compat"):
        assert rows[name]["check"]["inexact_fraction"] == 0  # our CPU search is exact, the drop-in's too
    assert rows["vqvae_fast"]["ours_speedup"] == 1.0 and rows["vqvae_fast.compat"]["ours_speedup"] > 0
    peer = rows["vector-quantize-pytorch"]
    out = capsys.readouterr().out
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        assert peer["status"] == "skipped" and "pip install vector-quantize-pytorch" in peer["reason"]
        assert rows["vqvae_fast.compat"]["vs_peer_speedup"] is None
    else:
        assert_timed(peer)
        assert peer["ours_speedup"] > 0 and peer["vs_peer_speedup"] == 1.0
        assert rows["vqvae_fast.compat"]["vs_peer_speedup"] > 0
        assert "the drop-in vqvae_fast.compat is" in out
    assert "vqvae_fast" in out


def test_compat_gets_the_peers_arguments(bench_layer, monkeypatch):
    """The drop-in is constructed with exactly the arguments the peer provider uses (rotation_trick=False too)."""
    import vqvae_fast.compat

    seen = {}

    class Recording(vqvae_fast.compat.VectorQuantize):
        def __init__(self, **options):
            seen.update(options)
            super().__init__(**options)

    monkeypatch.setattr(vqvae_fast.compat, "VectorQuantize", Recording)
    shape = bench_layer.LayerShape(256, 64, 16, cosine=True)
    layer = bench_layer.build_compat(shape, "cpu", 2.0)
    assert seen == bench_layer.peer_options(shape, 2.0)
    assert seen["rotation_trick"] is False and seen["use_cosine_sim"] is True
    assert isinstance(layer.module, Recording) and tuple(layer.codebook().shape) == (64, 16)


def test_peer_absent_is_skipped_with_hint(bench_layer, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)  # import fails as if not installed
    rows = rows_by_name(run(bench_layer, tmp_path, "--autocast", "bf16", "--providers", "vqvae_fast",
                            "vqvae_fast.compat", "vector-quantize-pytorch"))
    assert rows["vector-quantize-pytorch"]["status"] == "skipped"
    assert "pip install vector-quantize-pytorch" in rows["vector-quantize-pytorch"]["reason"]
    assert_timed(rows["vqvae_fast"])
    assert_timed(rows["vqvae_fast.compat"])  # the drop-in does not need the peer installed


def test_cosine_shape(bench_layer, tmp_path):
    rows = rows_by_name(run(bench_layer, tmp_path, "--cosine", "--providers", "vqvae_fast", "vqvae_fast.compat",
                            "cdist layer"))
    assert_timed(rows["cdist layer"])
    assert_timed(rows["vqvae_fast.compat"])
    assert rows["vqvae_fast.compat"]["check"]["inexact_fraction"] == 0
    if bench_layer.ours_has_cosine():
        assert_timed(rows["vqvae_fast"])
    else:
        assert rows["vqvae_fast"]["status"] == "skipped" and "distance" in rows["vqvae_fast"]["reason"]


def test_the_memory_allocation_settings_are_recorded(bench_layer, tmp_path, monkeypatch):
    """Huge pages or a preloaded allocator change the baselines' times (RESULTS.md): the JSON says which ran."""
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    allocation = run(bench_layer, tmp_path, "--providers", "vqvae_fast")["machine"]["memory_allocation"]
    assert allocation["THP_MEM_ALLOC_ENABLE"] == "1" and "LD_PRELOAD" not in allocation
