"""Sweep N, K, D and dtype; write JSON, print a table, draw the plots.

    python benchmarks/sweep.py                     # CPU grid, ~15 minutes on 2 cores
    python benchmarks/sweep.py --threads 1         # the same on one core
    python benchmarks/sweep.py --gpu               # GPU grid around the tokenizer size, fp32/bf16/fp16
    python benchmarks/sweep.py --gpu --grid full   # every N x K x D x dtype combination (hours)
    python benchmarks/sweep.py --N 65536 --K 256 1024 --D 64 --dtypes float32   # any cartesian grid
    python benchmarks/sweep.py --task backward     # forward + backward instead of forward

Every point runs every provider of harness.run_point on the same inputs, interleaved. A provider
whose N x K matrices would not fit in memory is reported as skipped at that point, never as a
number. The JSON is rewritten after every point, so an interrupted sweep keeps what it measured;
--max-minutes stops starting new points after that long (the rest are listed as not run).
"""
from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import torch

from harness import DTYPES, SHORT_DTYPE, Point, machine_info, measure_undisturbed, run_point, write_json
from providers import CDIST, FAISS, FLASH_KMEANS, GEMM, TASKS

HERE = Path(__file__).resolve().parent

# CPU: every N x K x D of the usual range in fp32, then the low-dimensional (factorised) codes
# and the large codebooks people also use, then bf16 and fp16 at three of the fp32 shapes (the
# CPU kernel scores in fp32 whatever the dtype, so these should cost what fp32 does).
CPU_GRID = ([Point(n, k, d) for n, k, d in itertools.product((16384, 65536), (256, 1024, 4096, 16384),
                                                             (32, 64, 128, 256))]
            + [Point(65536, k, d) for k, d in ((1024, 4), (1024, 8), (16384, 8), (4096, 16))]
            + [Point(16384, 65536, d) for d in (32, 256)]
            + [Point(n, k, d, dt) for dt in ("bfloat16", "float16")
               for n, k, d in ((65536, 1024, 64), (65536, 4096, 32), (16384, 4096, 256))])


def gpu_grid() -> list[Point]:
    """One axis at a time around the tokenizer size N=262144 K=16384 D=256, for each dtype.

    K from 256 to 65536 (at D=64 and D=256), N from 16k to 1M, D from 8 to 512: the ranges of
    the full grid at a fraction of its cost. The tokenizer point comes first for each dtype.
    """
    n0, k0, d0 = 262144, 16384, 256
    points = []
    for dtype in ("bfloat16", "float32", "float16"):
        shapes = [(n0, k0, d0)]
        shapes += [(n0, k, d) for d in (64, d0) for k in (256, 1024, 4096, 16384, 65536)]
        shapes += [(n, k0, d0) for n in (16384, 65536, 262144, 1048576)]
        shapes += [(n0, k0, d) for d in (8, 32, 64, 128, 256, 512)]
        for shape in dict.fromkeys(shapes):  # unique, in order
            points.append(Point(*shape, dtype))
    return points


def full_grid(dtypes) -> list[Point]:
    return [Point(n, k, d, dt) for dt, n, k, d in itertools.product(
        dtypes, (16384, 65536, 262144, 1048576), (256, 1024, 4096, 16384, 65536), (8, 32, 64, 128, 256, 512))]


def summary_line(result: dict) -> str:
    """One table line: ours against each baseline at this point."""
    rows = {r["provider"]: r for r in result["rows"]}
    ours = [r for r in result["rows"] if r["kind"] == "ours" and r.get("status") == "ok"]
    best = min(ours, key=lambda r: r["median_s"]) if ours else None

    def ms(name):
        row = rows.get(name, {})
        return f"{row['median_s'] * 1e3:.2f}" if row.get("status") == "ok" else row.get("status", "-")

    def ratio(value):
        return "-" if value is None else f"{value:.2f}x"

    p = result["point"]
    head = f"{p['n']:>8} {p['k']:>6} {p['d']:>4} {SHORT_DTYPE[p['dtype']]:>5}"
    if best is None:
        return f"{head}  (no result from vqvae_fast)"
    mib = "n/a" if best.get("peak_extra_bytes") is None else f"{best['peak_extra_bytes'] / 2**20:.1f}"
    cdist_mib = rows.get(CDIST, {}).get("peak_extra_bytes")
    check = best.get("check", {})
    return (f"{head} {best['provider']:>19} {best['median_s'] * 1e3:>10.2f} {ms(CDIST):>10} {ms('addmm'):>10} "
            f"{ms('compiled addmm'):>10} {ms(FLASH_KMEANS):>10} {ms(FAISS):>10} {ms(GEMM):>10} "
            f"{ratio(best.get('speedup_vs_cdist')):>8} {ratio(best.get('speedup_vs_faiss')):>8} "
            f"{ratio(best.get('speedup_vs_addmm')):>8} {ratio(best.get('speedup_vs_compiled')):>8} "
            f"{ratio(best.get('time_vs_gemm')):>7} {mib:>8} "
            f"{'n/a' if cdist_mib is None else f'{cdist_mib / 2**20:.0f}':>9} "
            f"{'ok' if check.get('ok', True) else 'WRONG':>5} {result['other_processes_cpu_share']:>6.0%}")


HEADER = (f"{'N':>8} {'K':>6} {'D':>4} {'dtype':>5} {'fastest of ours':>19} {'ours ms':>10} {'cdist ms':>10} "
          f"{'addmm ms':>10} {'compiled':>10} {'flash-km':>10} {'faiss ms':>10} {'GEMM ms':>10} {'/cdist':>8} "
          f"{'/faiss':>8} {'/addmm':>8} {'/compil':>8} "
          f"{'xGEMM':>7} {'ours MiB':>8} {'cdist MiB':>9} {'check':>5} {'others':>6}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="--device cuda --grid gpu")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--grid", choices=("cpu", "gpu", "full"), default=None,
                        help="named grid (default: cpu on CPU, gpu on CUDA)")
    parser.add_argument("--N", type=int, nargs="+", help="custom grid: the N values (with --K, --D, --dtypes)")
    parser.add_argument("--K", type=int, nargs="+")
    parser.add_argument("--D", type=int, nargs="+")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="dtypes of a custom or full grid")
    parser.add_argument("--task", choices=TASKS, default="forward")
    parser.add_argument("--rounds", type=int, default=None, help="timed samples per provider (default 5 CPU, 10 GPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and FAISS (default: torch's, one per core)")
    parser.add_argument("--providers", nargs="+", metavar="NAME", help="only these providers (default: all)")
    parser.add_argument("--floor-dtype", choices=sorted(DTYPES), default=None,
                        help="time the large-GEMM floor in this dtype (default: each point's; float32 where "
                             "the point's dtype has no fast GEMM here, e.g. bf16 with libraries held to AVX2)")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no new point after this long")
    parser.add_argument("--max-other-load", type=float, default=None, metavar="SHARE",
                        help="on a shared machine: repeat a point (after waiting for an idle machine, up to 4 "
                             "tries) while other processes used more than this share of the CPUs during it")
    parser.add_argument("--json", help="result file (default: benchmarks/results/sweep_<device>_<task>.json)")
    parser.add_argument("--plots", default=str(HERE / "plots"), help="folder for the PNGs ('' for none)")
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if args.gpu else "cpu")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--gpu / --device cuda: no CUDA device here")
    grid_name = args.grid or ("gpu" if device == "cuda" else "cpu")
    if args.N or args.K or args.D:
        if not (args.N and args.K and args.D):
            parser.error("a custom grid needs all of --N, --K and --D")
        grid_name = "custom"
        points = [Point(n, k, d, dt) for dt, n, k, d in
                  itertools.product(args.dtypes or ["float32"], args.N, args.K, args.D)]
    elif grid_name == "full":
        points = full_grid(args.dtypes or ["bfloat16", "float32", "float16"])
    else:
        points = gpu_grid() if grid_name == "gpu" else CPU_GRID
        if args.dtypes:
            points = [p for p in points if p.dtype in args.dtypes]
    rounds = args.rounds or (10 if device == "cuda" else 5)
    json_path = Path(args.json or HERE / "results" / f"sweep_{device}_{args.task}.json")

    machine = machine_info(device)
    sweep = dict(machine=machine, grid=grid_name, task=args.task, rounds=rounds, points=[], not_run=[])
    print(f"{args.task} sweep, grid {grid_name} ({len(points)} points) on {device}: "
          f"{machine.get('gpu') or machine['cpu']}, {machine['torch_threads']} threads; "
          f"median of {rounds}; results -> {json_path}")
    print(HEADER, flush=True)
    start = time.monotonic()
    for i, point in enumerate(points):
        if args.max_minutes is not None and time.monotonic() - start > 60 * args.max_minutes:
            sweep["not_run"] = [p.__dict__ for p in points[i:]]
            print(f"time budget of {args.max_minutes} min spent: {len(points) - i} points not run")
            break
        result = measure_undisturbed(lambda: run_point(point, device, args.task, rounds, only=args.providers,
                                                               floor_dtype=args.floor_dtype),
                                     lambda r: r["other_processes_cpu_share"], args.max_other_load)
        sweep["points"].append(result)
        sweep["machine"]["load_average_end"] = os.getloadavg()
        sweep["elapsed_s"] = time.monotonic() - start
        write_json(json_path, sweep)
        print(summary_line(result), flush=True)
        for row in result["rows"]:
            if row.get("status") != "ok":
                print(f"{'':>26}{row['provider']} {row['status']}: {row['reason']}")
        if device == "cuda":
            torch.cuda.empty_cache()
    write_json(json_path, sweep)
    if args.plots:
        try:
            from plots import draw
        except ImportError as err:  # e.g. no matplotlib on the GPU box: plots.py redraws from the JSON later
            print(f"no plots ({err}); draw them later with: python benchmarks/plots.py {json_path}")
        else:
            for path in draw(sweep, args.plots):
                print(f"plot: {path}")
    wrong = [(r["point"], row) for r in sweep["points"] for row in r["rows"] if not row.get("check", {}).get("ok", True)]
    for point, row in wrong:
        label = "WRONG RESULT" if row["kind"] == "ours" else "outside its tolerance (theirs to lose)"
        print(f"{label}: {row['provider']} at {point}")
    return 1 if any(row["kind"] == "ours" for _, row in wrong) else 0


if __name__ == "__main__":
    raise SystemExit(main())
