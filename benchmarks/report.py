"""Markdown tables from result JSON files, and benchmarks/RESULTS.md from its template (so no number is copied by hand).

    python benchmarks/report.py benchmarks/results/*.json          # one table per file, to stdout
    python benchmarks/report.py --render benchmarks/RESULTS.template.md   # the whole document, to stdout
    python benchmarks/report.py --write                             # regenerate benchmarks/RESULTS.md
    python benchmarks/report.py --check                             # exit 1 if RESULTS.md is stale or hand-edited

Understands the files of compare.py --json, sweep.py, bench_training.py --json, bench_layer.py --json, bench_residual.py --json, cpu_paths.py,
settle_rate.py --json, scripts/inspect_kernels.py --json and pytest-benchmark's --benchmark-json.

In a template, a line that is only a placeholder comment is replaced by a table; paths are relative to the
template's folder, options are key=value words:

    <!-- report: results/X.json -->                       the table and caption of one compare/sweep/training file
    <!-- report: keypoint NEAREST FORWARD BACKWARD -->      one line per provider over the three tasks of one point
    <!-- report: shapes FILE... -->                         one line per compare.py file (ours against the baselines)
    <!-- report: pytest_benchmark FILE rows=NxKxD:task,... -->
    <!-- report: bench_layer FP32_FILE BF16_FILE -->
    <!-- report: bench_layer_allocation DEFAULT_FILE OTHER_FILE -->  the same run under two memory-allocation settings
    <!-- report: bench_layer_compat FILE... -->            the drop-in vqvae_fast.compat against the peer, one table per file
    <!-- report: bench_residual FILE -->
    <!-- report: cpu_paths FILE -->                         cpu_paths.py: each CPU path forced, against cdist and FAISS
    <!-- report: settle_rate FILE select=D:K:codebook,... -->   (codebook: random or near, the data)
    <!-- report: inspect FILE arch=sm_90 triton=3.8.0 budget_kb=227 seconds=2 -->

A line starting with `<!-- template:` is left out; every other line is copied as it is.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
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
            + (f" (end {m['load_average_end'][0]:.2f})" if "load_average_end" in m else "")
            + "".join(f"; {k}={v}" for k, v in m.get("memory_allocation", {}).items() if k != "transparent_hugepage"))


# (header, row key) of compare_table's optional columns: shown when some row of the file has the key, so a
# file from before a baseline or floor existed renders as it did then.
_OPTIONAL_SPEEDUPS = [("vs flash-kmeans", "speedup_vs_flash_kmeans"), ("vs faiss", "speedup_vs_faiss")]


def compare_table(data: dict) -> str:
    p = data["point"]
    gemm = next((r for r in data["rows"] if r["provider"] == "GEMM floor" and r.get("status") == "ok"), None)
    speedups = [(h, k) for h, k in _OPTIONAL_SPEEDUPS if any(k in r for r in data["rows"])]
    tf32 = any("time_vs_3xtf32_gemm" in r for r in data["rows"])
    header = (["provider", "median ms", "min..max ms", "GFLOP/s", "speedup vs cdist", "vs addmm", "vs compiled addmm"]
              + [h for h, _ in speedups] + ["time / GEMM"] + (["time / 3 TF32 GEMMs"] if tf32 else [])
              + ["time / (flops ÷ large-GEMM rate)", "peak extra MiB", "check"])
    lines = [f"**{data['task']}**, N={p['n']} K={p['k']} D={p['d']} {SHORT_DTYPE[p['dtype']]}, median of "
             f"{data['rounds']} interleaved rounds; 2·N·K·D = {data['flops'] / 1e9:.1f} GFLOP; "
             + (f"bare GEMM {gemm['gflops']:.0f} GFLOP/s, " if gemm else "")
             + f"large-GEMM rate {data['large_gemm_gflops']:.0f} GFLOP/s",
             "",
             "| " + " | ".join(header) + " |",
             "|---|" + "---:|" * (len(header) - 2) + "---|"]
    for r in data["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['provider']} | {r['status']}: {r['reason']} |" + " |" * (len(header) - 2))
            continue
        check = r.get("check") or {}
        check_text = "–" if not check else (("ok" if check["ok"] else "**WRONG**")
                                            + f", {100 * check['inexact_fraction']:.1f}% rows inexact"
                                            + (f", grad err {check['grad_error']:.0e}" if "grad_error" in check else ""))
        cells = ([r["provider"], f"{r['median_s'] * 1e3:.1f}", f"{r['min_s'] * 1e3:.1f}..{r['max_s'] * 1e3:.1f}",
                  f"{r['gflops']:.1f}", _x(r.get("speedup_vs_cdist")), _x(r.get("speedup_vs_addmm")),
                  _x(r.get("speedup_vs_compiled"))]
                 + [_x(r.get(k)) for _, k in speedups] + [_x(r.get("time_vs_gemm"))]
                 + ([_x(r.get("time_vs_3xtf32_gemm"))] if tf32 else [])
                 + [_x(r.get("time_vs_peak_gemm_rate")), _mib(r.get("peak_extra_bytes")), check_text])
        lines.append("| " + " | ".join(cells) + " |")
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


def _sig(value: float) -> str:
    """Three significant figures, trailing zeros kept (2.10, 13.7, 126)."""
    return f"{value:.{2 if abs(value) < 10 else 1 if abs(value) < 100 else 0}f}"


def _ms(seconds: float) -> str:
    """Milliseconds: one decimal below a second, none above."""
    return f"{seconds * 1e3:.{1 if seconds < 1 else 0}f}"


def _shape(p: dict) -> str:
    return f"{p['n']} × {p['k']} × {p['d']}"


# Provider names as the key-point table spells them.
KEYPOINT_LABELS = {"cdist": "cdist + argmin + gather", "addmm": "addmm (‖e‖² − 2zEᵀ) + argmin + gather",
                   "compiled addmm": "torch.compile(addmm version)", "GEMM floor": "bare GEMM z @ Eᵀ (floor)",
                   "vqvae_fast[cpu]": "**vqvae_fast** (`cpu` backend)"}


def keypoint_table(nearest: dict, forward: dict, backward: dict) -> str:
    """One line per provider: the three tasks of compare.py at one point (files of the same point and run)."""
    rows = [{r["provider"]: r for r in d["rows"] if r.get("status") == "ok"} for d in (nearest, forward, backward)]
    lines = ["| provider | nearest_code ms | forward ms | forward+backward ms | speedup vs cdist (fwd / fwd+bwd) "
             "| forward time ÷ bare GEMM time | peak extra memory, forward (MiB) | peak extra memory, fwd+bwd (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, f in rows[1].items():
        n, b = rows[0].get(name), rows[2].get(name)
        lines.append(f"| {KEYPOINT_LABELS.get(name, name)} | {n['median_s'] * 1e3:.1f} | {f['median_s'] * 1e3:.1f} "
                     f"| {b['median_s'] * 1e3:.1f} | {_x(f.get('speedup_vs_cdist'))} / {_x(b.get('speedup_vs_cdist'))} "
                     f"| {_x(f.get('time_vs_gemm'))} | {_mib(f.get('peak_extra_bytes'))} "
                     f"| {_mib(b.get('peak_extra_bytes'))} |")
    return "\n".join(lines)


def shapes_table(files: list[dict]) -> str:
    """One line per compare.py file: threads, shape, the baselines' and our median, our speedups."""
    lines = ["| threads | N × K × D, fp32 | cdist ms | addmm ms | FAISS ms | ours ms | vs cdist | vs addmm | vs FAISS "
             "| ours |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for data in files:
        rows = {r["provider"]: r for r in data["rows"]}
        ours = next(r for r in data["rows"] if r.get("kind") == "ours")
        check = ours.get("check") or {}
        exact = "exact" if check.get("ok") and check.get("inexact_fraction") == 0 else (
            f"{100 * check.get('inexact_fraction', 0):.1f}% rows inexact" if check.get("ok") else "**WRONG**")
        lines.append(f"| {data['machine']['torch_threads']} | {_shape(data['point'])} "
                     + "".join(f"| {rows[n]['median_s'] * 1e3:.1f} " for n in ("cdist", "addmm", "faiss"))
                     + f"| **{ours['median_s'] * 1e3:.2f}** | {ours['speedup_vs_cdist']:.1f}× "
                     f"| {ours['speedup_vs_addmm']:.1f}× | {ours['speedup_vs_faiss']:.2f}× | {exact} |")
    return "\n".join(lines)


PYTEST_TASKS = {"forward": "forward", "nearest": "nearest (indices only)", "backward": "forward + backward"}


def pytest_benchmark_table(data: dict, rows: str, faiss_backward_note: str = "") -> str:
    """pytest-benchmark's medians for the (NxKxD:task) points listed in rows, ours against three baselines.
    faiss_backward_note: a footnote mark after FAISS's forward+backward time (FAISS has no backward of its own)."""
    by_key = {}
    for b in data["benchmarks"]:
        shape = b["group"].split(" ", 1)[1]  # "forward N=65536 K=1024 D=64 fp32"
        n, k, d = (int(w.split("=")[1]) for w in shape.split()[:3])
        by_key[(f"{n}x{k}x{d}", b["params"]["task"], b["params"]["provider_name"])] = b["stats"]["median"]
    lines = ["| N × K × D, fp32 | task | ours ms | FAISS ms | compiled addmm ms | cdist ms | vs FAISS | vs cdist |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for item in rows.split(","):
        shape, task = item.split(":")
        t = {name: by_key.get((shape, task, name)) for name in ("vqvae_fast[cpu]", "faiss", "compiled addmm", "cdist")}
        ours = t["vqvae_fast[cpu]"]
        n, k, d = shape.split("x")
        lines.append(f"| {n} × {k} × {d} | {PYTEST_TASKS[task]} | "
                     + " | ".join("–" if v is None else f"{v * 1e3:.1f}"
                                  + (f" {faiss_backward_note}" if name == "faiss" and task == "backward"
                                     and faiss_backward_note else "") for name, v in t.items())
                     + " | " + " | ".join("–" if t[name] is None else f"{_sig(t[name] / ours)}×"
                                          for name in ("faiss", "cdist")) + " |")
    return "\n".join(lines)


def bench_layer_table(fp32: dict, bf16: dict, labels: tuple[str, str] = ("fp32", "bf16 autocast")) -> str:
    """bench_layer.py: median ms per step of ours, the peer and the cdist layer, two runs side by side (fp32 and bf16
    autocast, or the same precision under two settings: `labels`)."""
    a, b = labels
    lines = [f"| shape (N×K×D) | ours {a} | vector-quantize-pytorch {a} | cdist layer {a} | ours vs peer "
             f"| ours vs cdist | ours {b} | peer {b} | cdist {b} | ours vs peer | ours vs cdist |",
             "|---|" + "---:|" * 10]
    other = {r["shape"]["name"]: r for r in bf16["results"]}
    for result in fp32["results"]:
        s = result["shape"]
        cells = [f"{s['name']} {s['n']}×{s['k']}×{s['d']}{', cosine' if s.get('cosine') else ''}"]
        for res in (result, other[s["name"]]):
            rows = {r["kind"]: r for r in res["rows"]}
            cells += [_ms(rows[kind]["median_s"]) if rows.get(kind, {}).get("status") == "ok" else "–"
                      for kind in ("ours", "peer", "baseline")]
            peer, base = rows["peer"]["ours_speedup"], rows["baseline"]["ours_speedup"]
            cells += [f"**{peer:.{1 if peer < 100 else 0}f}×**", f"{base:.1f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_layer_allocation_table(default: dict, other: dict) -> str:
    """bench_layer.py run twice, under the default memory allocation and under other settings (machine's
    memory_allocation, e.g. THP_MEM_ALLOC_ENABLE=1): the two side by side, each run's command and machine below."""
    settings = ", ".join(f"{k}={v}" for k, v in other["machine"]["memory_allocation"].items()
                         if k != "transparent_hugepage")
    lines = [bench_layer_table(default, other, ("default", settings or "other"))]
    lines += [f"<sub>`{d['machine']['command']}`; {_machine(d['machine'])}</sub>" for d in (default, other)]
    return "\n\n".join(lines)


LAYER_KINDS = (("ours", "ours"), ("compat", "compat"), ("peer", "peer"), ("baseline", "cdist layer"))


def bench_layer_compat_table(data: dict) -> str:
    """bench_layer.py with the drop-in (provider vqvae_fast.compat): per shape, median ms of ours, the drop-in, the peer
    (and the cdist layer where it ran), the drop-in's and ours' speedups over the peer, peak extra memory, the share
    of rows whose code is not the exact nearest, and the load while timing; the command and machine below."""
    s, m = data["settings"], data["machine"]
    present = [(kind, name) for kind, name in LAYER_KINDS
               if any(r["kind"] == kind for res in data["results"] for r in res["rows"])]
    precision = SHORT_DTYPE[s["dtype"]] + (f", {s['autocast']} autocast" if s["autocast"] != "none" else "")
    names = " / ".join(name for _, name in present)
    compat = any(kind == "compat" for kind, _ in present)  # the drop-in's column only where it ran
    lines = [f"**{precision}**, {s['device']}, median of {s['rounds']} interleaved rounds",
             "",
             "| shape (N×K×D) | " + " | ".join(f"{name} ms" for _, name in present)
             + (" | **compat vs peer**" if compat else "") + " | ours vs peer | peak extra MiB (" + names
             + ") | rows not nearest, % (" + names + ") | load average (1 min) | other processes' CPU share |",
             "|---|" + "---:|" * (len(present) + 2 + compat) + "---|---:|---:|"]
    for result in data["results"]:
        sh = result["shape"]
        rows = {r["kind"]: r for r in result["rows"]}
        ok = {kind: rows.get(kind, {}).get("status") == "ok" for kind, _ in present}
        times = [_ms(rows[k]["median_s"]) if ok[k] else rows.get(k, {}).get("status", "–") for k, _ in present]
        ratio = lambda kind: (f"{rows[kind]['vs_peer_speedup']:.1f}×" if ok.get(kind) and ok.get("peer")
                              and rows[kind].get("vs_peer_speedup") else "–")
        memory = " / ".join(_mib(rows[k].get("peak_extra_bytes")) if ok[k] else "–" for k, _ in present)
        inexact = " / ".join(f"{100 * rows[k]['check']['inexact_fraction']:.1f}"
                             if ok[k] and "inexact_fraction" in (rows[k].get("check") or {}) else "–"
                             for k, _ in present)
        lines.append(f"| {sh['name']} {sh['n']}×{sh['k']}×{sh['d']}{', cosine' if sh.get('cosine') else ''} | "
                     + " | ".join(times) + (f" | **{ratio('compat')}**" if compat else "")
                     + f" | {ratio('ours')} | {memory} | {inexact} | "
                     f"{result['load_average'][0]:.2f} | {result['other_processes_cpu_share']:.0%} |")
    lines += ["", f"<sub>`{m['command']}`; {_machine(m)}</sub>"]
    return "\n".join(lines)


RESIDUAL_PROVIDERS = ("vqvae_fast", "vector-quantize-pytorch", "cdist loop", "stage loop")


def bench_residual_table(data: dict) -> str:
    """bench_residual.py: per shape and task, median ms of every provider, ours' speedups, peak extra memory, the
    share of rows whose code is not the exact nearest (worst stage), and the machine with its load."""
    names = ["ours" if n == "vqvae_fast" else "peer" if n == "vector-quantize-pytorch" else n
             for n in RESIDUAL_PROVIDERS]
    s = data["settings"]
    precision = SHORT_DTYPE[s["dtype"]] + (f", {s['autocast']} autocast" if s["autocast"] != "none" else "")
    lines = [f"**{precision}**, {s['device']}, median of {s['rounds']} interleaved rounds",
             "",
             "| shape (N×S×K×D) | task | " + " | ".join(f"{n} ms" for n in names)
             + " | ours vs peer | ours vs cdist loop | ours vs stage loop | time / search floor (ours) | "
             + " | ".join(f"{n} MiB" for n in names) + " | rows not nearest, % (worst stage: "
             + " / ".join(names) + ") | other processes' CPU share |",
             "|---|---|" + "---:|" * (3 * len(names)) + "---|---:|"]
    for result in data["results"]:
        sh = result["shape"]
        label = f"{sh['name']} {sh['n']}×{sh['s']}×{sh['k']}×{sh['d']}" + (f" ({sh['note']})" if sh.get("note") else "")
        for task in result["tasks"]:
            rows = {r["provider"]: r for r in result["rows"] if r["task"] == task}
            ok = {n: rows.get(n, {}).get("status") == "ok" for n in RESIDUAL_PROVIDERS}
            times = [_ms(rows[n]["median_s"]) if ok[n] else rows.get(n, {}).get("status", "–")
                     for n in RESIDUAL_PROVIDERS]
            ratios = [f"**{_sig(rows[n]['ours_speedup'])}×**" if ok[n] and n == "vector-quantize-pytorch" else
                      f"{_sig(rows[n]['ours_speedup'])}×" if ok[n] else "–" for n in RESIDUAL_PROVIDERS[1:]]
            ours = rows.get("vqvae_fast", {})
            floor = _x(ours.get("time_vs_search_floor")) if ok["vqvae_fast"] else "–"
            mib = [_mib(rows[n].get("peak_extra_bytes")) if ok[n] else "–" for n in RESIDUAL_PROVIDERS]
            inexact = " / ".join(f"{100 * rows[n]['check']['inexact_fraction']:.1f}" if ok[n] and rows[n].get("check")
                                 else "–" for n in RESIDUAL_PROVIDERS)
            lines.append(f"| {label} | {task} | " + " | ".join(times + ratios + [floor] + mib + [inexact])
                         + f" | {result['other_processes_cpu_share']:.0%} |")
    m = data["machine"]
    lines += ["", f"<sub>`{m['command']}`; {_machine(m)}</sub>"]
    return "\n".join(lines)


def cpu_paths_table(data: dict) -> str:
    """cpu_paths.py: per forced path, threads, dtype and shape, the medians of cdist, FAISS and ours, our speedups
    (bold below the issue-23 bar: 3x cdist, 1.2x FAISS), our time over the flop floor (2NKD flops at the rate of a
    large fp32 GEMM measured in the fp32 process of the same path and threads, at the emulated instruction set), the path that ran and the other
    processes' CPU share."""

    # The fp32 GEMM rate: our scans compute in fp32 whatever the input dtype. Runs timed their floor in fp32
    # (large_gemm_dtype), or else take it from the fp32 run of the same path and threads.
    fp32_rate = {(r["path"], r["threads"]): r["large_gemm_gflops"] for r in data["runs"]
                 if r.get("large_gemm_dtype", r["point"]["dtype"]) == "float32"}

    def floor(run, ours):
        rate = (run["large_gemm_gflops"] if run.get("large_gemm_dtype") == "float32"
                else fp32_rate.get((run["path"], run["threads"])))
        return "–" if ours is None or not rate else f"{_sig(ours / (run['flops'] / rate / 1e6))}×"
    lines = ["| path (forced; native: none) | threads | dtype | N×K×D | cdist ms | FAISS ms | ours ms | ours vs cdist "
             "| ours vs FAISS | ours / flop floor | our path (D = 8 / 256) | other processes' CPU share |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for run in data["runs"]:
        ms = {r["provider"]: r["median_s"] * 1e3 for r in run["rows"] if r.get("status") == "ok"}
        ours, cdist, faiss = ms.get("vqvae_fast[cpu]"), ms.get("cdist"), ms.get("faiss")

        def ratio(theirs, bar):
            if theirs is None or ours is None:
                return "–"
            text = f"{_sig(theirs / ours)}×"
            return text if theirs / ours >= bar else f"**{text}**"
        key = "cpu_forward_path_bf16" if run["point"]["dtype"] == "bfloat16" else "cpu_forward_path"
        taken = run["machine"].get(key, run["machine"].get("cpu_forward_path", {}))
        lines.append(f"| {run['path']} | {run['threads']} | {SHORT_DTYPE[run['point']['dtype']]} | "
                     f"{'×'.join(map(str, run['shape']))} | "
                     + " | ".join("–" if v is None else _sig(v) for v in (cdist, faiss, ours))
                     + f" | {ratio(cdist, 3.0)} | {ratio(faiss, 1.2)} | {floor(run, ours)} | "
                     f"{taken.get('8')} / {taken.get('256')} | "
                     f"{run['other_processes_cpu_share']:.0%} |")
    first = data["runs"][0]["machine"]
    lines += ["", f"<sub>`{data['command']}`; each row one `benchmarks/compare.py` process: {_machine(first)} "
              "(first row)</sub>"]
    return "\n".join(lines)


SETTLE_CODEBOOKS = {"random": "random", "near": "near the data"}


def settle_rate_table(data: dict, select: str | None = None) -> str:
    """settle_rate.py: the share of rows left to the exact re-scoring, in % of N, per search precision."""
    rows = data["rows"]
    if select:
        index = {(r["d"], r["k"], r["codebook"]): r for r in rows}
        rows = [index[(int(d), int(k), SETTLE_CODEBOOKS[c])] for d, k, c in (w.split(":") for w in select.split(","))]
    lines = ["| D | K | codebook | bf16x3 (default) | tf32 | tf32x3 | ieee |", "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['d']} | {r['k']} | {r['codebook']} | "
                     + " | ".join(f"{100 * r['shares'][p]:.2f}" for p in ("bf16x3", "tf32", "tf32x3", "ieee")) + " |")
    return "\n".join(lines)


def inspect_table(records: list[dict], arch: str, triton: str, budget_kb: str, seconds: str) -> str:
    """scripts/inspect_kernels.py --json, grouped by kernel, dtype and tiling as its --markdown summary is (the
    triton version, the shared-memory budget and the run's seconds are not in the file: the template gives them)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        tiling = r["config"].split("; ")[1] if "; " in r["config"] else "-"
        groups.setdefault((r["kernel"], r["dtype"], tiling), []).append(r)
    lines = [f"**{arch}** (triton {triton}; budget {budget_kb} KB shared memory per block): {len(records)} "
             f"kernel/config compilations in {seconds} s, {sum(bool(r['problems']) for r in records)} failing a check.",
             "",
             "| kernel | dtype | tiling | configs | MMA | registers | spill B | shared KB | z loads in loop |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for (kernel, dtype, tiling), rs in groups.items():
        regs = sorted(r["registers"] for r in rs if r["registers"] is not None)
        shared = [r["shared_bytes"] for r in rs if r["shared_bytes"] is not None]
        zl = {r["z_loads_in_loop"] for r in rs}
        lines.append(
            f"| {kernel} | {dtype} | {tiling} | {len(rs)} | {'/'.join(sorted({r['mma'] or '-' for r in rs}))} "
            f"| {f'{regs[0]}–{regs[-1]}' if regs and regs[0] != regs[-1] else (regs[0] if regs else '-')} "
            f"| {max((r['spill_bytes'] or 0) for r in rs)} | {max(shared) / 1024:.0f} "
            f"| {'null' if zl == {None} else '/'.join(str(z) for z in sorted(z for z in zl if z is not None))} |")
    return "\n".join(lines)


def _display(path: Path, root: Path) -> str:
    """A result file's path as the captions show it: from the repository root when it lies inside it."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def render(path: Path, root: Path | None = None) -> str:
    """The table and caption of one compare/sweep/training file; the caption names it from root (the repository)."""
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
    return f"{table}\n\n<sub>`{m['command']}` → `{_display(path, root or ROOT)}`; {_machine(m)}{others}</sub>\n"


ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "RESULTS.template.md"
GENERATED_NOTE = ("<!-- Generated by `python benchmarks/report.py --write` from benchmarks/RESULTS.template.md and the "
                  "JSON in benchmarks/results/: do not edit by hand; edit the template and regenerate. -->")
TEMPLATE_ONLY = "<!-- template:"  # a line starting so is the template's own note, left out of the document
PLACEHOLDER = re.compile(r"^<!-- report: (.*?) -->$")
RENDERERS = {"keypoint": lambda files, **_: keypoint_table(*files),
             "shapes": lambda files, **_: shapes_table(files),
             "pytest_benchmark": lambda files, **kw: pytest_benchmark_table(files[0], **kw),
             "bench_layer": lambda files, **_: bench_layer_table(*files),
             "bench_layer_allocation": lambda files, **_: bench_layer_allocation_table(*files),
             "bench_layer_compat": lambda files, **_: "\n\n".join(bench_layer_compat_table(f) for f in files),
             "bench_residual": lambda files, **_: bench_residual_table(files[0]),
             "cpu_paths": lambda files, **_: cpu_paths_table(files[0]),
             "settle_rate": lambda files, select=None: settle_rate_table(files[0], select),
             "inspect": lambda files, **kw: inspect_table(files[0], **kw)}


def placeholder_files(line: str, base: Path) -> list[Path] | None:
    """The result files a template line names (None when the line is not a placeholder)."""
    m = PLACEHOLDER.match(line)
    if not m:
        return None
    words = m.group(1).split()
    if words[0] in RENDERERS:
        words = words[1:]
    return [base / w for w in words if "=" not in w]


def render_placeholder(line: str, base: Path) -> str:
    words = PLACEHOLDER.match(line).group(1).split()
    files = placeholder_files(line, base)
    if words[0] not in RENDERERS:
        if len(files) != 1:
            raise ValueError(f"a plain placeholder names one file: {line}")
        return render(files[0], root=base.parent).rstrip("\n")
    options = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    return RENDERERS[words[0]]([json.loads(f.read_text()) for f in files], **options)


def render_template(template: Path) -> str:
    """The document: the note that it is generated, then the template with every placeholder line replaced."""
    base = template.parent
    out = [GENERATED_NOTE]
    for line in template.read_text().split("\n"):
        if line.startswith(TEMPLATE_ONLY):
            continue
        out.append(render_placeholder(line, base) if PLACEHOLDER.match(line) else line)
    return "\n".join(out)


def output_path(template: Path) -> Path:
    return template.with_name(template.name.replace(".template", ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=Path, help="result JSON files: print one table each")
    parser.add_argument("--render", type=Path, metavar="TEMPLATE", help="print the document this template makes")
    parser.add_argument("--write", nargs="?", const=TEMPLATE, type=Path, metavar="TEMPLATE",
                        help="write the document next to the template (default: RESULTS.template.md -> RESULTS.md)")
    parser.add_argument("--check", nargs="?", const=TEMPLATE, type=Path, metavar="TEMPLATE",
                        help="exit 1 if the document next to the template differs from what the template makes")
    args = parser.parse_args(argv)
    if args.render:
        sys.stdout.write(render_template(args.render))
    elif args.write:
        output_path(args.write).write_text(render_template(args.write))
    elif args.check:
        out = output_path(args.check)
        if not out.exists() or out.read_text() != render_template(args.check):
            print(f"{out} is not what {args.check} renders to: run python benchmarks/report.py --write", file=sys.stderr)
            return 1
        print(f"{out} is up to date")
    elif args.files:
        print("\n".join(render(f) for f in args.files))
    else:
        parser.error("give result files, --render, --write or --check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
