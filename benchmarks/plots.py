"""Plots of a sweep's JSON: time vs K, speedup vs cdist, time relative to the GEMM floor, peak memory.

    python benchmarks/plots.py benchmarks/results/sweep_cpu_forward.json [--out benchmarks/plots]

One PNG per kind and dtype. The K-wise plots have one panel per D (at the largest N measured
with several K for that D); the memory plot shows every point.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only: no display on benchmark machines
import matplotlib.pyplot as plt  # noqa: E402

from harness import SHORT_DTYPE  # noqa: E402
from providers import CDIST, FAISS, GEMM  # noqa: E402

# The goals, drawn as dashed lines so a plot shows at a glance whether they are met.
SPEEDUP_GOAL = {"cpu": 3.0, "cuda": 3.0}
FAISS_GOAL = 1.2
GEMM_GOAL = 1.4
STYLE = {  # ours stands out; the baselines are thinner
    "cdist": dict(color="tab:red", marker="o"),
    "addmm": dict(color="tab:orange", marker="s"),
    "compiled addmm": dict(color="tab:purple", marker="^"),
    "GEMM floor": dict(color="black", marker="x", linestyle="--"),
    "faiss": dict(color="tab:brown", marker="P"),
    "vqvae_fast[cpu]": dict(color="tab:blue", marker="D", linewidth=2.5),
    "vqvae_fast[triton]": dict(color="tab:blue", marker="D", linewidth=2.5),
}


def _ok_rows(points):
    for p in points:
        for row in p["rows"]:
            if row.get("status") == "ok":
                yield p["point"], row


def _k_panels(points, dtype):
    """{D: [point results at the largest N with >= 2 K values for that D]} for one dtype."""
    by_nd = defaultdict(list)
    for p in points:
        if p["point"]["dtype"] == dtype:
            by_nd[p["point"]["n"], p["point"]["d"]].append(p)
    panels = {}
    for (n, d), group in sorted(by_nd.items()):  # ascending N: a larger N replaces a smaller one
        if len({p["point"]["k"] for p in group}) >= 2:
            panels[d] = sorted(group, key=lambda p: p["point"]["k"])
    return dict(sorted(panels.items()))


def _series(group, value):
    """{provider: ([K...], [value...])} over one panel's points."""
    lines = defaultdict(lambda: ([], []))
    for p in group:
        rows = {r["provider"]: r for r in p["rows"] if r.get("status") == "ok"}
        for name, row in rows.items():
            y = value(row, rows)
            if y is not None:
                lines[name][0].append(p["point"]["k"])
                lines[name][1].append(y)
    return lines


def _k_figure(panels, value, ylabel, title, logy, hlines=(), skip=()):
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.9), squeeze=False, sharey=logy)
    for ax, (d, group) in zip(axes[0], panels.items()):
        for name, (ks, ys) in _series(group, value).items():
            if name not in skip:
                ax.plot(ks, ys, label=name, **STYLE.get(name, {}))
        for y, text in hlines:
            ax.axhline(y, color="grey", linestyle=":", linewidth=1)
            ax.annotate(text, (0.02, y), xycoords=("axes fraction", "data"), fontsize=8, color="grey",
                        va="bottom")
        ax.set_xscale("log", base=2)
        ks = sorted({p["point"]["k"] for p in group})
        ax.set_xticks(ks, [f"{k // 1024}k" if k >= 1024 else str(k) for k in ks])
        ax.minorticks_off()
        if logy:
            ax.set_yscale("log")
            # Ticks at 1-2-5 steps labelled 0.5, 2, 100 (not 5x10^-1): readable over any range.
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel("K (codes)")
        ax.set_title(f"D={d}, N={group[0]['point']['n']}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def _memory_figure(points, dtype, title):
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series = defaultdict(lambda: ([], []))
    for point, row in _ok_rows(points):
        if point["dtype"] == dtype and row.get("peak_extra_bytes") is not None:
            series[row["provider"]][0].append(point["n"] * point["k"])
            series[row["provider"]][1].append(max(row["peak_extra_bytes"], 1) / 2**20)
    nk = sorted({x for xs, _ in series.values() for x in xs})
    for name, (xs, ys) in series.items():
        style = {k: v for k, v in STYLE.get(name, {}).items() if k != "linestyle"}
        ax.scatter(xs, ys, label=name, alpha=0.8, **{"color": style.get("color"), "marker": style.get("marker")})
    if nk:
        ax.plot(nk, [x * 4 / 2**20 for x in nk], color="grey", linestyle=":", linewidth=1, label="N*K*4 bytes")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N * K")
    ax.set_ylabel("peak extra memory (MiB)")
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def draw(sweep: dict, out_dir) -> list[Path]:
    """Write the sweep's plots into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device, task = sweep["machine"]["device"], sweep["task"]
    where = sweep["machine"].get("gpu") if device == "cuda" else f"{sweep['machine']['cpu']}, " \
                                                                   f"{sweep['machine']['torch_threads']} threads"
    points = sweep["points"]
    written = []

    def save(fig, name):
        threads = f"_{sweep['machine']['torch_threads']}t" if device == "cpu" else ""
        path = out_dir / f"sweep_{device}{threads}_{task}_{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)

    for dtype in sorted({p["point"]["dtype"] for p in points}):
        short = SHORT_DTYPE[dtype]
        panels = _k_panels(points, dtype)
        if panels:
            save(_k_figure(panels, lambda r, rows: r["median_s"] * 1e3, "median time (ms)",
                           f"{task}: time vs K ({short}, {where})", logy=True), f"time_vs_k_{short}")
            save(_k_figure(panels, lambda r, rows: r.get("speedup_vs_cdist"), "speedup over cdist (x)",
                           f"{task}: speedup over cdist+argmin+gather ({short}, {where})", logy=False,
                           hlines=[(1, "cdist"), (SPEEDUP_GOAL[device], f"goal {SPEEDUP_GOAL[device]:g}x")],
                           skip=(CDIST,)), f"speedup_vs_cdist_{short}")
            if any(r["provider"] == FAISS for _, r in _ok_rows(points)):
                save(_k_figure(panels, lambda r, rows: r.get("speedup_vs_faiss"), "speedup over FAISS (x)",
                               f"{task}: speedup over FAISS IndexFlatL2 ({short}, {where})", logy=False,
                               hlines=[(1, "FAISS"), (FAISS_GOAL, f"goal {FAISS_GOAL:g}x")],
                               skip=(CDIST, FAISS, "addmm", "compiled addmm", GEMM)), f"speedup_vs_faiss_{short}")
            save(_k_figure(panels, lambda r, rows: r.get("time_vs_gemm"), "time / bare GEMM time",
                           f"{task}: time relative to the GEMM floor z@E^T ({short}, {where})", logy=True,
                           hlines=[(1, "GEMM"), (GEMM_GOAL, f"goal {GEMM_GOAL:g}x")], skip=(GEMM,)),
                 f"fraction_of_gemm_{short}")
        if sum(p["point"]["dtype"] == dtype for p in points) >= 4:  # a trend needs a few points
            save(_memory_figure(points, dtype, f"{task}: peak extra memory vs N*K ({short}, {where})"),
                 f"peak_memory_{short}")
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", help="a sweep.py result file")
    parser.add_argument("--out", default=str(Path(__file__).parent / "plots"))
    args = parser.parse_args(argv)
    for path in draw(json.loads(Path(args.json).read_text()), args.out):
        print(path)


if __name__ == "__main__":
    main()
