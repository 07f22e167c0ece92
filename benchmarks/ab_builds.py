"""Two builds of vqvae_fast, or two environments, side by side: the CPU forward of each, in
alternating processes.

A change to the C++ kernels is timed against the commit before it, built in a git worktree:

    git worktree add /tmp/base HEAD~1 && (cd /tmp/base && python setup.py build_ext --inplace)
    python benchmarks/ab_builds.py --base /tmp/base --shapes 16384x256x128 16384x1024x256 --threads 1

An environment setting is timed against none, on the installed build (here torch's huge-page
allocations, with the cdist baseline as the task):

    python benchmarks/ab_builds.py --new-env THP_MEM_ALLOC_ENABLE=1 --task cdist --shapes 16384x512x128

Each process imports one build (the base through PYTHONPATH, the other as installed), times every
shape (median of --calls calls after a warm-up) and exits; the two sides alternate, in swapped order
every other round, so drift of the machine falls on both. Printed per shape: the median over the
rounds of each side and the ratio base / new (> 1: the new side is faster), with the range, and
the median of the ratios within a round ("paired": the two processes ran one after the other, so
a slow spell of a shared machine that spans a round cancels out there).
Environment variables (VQVAE_FAST_CPU_SCAN=avx2, ...) pass through to both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

# What one process runs: argv = shapes (comma-separated NxKxD), threads, dtype, task, calls, and the
# benchmarks folder, whose providers.py gives the baselines' forwards (it imports only torch and the
# vqvae_fast of the side that runs).
_CHILD = """
import statistics, sys, time
import torch, vqvae_fast
shapes, threads, dtype, task, calls = sys.argv[1].split(","), int(sys.argv[2]), getattr(torch, sys.argv[3]), sys.argv[4], int(sys.argv[5])
sys.path.insert(0, sys.argv[6])
import providers
torch.set_num_threads(threads)
torch.manual_seed(0)
for shape in shapes:
    n, k, d = map(int, shape.split("x"))
    z, codebook = torch.randn(n, d).to(dtype), torch.randn(k, d).to(dtype)
    if task == "quantize":
        call = lambda: vqvae_fast.quantize(z, codebook, beta=0.25, backend="cpu")
    elif task == "nearest":
        call = lambda: vqvae_fast.nearest_code(z, codebook, backend="cpu")
    else:  # a baseline's forward as the benchmarks time it: search, gather, loss, output
        search = providers.cdist_indices if task == "cdist" else providers.faiss_indices()
        if search is None:
            raise SystemExit("faiss is not importable: pip install faiss-cpu")
        forward = providers.lookup_forward(search)
        call = lambda: forward(z, codebook)
    for _ in range(3):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    print(shape, statistics.median(times), flush=True)
"""


def run_build(base: str | None, extra_env: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    env = {**os.environ, **extra_env}
    if base is not None:
        env["PYTHONPATH"] = base + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-c", _CHILD, ",".join(args.shapes), str(args.threads), args.dtype, args.task,
               str(args.calls), os.path.dirname(os.path.abspath(__file__))]
    # Not from the repository root: there `import vqvae_fast` would find the checkout before PYTHONPATH's build.
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=os.path.expanduser("~"))
    if done.returncode != 0:
        raise SystemExit(f"the {'base' if base else 'new'} build failed:\n{done.stderr[-3000:]}")
    return {shape: float(seconds) for shape, seconds in (line.split() for line in done.stdout.strip().splitlines())}


def parse_env(parser: argparse.ArgumentParser, assignments: list[str]) -> dict[str, str]:
    env = {}
    for assignment in assignments:
        name, equals, value = assignment.partition("=")
        if not name or not equals:
            parser.error(f"expected NAME=VALUE, got {assignment!r}")
        env[name] = value
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="root of the base build (a checkout built in place); default: the installed one")
    parser.add_argument("--base-env", nargs="*", default=[], metavar="NAME=VALUE", help="set for the base side only")
    parser.add_argument("--new-env", nargs="*", default=[], metavar="NAME=VALUE", help="set for the new side only")
    parser.add_argument("--shapes", nargs="+", required=True, help="NxKxD, e.g. 16384x256x128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--task", default="quantize", choices=["quantize", "nearest", "cdist", "faiss"],
                        help="ours (quantize: the forward, nearest: indices only) or a baseline's forward (the "
                             "benchmarks' cdist and FAISS providers: search, gather, loss, output)")
    parser.add_argument("--rounds", type=int, default=6, help="processes per side")
    parser.add_argument("--calls", type=int, default=9, help="timed calls per shape in each process")
    args = parser.parse_args()
    if args.base is not None and not os.path.isdir(os.path.join(args.base, "vqvae_fast")):
        parser.error(f"--base {args.base!r} has no vqvae_fast package (a checkout built with build_ext --inplace)")
    envs = {side: parse_env(parser, getattr(args, f"{side}_env")) for side in ("base", "new")}
    if args.base is None and envs["base"] == envs["new"]:
        parser.error("nothing differs between the two sides: give --base, or --base-env / --new-env")

    times: dict[str, dict[str, list[float]]] = {shape: {"base": [], "new": []} for shape in args.shapes}
    for round_ in range(args.rounds):
        order = ["base", "new"] if round_ % 2 == 0 else ["new", "base"]
        for build in order:
            for shape, seconds in run_build(args.base if build == "base" else None, envs[build], args).items():
                times[shape][build].append(seconds)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    sides = "; ".join(f"{side}: {args.base if side == 'base' and args.base else 'installed build'}"
                      + "".join(f" {name}={value}" for name, value in envs[side].items()) for side in ("base", "new"))
    print(f"{args.task}, {args.dtype}, {args.threads} thread(s), {args.rounds} rounds ({sides}); ms, median over rounds")
    for shape, by_build in times.items():
        base, new = statistics.median(by_build["base"]), statistics.median(by_build["new"])
        paired = statistics.median(b / n for b, n in zip(by_build["base"], by_build["new"]))
        print(f"{shape:>16}  base {base * 1e3:8.2f}  new {new * 1e3:8.2f}  base/new {base / new:.3f}"
              f"  paired {paired:.3f}"
              f"  (base {min(by_build['base']) * 1e3:.2f}-{max(by_build['base']) * 1e3:.2f},"
              f" new {min(by_build['new']) * 1e3:.2f}-{max(by_build['new']) * 1e3:.2f})")


if __name__ == "__main__":
    main()
