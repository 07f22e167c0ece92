"""Side-by-side timing and peak memory of the nearest-code search against torch.cdist.

    python benchmarks/compare.py                          # CPU, N=65536 K=1024 D=64 fp32
    python benchmarks/compare.py --device cuda --shape 262144 16384 256 --dtype bfloat16
    python benchmarks/compare.py --backward               # forward + backward of a VQ step

Every provider runs on the same inputs, interleaved round by round so that machine noise
hits all of them alike; the table reports medians and each provider's ratio to cdist.
Peak memory is measured in a fresh subprocess per provider: the growth of the process's
maximum RSS on CPU, the caching allocator's max-allocated bytes on CUDA.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time

import torch

import vqvae_fast


def _cdist_argmin_gather(z, e):
    idx = torch.cdist(z, e).argmin(1)
    return e[idx], idx


def _addmm_argmin_gather(z, e):
    idx = torch.addmm((e * e).sum(1), z, e.T, alpha=-2).argmin(1)
    return e[idx], idx


def _ours(backend):
    def run(z, e):
        return vqvae_fast.quantize(z, e, backend=backend)[:2]
    run.backend = backend
    return run


def _training_step(lookup, beta=0.25):
    """Forward + backward of a VQ step: straight-through output and the VQ-VAE losses."""
    def step(z, e):
        z, e = z.detach().requires_grad_(), e.detach().requires_grad_()
        backend = getattr(lookup, "backend", None)
        if backend:  # ours: the fused op computes the loss itself
            quantized, _, loss = vqvae_fast.quantize(z, e, beta=beta, backend=backend)
        else:
            chosen, _ = lookup(z, e)
            loss = ((chosen - z.detach()) ** 2).mean() + beta * ((z - chosen.detach()) ** 2).mean()
            quantized = z + (chosen - z).detach()
        (quantized.float().sum() + loss).backward()
        return z.grad, e.grad
    return step


def providers(device: str, backward: bool = False) -> dict:
    found = {"cdist+argmin+gather": _cdist_argmin_gather, "addmm+argmin+gather": _addmm_argmin_gather}
    for backend in (("cpu",) if device == "cpu" else ("triton", "cuda")):
        try:
            vqvae_fast.functional.resolve_backend(backend, torch.device(device))
        except (RuntimeError, ValueError):
            continue
        found[f"vqvae_fast[{backend}]"] = _ours(backend)
    if backward:
        found = {name: _training_step(fn) for name, fn in found.items()}
    return found


def make_inputs(shape, dtype, device, seed=0):
    n, k, d = shape
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(dtype=dtype, device=device)
    e = torch.randn(k, d, generator=g).to(dtype=dtype, device=device)
    return z, e


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_all(fns, z, e, device, rounds):
    for fn in fns.values():  # warm-up: compilation, autotuning, allocator
        fn(z, e)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn(z, e)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _peak_child(name, shape, dtype, device, backward, queue):
    fn = providers(device, backward)[name]
    z, e = make_inputs(shape, dtype, device)
    fn(z[:64], e)  # load kernels before the baseline
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(z, e)
        torch.cuda.synchronize()
        queue.put(torch.cuda.max_memory_allocated() - base)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn(z, e)
        queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)


def peak_extra_bytes(name, shape, dtype, device, backward):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(name, shape, dtype, device, backward, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=(65536, 1024, 64), metavar=("N", "K", "D"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=7, help="timed runs per provider (median reported)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward of a VQ training step")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    z, e = make_inputs(args.shape, dtype, args.device)
    fns = providers(args.device, args.backward)
    times = time_all(fns, z, e, args.device, args.rounds)

    n, k, d = args.shape
    base = statistics.median(times["cdist+argmin+gather"])
    rows = []
    what = "forward+backward" if args.backward else "forward"
    print(f"{what}: N={n} K={k} D={d} {args.dtype} on {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), median of {args.rounds}")
    print(f"{'provider':<24}{'median ms':>11}{'min..max ms':>18}{'GFLOP/s':>9}{'vs cdist':>10}{'extra MiB':>11}")
    for name, samples in times.items():
        med = statistics.median(samples)
        peak = peak_extra_bytes(name, args.shape, dtype, args.device, args.backward)
        row = dict(provider=name, median_s=med, min_s=min(samples), max_s=max(samples),
                   gflops=2 * n * k * d / med / 1e9, speedup_vs_cdist=base / med, peak_extra_bytes=peak)
        rows.append(row)
        mib = "n/a" if peak is None else f"{peak / 2**20:.0f}"
        print(f"{name:<24}{med * 1e3:>11.1f}{min(samples) * 1e3:>9.1f}..{max(samples) * 1e3:<7.1f}"
              f"{row['gflops']:>9.1f}{row['speedup_vs_cdist']:>9.2f}x{mib:>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(shape=args.shape, dtype=args.dtype, device=args.device, rounds=args.rounds, what=what,
                           torch=torch.__version__, threads=torch.get_num_threads(), results=rows), f, indent=2)


if __name__ == "__main__":
    main()
