"""Smoke test of benchmarks/bench_residual.py: its --quick mode end to end on the CPU (two tiny
shapes, 1 round), and its memory probe once.

Checks the JSON it writes: both tasks of every provider that can run here ran, passed their check
and have a time; vector-quantize-pytorch, an optional dependency, is skipped with the install hint
when it is absent (simulated here too). No timing is judged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
PROVIDERS = {"vqvae_fast", "vector-quantize-pytorch", "cdist loop", "stage loop"}


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_residual

    # The floor's large GEMM (2048^3, 9 calls) is most of a tiny run's time: a fixed rate here.
    monkeypatch.setattr(bench_residual, "gemm_rate", lambda device, dtype: 1e11)
    return bench_residual


def run(bench, tmp_path, *args: str) -> dict:
    out = tmp_path / "bench_residual.json"
    assert bench.main([*args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def peer_installed() -> bool:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def assert_timed(row: dict, n: int, stages: int) -> None:
    assert row["status"] == "ok", row
    assert row["median_s"] > 0 and len(row["samples_s"]) == 1 and row["ours_speedup"] > 0
    check = row["check"]
    assert check["ok"] and check["rows_checked"] == n and len(check["stage_inexact_fractions"]) == stages


def test_quick_mode_writes_json(bench, tmp_path, capsys):
    data = run(bench, tmp_path, "--quick", "--no-memory")
    assert data["machine"]["cpu"] and data["machine"]["torch_threads"] >= 1 and "load_average_end" in data["machine"]
    assert data["settings"]["tasks"] == ["train", "encode"] and data["settings"]["rounds"] == 1
    assert [r["shape"]["name"] for r in data["results"]] == list(bench.QUICK_SHAPES)
    assert [r["shape"]["cosine"] for r in data["results"]] == [False, True]  # quick-b: cosine, as DAC's
    for result in data["results"]:
        shape = result["shape"]
        assert set(shape) == {"n", "s", "k", "d", "cosine", "name", "note"}
        assert result["search_flops"] == 2 * shape["n"] * shape["k"] * shape["d"] * shape["s"]
        assert result["tasks"] == ["train", "encode"] and 0 <= result["other_processes_cpu_share"]
        rows = {(r["task"], r["provider"]): r for r in result["rows"]}
        assert set(rows) == {(task, name) for task in ("train", "encode") for name in PROVIDERS}
        for (task, name), row in rows.items():
            if name == "vector-quantize-pytorch" and not peer_installed():
                assert row["status"] == "skipped" and "pip install vector-quantize-pytorch" in row["reason"]
                continue
            assert_timed(row, shape["n"], shape["s"])
            assert row["time_vs_search_floor"] > 0 and "peak_extra_bytes" not in row
        for task in ("train", "encode"):
            ours = rows[task, "vqvae_fast"]
            assert ours["ours_speedup"] == 1.0
            assert ours["check"]["inexact_fraction"] == 0  # every stage's CPU search is exact
    assert "vqvae_fast" in capsys.readouterr().out


def test_peer_absent_is_skipped_with_hint(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vector_quantize_pytorch", None)  # import fails as if not installed
    data = run(bench, tmp_path, "--shape", "128", "2", "32", "8", "--rounds", "1", "--no-memory", "--autocast", "bf16",
               "--providers", "vqvae_fast", "vector-quantize-pytorch")
    rows = {(r["task"], r["provider"]): r for r in data["results"][0]["rows"]}
    for task in ("train", "encode"):
        assert rows[task, "vector-quantize-pytorch"]["status"] == "skipped"
        assert "pip install vector-quantize-pytorch" in rows[task, "vector-quantize-pytorch"]["reason"]
        assert rows[task, "vector-quantize-pytorch"]["ours_speedup"] is None
        assert_timed(rows[task, "vqvae_fast"], 128, 2)


def test_memory_probe(bench, tmp_path):
    """The CPU memory probe (a fresh process from the timed quantizer's state) gives a number."""
    data = run(bench, tmp_path, "--shape", "128", "2", "32", "8", "--rounds", "1",
               "--providers", "vqvae_fast", "--tasks", "encode")
    [row] = data["results"][0]["rows"]
    assert row["task"] == "encode" and row["status"] == "ok"
    assert isinstance(row["peak_extra_bytes"], int) and row["peak_extra_bytes"] >= 0


def test_loops_encode_with_ours_trained_codebooks(bench):
    shape = bench.QUICK_SHAPES["quick-a"]
    providers = {p.name: p for p in bench.PROVIDERS}
    quantizers = {name: bench.build_quantizer(providers[name], shape, "cpu", 2.0)
                  for name in (bench.OURS, bench.STAGE_LOOP)}
    quantizers[bench.OURS].call(torch.randn(shape.n, shape.d))  # k-means init
    bench.share_trained_codebooks(quantizers)
    for ours, loop in zip(quantizers[bench.OURS].codebooks(), quantizers[bench.STAGE_LOOP].codebooks()):
        assert torch.equal(ours.detach(), loop.detach())
