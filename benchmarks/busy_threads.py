"""The CPU forward at 1 and 2 threads while other processes keep cores busy (issue 22 item 3).

    python benchmarks/busy_threads.py                       # 0, 1 and 2 busy cores, N=8192 K=4096 D=64 fp32
    python benchmarks/busy_threads.py --library /path/to/other/checkout   # the same with another build

Each "burner" is a process spinning on the CPU. For each number of burners the two thread counts
alternate call by call (20 rounds); the table gives median and max ms per call. With more threads
than free cores, a parallel region waits for its slowest thread, which shares a core.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time


def spin() -> None:
    while True:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(8192, 4096, 64), metavar=("N", "K", "D"))
    parser.add_argument("--burners", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--library", help="import vqvae_fast from this checkout (its built extension)")
    args = parser.parse_args(argv)
    if args.library:
        sys.path.insert(0, args.library)
    import torch
    import vqvae_fast

    n, k, d = args.shape
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    print(f"vqvae_fast from {vqvae_fast.__file__}; nearest_code {n}x{k}x{d} fp32; median / max ms per call")
    print("| busy cores | 1 thread | 2 threads |")
    print("|---:|---:|---:|")
    for burners in args.burners:
        procs = [multiprocessing.Process(target=spin, daemon=True) for _ in range(burners)]
        for p in procs:
            p.start()
        time.sleep(1.0)
        times = {1: [], 2: []}
        try:
            for _ in range(args.rounds):
                for threads in times:
                    torch.set_num_threads(threads)
                    start = time.perf_counter()
                    vqvae_fast.nearest_code(z, codebook, backend="cpu")
                    times[threads].append(time.perf_counter() - start)
        finally:
            for p in procs:
                p.terminate()
        cells = [f"{statistics.median(t) * 1e3:.1f} / {max(t) * 1e3:.1f}" for t in times.values()]
        print(f"| {burners} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
