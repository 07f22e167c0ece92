"""The CPU forward with each of its paths forced, against cdist and FAISS, as on CPUs without AMX.

    python benchmarks/cpu_paths.py                                    # the CPU bar's 5 shapes, fp32, 1 and 2 threads
    python benchmarks/cpu_paths.py --paths avx2 --dtypes float32 bfloat16 --threads 1

Each (path, threads, dtype, shape) runs benchmarks/compare.py in its own process, so that the
instruction set of every library in it is chosen before they load: a CPU with AVX-512 but no
AMX (AMD EPYC) is emulated by `avx512` (our AVX-512 scan, oneDNN without AMX, OpenBLAS and FAISS
at AVX-512), a CPU with AVX2 only (laptops, older servers) by `avx2` (our AVX2 scan, MKL and
oneDNN at AVX2, OpenBLAS at Haswell, FAISS at AVX2). What emulation cannot show: a core that
executes 512-bit instructions as two 256-bit halves (Zen 4), other cache sizes and clocks.
Writes one JSON with every run's results and prints a table of medians and ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The issue-23 CPU bar: the five shapes timed on an AMD EPYC.
SHAPES = ((65536, 1024, 64), (16384, 512, 128), (65536, 4096, 32), (16384, 1024, 256), (32768, 8192, 8))
PROVIDERS = ("cdist", "faiss", "vqvae_fast[cpu]")
# Environment of each forced path: ours, and the instruction set of the libraries we compare with.
PATH_ENV = {
    "native": {},  # nothing forced: every library (ours too) picks its path for this CPU
    "amx": dict(VQVAE_FAST_CPU_SCAN="amx"),
    "avx512bf16": dict(VQVAE_FAST_CPU_SCAN="avx512bf16"),  # bf16 inputs: the bf16 scan (others: avx512)
    "avx512bf16rounded": dict(VQVAE_FAST_CPU_SCAN="avx512bf16rounded"),  # fp32/fp16 rounded to bf16, any D
    "avx512": dict(VQVAE_FAST_CPU_SCAN="avx512", ONEDNN_MAX_CPU_ISA="AVX512_CORE", OPENBLAS_CORETYPE="SkylakeX",
                   VQVAE_FAST_BENCH_FAISS_SIMD="AVX512"),
    "avx2": dict(VQVAE_FAST_CPU_SCAN="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2",
                 OPENBLAS_CORETYPE="Haswell", VQVAE_FAST_BENCH_FAISS_SIMD="AVX2"),
    "gemm": dict(VQVAE_FAST_CPU_SCAN="gemm"),
}


def run_one(path: str, threads: int, dtype: str, shape, rounds: int, out: Path, providers=PROVIDERS) -> dict:
    env = dict(os.environ, **PATH_ENV[path])
    command = [sys.executable, str(HERE / "compare.py"), "--shape", *map(str, shape), "--dtype", dtype,
               "--threads", str(threads), "--rounds", str(rounds), "--no-memory", "--floor-dtype", "float32",
               "--providers", *providers,
               "--json", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not out.exists():
        raise RuntimeError(f"{path} {threads}t {dtype} {shape}: compare.py failed\n{result.stdout}\n{result.stderr}")
    return json.loads(out.read_text())


def medians(run: dict) -> dict:
    return {row["provider"]: row["median_s"] * 1e3 for row in run["rows"] if row.get("status") == "ok"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", choices=sorted(PATH_ENV), default=["avx512", "avx2"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["float32"])
    parser.add_argument("--rounds", type=int, default=7, help="timed samples per provider (median reported)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS,
                        help="a subset (cdist in bf16 without AVX-512 BF16 takes minutes per call)")
    parser.add_argument("--json", default=str(HERE / "results" / "cpu_paths.json"))
    args = parser.parse_args(argv)

    runs = []
    print("| path | threads | dtype | N x K x D | our path | cdist ms | FAISS ms | ours ms | vs cdist | vs FAISS |")
    print("|---|---:|---|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths:
            for threads in args.threads:
                for dtype in args.dtypes:
                    for shape in SHAPES:
                        run = run_one(path, threads, dtype, shape, args.rounds, Path(tmp) / "run.json",
                                      args.providers)
                        run.update(path=path, env=PATH_ENV[path], threads=threads, shape=list(shape))
                        runs.append(run)
                        m = medians(run)
                        ours, cdist, faiss = m["vqvae_fast[cpu]"], m.get("cdist"), m.get("faiss")
                        vs_cdist = "-" if cdist is None else f"{cdist / ours:.2f}x"
                        key = "cpu_forward_path_bf16" if dtype == "bfloat16" else "cpu_forward_path"
                        taken = run["machine"].get(key, run["machine"].get("cpu_forward_path", {}))
                        print(f"| {path} | {threads} | {dtype} | {'x'.join(map(str, shape))} | "
                              f"{taken.get('8')}/{taken.get('256')} | {cdist if cdist is None else f'{cdist:.1f}'} | "
                              f"{faiss if faiss is None else f'{faiss:.1f}'} | {ours:.1f} | {vs_cdist} | "
                              f"{'-' if faiss is None else f'{faiss / ours:.2f}x'} |", flush=True)
                        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                        Path(args.json).write_text(json.dumps(dict(command=" ".join(["python", *sys.argv]),
                                                                   runs=runs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
