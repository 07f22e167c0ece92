"""Peak extra CPU memory of providers, measured as RSS in a fresh process (run by the harness).

    python benchmarks/memory_probe.py N K D DTYPE TASK PROVIDER [PROVIDER ...]   # prints JSON

Why a separate process: glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap
threshold on its heap and hands them out again without touching new pages, so in a process
that has been running the benchmarks the RSS misses temporaries of a few MiB. The harness starts
this probe with MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB: every larger block is then mapped on
allocation and unmapped on free, and the peak RSS (VmHWM, reset through /proc/self/clear_refs)
sees each one. The timing process keeps glibc's defaults.
"""
from __future__ import annotations

import gc
import json
import sys

MMAP_THRESHOLD = 64 * 1024


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_extra_bytes(fn, z, codebook) -> int:
    fn(z, codebook)  # warm-up: compilation, lazy initialisation, thread pools
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    result = fn(z, codebook)  # kept alive until VmHWM is read: outputs count as extra memory
    peak = (_status_kib("VmHWM") - before) * 1024
    del result
    return peak


def main(argv: list[str]) -> None:
    from harness import Point, make_inputs
    from providers import providers

    n, k, d, dtype, task, *names = argv
    z, codebook = make_inputs(Point(int(n), int(k), int(d), dtype), "cpu")
    found = {}
    for provider in providers("cpu"):
        if provider.name in names:
            found[provider.name] = peak_extra_bytes(provider.make(task), z, codebook)
    print(json.dumps(found))


if __name__ == "__main__":
    main(sys.argv[1:])
