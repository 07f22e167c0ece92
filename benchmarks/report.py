"""Markdown tables from result JSON files, for RESULTS.md (so no number is copied by hand).

    python benchmarks/report.py benchmarks/results/*.json

Understands the files of compare.py --json, sweep.py and bench_training.py --json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def _x(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _machine(m: dict) -> str:
    where = m.get("gpu") or m["cpu"]
    return (f"{where}, {m['torch_threads']} torch threads, torch {m['torch']}, {m['date']}, "
            f"commit {(m.get('git_commit') or '?')[:10]}{' + local changes' if m.get('git_dirty') else ''}; "
            f"load average {m['load_average'][0]:.2f}"
            + (f" (start {m['load_average_start'][0]:.2f})" if "load_average_start" in m else "")
            + (f" (end {m['load_average_end'][0]:.2f})" if "load_average_end" in m else ""))


def compare_table(data: dict) -> str:
    p = data["point"]
    gemm = next((r for r in data["rows"] if r["provider"] == "GEMM floor" and r.get("status") == "ok"), None)
    lines = [f"**{data['task']}**, N={p['n']} K={p['k']} D={p['d']} {SHORT_DTYPE[p['dtype']]}, median of "
             f"{data['rounds']} interleaved rounds; 2·N·K·D = {data['flops'] / 1e9:.1f} GFLOP; "
             + (f"bare GEMM {gemm['gflops']:.0f} GFLOP/s, " if gemm else "")
             + f"large-GEMM rate {data['large_gemm_gflops']:.0f} GFLOP/s",
             "",
             "| provider | median ms | min..max ms | GFLOP/s | speedup vs cdist | vs addmm | vs compiled addmm "
             "| vs flash-kmeans | vs faiss | time / GEMM | time / 3 TF32 GEMMs | time / (flops ÷ large-GEMM rate) "
             "| peak extra MiB | check |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['provider']} | {r['status']}: {r['reason']} |" + " |" * 12)
            continue
        check = r.get("check") or {}
        check_text = "–" if not check else (("ok" if check["ok"] else "**WRONG**")
                                            + f", {100 * check['inexact_fraction']:.1f}% rows inexact"
                                            + (f", grad err {check['grad_error']:.0e}" if "grad_error" in check else ""))
        lines.append(f"| {r['provider']} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f}..{r['max_s'] * 1e3:.1f} "
                     f"| {r['gflops']:.1f} | {_x(r.get('speedup_vs_cdist'))} | {_x(r.get('speedup_vs_addmm'))} "
                     f"| {_x(r.get('speedup_vs_compiled'))} | {_x(r.get('speedup_vs_flash_kmeans'))} "
                     f"| {_x(r.get('speedup_vs_faiss'))} "
                     f"| {_x(r.get('time_vs_gemm'))} | {_x(r.get('time_vs_3xtf32_gemm'))} "
                     f"| {_x(r.get('time_vs_peak_gemm_rate'))} | {_mib(r.get('peak_extra_bytes'))} | {check_text} |")
    return "\n".join(lines)


def sweep_table(data: dict) -> str:
    lines = [f"**{data['task']} sweep**, grid {data['grid']}, median of {data['rounds']} interleaved rounds per "
             f"point, {data.get('elapsed_s', 0) / 60:.1f} min",
             "",
             "| N | K | D | dtype | ours ms | cdist ms | addmm ms | FAISS ms | GEMM ms | vs cdist | vs addmm "
             "| vs FAISS | time / GEMM | time / flop floor | time / memory floor | ours MiB | cdist MiB | check |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for result in data["points"]:
        p = result["point"]
        rows = {r["provider"]: r for r in result["rows"]}
        ours = [r for r in result["rows"] if r["kind"] == "ours" and r.get("status") == "ok"]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["median_s"])

        def ms(name):
            r = rows.get(name, {})
            return f"{r['median_s'] * 1e3:.2f}" if r.get("status") == "ok" else r.get("status", "–")

        name = "" if len(ours) == 1 else f" ({best['provider']})"
        check = best.get("check") or {}
        lines.append(f"| {p['n']} | {p['k']} | {p['d']} | {SHORT_DTYPE[p['dtype']]} | {best['median_s'] * 1e3:.2f}{name} "
                     f"| {ms('cdist')} | {ms('addmm')} | {ms('faiss')} | {ms('GEMM floor')} "
                     f"| {_x(best.get('speedup_vs_cdist'))} | {_x(best.get('speedup_vs_addmm'))} "
                     f"| {_x(best.get('speedup_vs_faiss'))} | {_x(best.get('time_vs_gemm'))} "
                     f"| {_x(best.get('time_vs_peak_gemm_rate'))} | {_x(best.get('time_vs_memory_floor'))} "
                     f"| {_mib(best.get('peak_extra_bytes'))} | {_mib(rows.get('cdist', {}).get('peak_extra_bytes'))} "
                     f"| {'ok' if check.get('ok', True) else '**WRONG**'} |")
    if data.get("not_run"):
        lines.append(f"\nNot run (time budget): {len(data['not_run'])} points.")
    return "\n".join(lines)


def training_table(data: dict) -> str:
    lines = [f"**training step**, batch {data['batch_size']} of {data['image_size']}×{data['image_size']} images "
             f"(N={data['n_vectors']} vectors per step){', bf16 autocast' if data['amp'] else ''}, median of "
             f"{data['rounds']} interleaved rounds of {data['steps_per_round']} steps",
             "",
             "| model | images/s | min..max | ms/step | vs cdist quantizer |",
             "|---|---:|---:|---:|---:|"]
    for r in data["results"]:
        lines.append(f"| {r['model']} | {r['images_per_s']:.1f} | {r['min_images_per_s']:.1f}.."
                     f"{r['max_images_per_s']:.1f} | {r['ms_per_step']:.0f} | {_x(r['speedup_vs_cdist'])} |")
    return "\n".join(lines)


def render(path: Path) -> str:
    data = json.loads(path.read_text())
    if "points" in data:
        table = sweep_table(data)
    elif "batch_size" in data:
        table = training_table(data)
    else:
        table = compare_table(data)
    m = data["machine"]
    shares = [p["other_processes_cpu_share"] for p in data.get("points", [data]) if "other_processes_cpu_share" in p]
    others = f"; other processes' share of the CPUs while timing: {max(shares):.0%}" if shares else ""
    if shares and "points" in data:
        others += " at most"
    return f"{table}\n\n<sub>`{m['command']}` → `{path.as_posix()}`; {_machine(m)}{others}</sub>\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("\n".join(render(f) for f in args.files))


if __name__ == "__main__":
    main()
