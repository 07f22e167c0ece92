"""Side by side at one shape: vqvae_fast against cdist, addmm, compiled addmm and the bare GEMM.

    python benchmarks/compare.py                          # CPU, N=65536 K=1024 D=64 fp32, forward
    python benchmarks/compare.py --backward               # forward + backward of a VQ layer
    python benchmarks/compare.py --task nearest           # indices only (nearest_code)
    python benchmarks/compare.py --device cuda --shape 262144 16384 256 --dtype bfloat16

Every provider runs on the same inputs, interleaved round by round so that machine noise hits
all of them alike. The table gives the median and min..max per call, GFLOP/s from 2*N*K*D,
speedups over cdist and addmm (>1: faster), time relative to the bare GEMM z @ E^T measured in
the same run (xGEMM, the floor), peak extra memory and the correctness check of what was timed.
--json writes all of it, with the machine's description, to a file.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from harness import DTYPES, Point, format_point, machine_info, measure_undisturbed, run_point, write_json
from providers import TASKS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(65536, 1024, 64), metavar=("N", "K", "D"))
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--task", choices=TASKS, default="forward",
                        help="nearest: indices only; forward: a VQ layer's forward; backward: forward + backward")
    parser.add_argument("--backward", action="store_true", help="shorthand for --task backward")
    parser.add_argument("--rounds", type=int, default=7, help="timed samples per provider (median reported)")
    parser.add_argument("--providers", nargs="+", metavar="NAME", help="only these providers (default: all)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--floor-dtype", choices=sorted(DTYPES), default=None,
                        help="time the GEMM floor in this dtype (default: --dtype; the CPU scans compute in fp32)")
    parser.add_argument("--max-other-load", type=float, default=None, metavar="SHARE",
                        help="on a shared machine: if other processes used more than this share of the CPUs "
                             "while timing, wait for an idle machine and measure again (up to 4 tries)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and FAISS (default: torch's, one per core)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    task = "backward" if args.backward else args.task
    point = Point(*args.shape, dtype=args.dtype)
    load_before = os.getloadavg()  # other jobs on a shared machine: recorded with the numbers

    result = measure_undisturbed(
        lambda: run_point(point, args.device, task, args.rounds, only=args.providers, memory=not args.no_memory,
                          floor_dtype=args.floor_dtype),
        lambda r: r["other_processes_cpu_share"], args.max_other_load)
    info = machine_info(args.device)
    info["load_average_start"] = load_before
    print(f"{task}: {point.label()} on {args.device} ({info['cpu']}, {info['torch_threads']} threads"
          f"{', ' + info['gpu'] if args.device == 'cuda' else ''}), median of {args.rounds}; "
          f"large-GEMM rate {result['large_gemm_gflops']:.0f} GFLOP/s")
    print(format_point(result))
    print(f"other processes used {result['other_processes_cpu_share']:.0%} of the machine's CPU time while timing")
    if args.json:
        write_json(args.json, dict(machine=info, **result))
    failed = [row for row in result["rows"] if not row.get("check", {}).get("ok", True)]
    for row in failed:
        print(f"{'WRONG RESULTS' if row['kind'] == 'ours' else 'outside its tolerance (theirs to lose)'}: "
              f"{row['provider']}", file=sys.stderr)
    return 1 if any(row["kind"] == "ours" for row in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
