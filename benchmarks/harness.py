"""The benchmark harness shared by compare.py, sweep.py and bench_training.py.

One point = one (N, K, D, dtype, task). `run_point` times every provider on the same inputs,
interleaved round by round (the order rotating each round) so that load from other jobs on a
shared machine hits all of them alike; it reports the median with the spread, GFLOP/s from
2*N*K*D, ratios to the baselines and to the GEMM floor, the peak extra memory, and the
correctness check of what was timed.

Peak extra memory of one call, outputs included (O(N) for the searches, O(N*K) for the GEMM
floor): on CUDA the caching allocator's max-allocated counter minus what was allocated before,
in-process; on CPU the growth of the peak RSS, in a fresh process (memory_probe.py).
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import correctness
from providers import ADDMM, CDIST, COMPILED, FAISS, FLASH_KMEANS, GEMM, GEMM_TF32, Provider, indices_of, providers

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


@dataclass(frozen=True)
class Point:
    n: int
    k: int
    d: int
    dtype: str = "float32"

    @property
    def flops(self) -> int:
        return 2 * self.n * self.k * self.d  # the z @ E^T product at the heart of every provider

    def min_bytes(self, task: str) -> int:
        """Bytes any implementation must move: read z and the codebook once, write the indices
        (int64), and for forward the quantized rows; backward also reads the incoming gradient
        and writes both gradients."""
        size = DTYPES[self.dtype].itemsize
        nd, kd = self.n * self.d, self.k * self.d
        moved = {"nearest": nd + kd, "forward": 2 * nd + kd, "backward": 4 * nd + 2 * kd}[task]
        return size * moved + 8 * self.n

    def label(self) -> str:
        return f"N={self.n} K={self.k} D={self.d} {SHORT_DTYPE[self.dtype]}"


# --------------------------------------------------------------------------- machine and inputs

def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _memory_allocation() -> dict:
    """What decides whether a new CPU tensor lands on fresh pages: each fresh page costs a fault, and
    baselines that allocate N x K matrices per call ran 1.15-1.8x faster with torch's huge-page
    allocations (THP_MEM_ALLOC_ENABLE=1; benchmarks/RESULTS.md), so results are comparable only
    under the same settings."""
    names = ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
             "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")
    info = {name: os.environ[name] for name in names if name in os.environ}
    try:  # e.g. "always [madvise] never": the bracketed mode is in force
        info["transparent_hugepage"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    return info


def machine_info(device: str) -> dict:
    """Everything needed to tell whether two result files are comparable."""
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        device=device,
        cpu=_cpu_model(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),  # the SIMD level torch's kernels use
        logical_cpus=os.cpu_count(),
        memory_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        git_commit=_git("rev-parse", "HEAD"),
        git_dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
        load_average=os.getloadavg(),
        memory_allocation=_memory_allocation(),
    )
    # Which build of the kernels ran: the library can be rebuilt between runs.
    import vqvae_fast._extension as ext
    if ext.has_compiled():
        library = Path(ext._C.__file__)
        # fused-amx (D >= 16 where the CPU has AMX), fused-avx512 or gemm, at a small and a large D
        info["cpu_forward_path"] = {d: torch.ops.vqvae_fast.cpu_forward_path(d) for d in (8, 256)}
        # bf16 inputs may take another (the bf16 scan on CPUs with AVX512-BF16)
        info["cpu_forward_path_bf16"] = {d: torch.ops.vqvae_fast.cpu_forward_path(d, torch.bfloat16) for d in (8, 256)}
        info["vqvae_fast_library"] = dict(file=library.name, size=library.stat().st_size, modified=datetime.datetime.
                                          fromtimestamp(library.stat().st_mtime, datetime.timezone.utc)
                                          .isoformat(timespec="seconds"))
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    fp32_matmul_precision=torch.get_float32_matmul_precision())
    return info


def make_inputs(point: Point, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """z (N, D) and codebook (K, D) with standard normal entries, the same for every provider."""
    g = torch.Generator().manual_seed(seed)
    dtype = DTYPES[point.dtype]
    z = torch.randn(point.n, point.d, generator=g).to(dtype=dtype, device=device)
    codebook = torch.randn(point.k, point.d, generator=g).to(dtype=dtype, device=device)
    return z, codebook


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_rate(device: str, dtype: str) -> float:
    """FLOP/s of a large square matmul: the machine's practical peak, for 'time vs peak GEMM'.

    Measured afresh at every point, inside the window whose disturbance by other processes is
    recorded, so that a disturbed rate cannot hide behind an undisturbed timing.
    """
    size = 8192 if device == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(DTYPES[dtype])
    samples = time_interleaved({"gemm": lambda x, y: x @ y}, a, a, device, rounds=7)[0]["gemm"]
    return 2 * size ** 3 / statistics.median(samples)


def copy_rate(device: str) -> float:
    """Bytes/s moved by copying a 256 MiB buffer (read + write): the memory-traffic roof, measured
    next to gemm_rate for the same reason."""
    src = torch.empty(64 * 2**20, device=device).uniform_()
    dst = torch.empty_like(src)
    samples = time_interleaved({"copy": lambda a, b: b.copy_(a)}, src, dst, device, rounds=7)[0]["copy"]
    return 2 * src.numel() * src.element_size() / statistics.median(samples)


# --------------------------------------------------------------------------- timing and memory

class OtherLoad:
    """Share of the machine's CPU time that other processes used while this one measured.

    The machine may be shared with other jobs; a run they disturbed shows a high share and can
    be repeated. From /proc/stat (all CPUs busy time) minus this process's own CPU time.
    """

    def __enter__(self):
        self.start = (self._busy_seconds(), self._own_seconds(), time.monotonic())
        return self

    def __exit__(self, *exc):
        busy0, own0, t0 = self.start
        wall = (time.monotonic() - t0) * (os.cpu_count() or 1)
        others = (self._busy_seconds() - busy0) - (self._own_seconds() - own0)
        self.share = max(0.0, others / wall) if wall > 0 else 0.0

    @staticmethod
    def _busy_seconds() -> float:
        try:
            fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        except OSError:
            return 0.0
        idle = fields[3] + fields[4]  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system


def wait_for_idle(max_busy: float, timeout_s: float = 1800, sample_s: float = 5) -> float:
    """Wait until other processes keep less than `max_busy` of the CPUs busy (sampled over
    `sample_s`), or `timeout_s` passed; returns the last busy share seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        with OtherLoad() as load:
            time.sleep(sample_s)
        if load.share < max_busy or time.monotonic() > deadline:
            return load.share
        time.sleep(sample_s)


def measure_undisturbed(measure, share_of, max_other_load: float | None, attempts: int = 4):
    """measure() again, after waiting for an idle machine, while other processes' share of the
    CPU time during it (share_of(result)) exceeds max_other_load; keeps the least disturbed.
    With max_other_load None: one measurement, as is."""
    best = None
    for attempt in range(attempts if max_other_load is not None else 1):
        if attempt:
            print(f"  other processes took {share_of(best):.0%} of the CPUs: waiting for an idle machine, "
                  f"attempt {attempt + 1}", file=sys.stderr)
            wait_for_idle(max_other_load)
        result = measure()
        if best is None or share_of(result) < share_of(best):
            best = result
        if max_other_load is None or share_of(best) <= max_other_load:
            break
    return best


def _short_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]


def _cuda_sample(fn, z, codebook, sample_s: float) -> float:
    """Median seconds per call over `sample_s`, by CUDA events, with the L2 cache flushed
    before every call (triton.testing.do_bench): a kernel is not timed on warm inputs."""
    from triton.testing import do_bench

    return do_bench(lambda: fn(z, codebook), warmup=1, rep=max(1, int(sample_s * 1e3)), return_mode="median") / 1e3


def time_interleaved(fns: dict, z, codebook, device: str, rounds: int, min_sample_s: float = 0.02):
    """Seconds per call of each fn, `rounds` samples each, interleaved round by round.

    One untimed warm-up call each (compilation, autotuning, allocator). On CPU a sample repeats
    fast calls until it lasts `min_sample_s`, so timer overheads do not dominate; on CUDA a
    sample is the median of CUDA-event timings over `min_sample_s` with L2 flushed between calls.
    Returns ({name: [seconds per call, ...]}, {name: error of the providers that failed}).
    """
    errors, reps = {}, {}
    for name, fn in fns.items():
        try:
            fn(z, codebook)
            sync(device)
            start = time.perf_counter()
            fn(z, codebook)
            sync(device)
            reps[name] = max(1, min(1000, math.ceil(min_sample_s / max(time.perf_counter() - start, 1e-9))))
        except Exception as err:  # out of memory, a dtype the op does not take: reported, not fatal
            errors[name] = _short_error(err)
            if device == "cuda":
                torch.cuda.empty_cache()
    names = [name for name in fns if name not in errors]
    times = {name: [] for name in names}
    for round_ in range(rounds):
        for i in range(len(names)):
            name = names[(i + round_) % len(names)]  # rotate: nobody always runs right after the same one
            fn = fns[name]
            if device == "cuda":
                times[name].append(_cuda_sample(fn, z, codebook, min_sample_s))
                continue
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn(z, codebook)
            times[name].append((time.perf_counter() - start) / reps[name])
    return times, errors


def run_measuring_peak_cuda(fn, z, codebook):
    """(result, peak extra bytes) of one call: the caching allocator's counters, in-process."""
    gc.collect()
    sync("cuda")
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn(z, codebook)
    sync("cuda")
    return result, torch.cuda.max_memory_allocated() - before


def peak_extra_bytes_cpu(point: Point, task: str, names: list[str]) -> dict:
    """{provider: peak extra RSS bytes} from a fresh process (see memory_probe.py for why)."""
    if not names:
        return {}
    from memory_probe import MMAP_THRESHOLD

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
               GLIBC_TUNABLES=f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}")
    probe = Path(__file__).with_name("memory_probe.py")
    args = [sys.executable, str(probe), str(point.n), str(point.k), str(point.d), point.dtype, task, *names]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # killed for memory, say: the numbers are missing, not zero
        print(f"memory probe failed ({done.returncode}): {done.stderr.strip()[-500:]}", file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_memory_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------- one point

def _summary(samples: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    return dict(median_s=statistics.median(samples), q1_s=q1, q3_s=q3, min_s=min(samples), max_s=max(samples),
                samples_s=samples)


def check_result(provider: Provider, task: str, z, codebook, result) -> dict:
    """The correctness of one provider's result (empty for the floor, which has nothing to check)."""
    indices = indices_of(task, result)
    if indices is None:
        return {}
    rows = correctness.sample_rows(z.shape[0], z.device)
    found = correctness.check_indices(z, codebook, indices, rows).as_dict()
    found["rtol"] = correctness.index_rtol(provider.kind, provider.backend, z.dtype, provider.name)
    ok = found["worst_excess"] <= found["rtol"]
    if task == "backward":
        found["grad_error"] = correctness.check_gradients(z, codebook, indices, result[1], result[2], rows)
        found["grad_rtol"] = correctness.gradient_rtol(z.dtype)
        ok = ok and found["grad_error"] <= found["grad_rtol"]
    found["ok"] = ok
    return found


def run_point(point: Point, device: str, task: str, rounds: int, *, only: list[str] | None = None,
              memory: bool = True, check: bool = True, memory_fraction: float = 0.7,
              floor_dtype: str | None = None) -> dict:
    """Time, measure and check every provider at one point; returns a JSON-able dict. The GEMM
    floor is timed in floor_dtype (default: the point's dtype)."""
    torch._dynamo.reset()  # fresh compiled code per point: no recompile limits, no stale guards
    z, codebook = make_inputs(point, device)
    room = available_memory_bytes(device)
    rows, fns, by_name = {}, {}, {}
    for provider in providers(device):
        if (only and provider.name not in only) or provider.only_dtype not in (None, z.dtype):
            continue
        needs = provider.nk_bytes_per_element(z.dtype, task) * point.n * point.k
        if needs > memory_fraction * room:
            rows[provider.name] = dict(provider=provider.name, kind=provider.kind, status="skipped",
                                       reason=f"its N x K matrices need ~{needs / 2**30:.1f} GiB, "
                                              f"{room / 2**30:.1f} GiB available")
            continue
        fns[provider.name] = provider.make(task)
        by_name[provider.name] = provider
        rows[provider.name] = dict(provider=provider.name, kind=provider.kind)

    with OtherLoad() as other_load:
        large_gemm_rate = gemm_rate(device, floor_dtype or point.dtype)
        memory_rate = copy_rate(device)
        times, errors = time_interleaved(fns, z, codebook, device, rounds)
    for name, error in errors.items():
        rows[name].update(status="failed", reason=error)
    for name, samples in times.items():
        row = rows[name]
        row.update(status="ok", **_summary(samples))
        row["gflops"] = point.flops / row["median_s"] / 1e9
        if memory and device == "cuda":
            result, row["peak_extra_bytes"] = run_measuring_peak_cuda(fns[name], z, codebook)
        else:
            result = fns[name](z, codebook)
        if check:
            row["check"] = check_result(by_name[name], task, z, codebook, result)
        del result
    if memory and device == "cpu":
        del z, codebook  # the probe process makes its own: do not hold two copies
        for name, peak in peak_extra_bytes_cpu(point, task, list(times)).items():
            rows[name]["peak_extra_bytes"] = peak
    _add_ratios(rows, point, large_gemm_rate, point.min_bytes(task) / memory_rate)
    return dict(point=point.__dict__, task=task, flops=point.flops, min_bytes=point.min_bytes(task), rounds=rounds,
                load_average=os.getloadavg(), other_processes_cpu_share=other_load.share,
                large_gemm_gflops=large_gemm_rate / 1e9, large_gemm_dtype=floor_dtype or point.dtype, copy_gbps=memory_rate / 1e9, rows=list(rows.values()))


def _add_ratios(rows: dict, point: Point, floor_rate: float, memory_floor_s: float) -> None:
    """Speedups over the baselines (>1: faster) and time relative to the GEMM floor (>1: slower)."""
    def median(name):
        row = rows.get(name, {})
        return row.get("median_s") if row.get("status") == "ok" else None

    for row in rows.values():
        if row.get("status") != "ok":
            continue
        mine = row["median_s"]
        for name, key in ((CDIST, "speedup_vs_cdist"), (ADDMM, "speedup_vs_addmm"),
                          (COMPILED, "speedup_vs_compiled"), (FLASH_KMEANS, "speedup_vs_flash_kmeans"),
                          (FAISS, "speedup_vs_faiss")):
            row[key] = median(name) / mine if median(name) else None
        row["time_vs_gemm"] = mine / median(GEMM) if median(GEMM) else None
        # fp32 on CUDA: ours does three TF32 passes (3xTF32); its floor is three TF32 GEMMs.
        row["time_vs_3xtf32_gemm"] = mine / (3 * median(GEMM_TF32)) if median(GEMM_TF32) else None
        # The floor from the flop count at the large-GEMM rate: where the bare z @ E^T itself is
        # memory-bound (small D), this floor is lower than the measured GEMM.
        row["time_vs_peak_gemm_rate"] = mine / (point.flops / floor_rate)
        # The floor from the bytes that must move, at the rate of a large copy.
        row["time_vs_memory_floor"] = mine / memory_floor_s


# --------------------------------------------------------------------------- output

def _ratio(value, suffix="x") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _check_text(check: dict) -> str:
    if not check:
        return "-"
    text = "ok" if check["ok"] else "WRONG"
    text += f" {100 * check['inexact_fraction']:.1f}% inexact"
    if "grad_error" in check:
        text += f", grad err {check['grad_error']:.1e}"
    return text


def format_point(result: dict) -> str:
    """A table of one point's providers."""
    lines = [f"{'provider':<20}{'median ms':>11}{'min..max ms':>19}{'GFLOP/s':>9}{'vs cdist':>10}{'vs addmm':>10}"
             f"{'xGEMM':>8}{'extra MiB':>11}  check"]
    for row in result["rows"]:
        if row.get("status") != "ok":
            lines.append(f"{row['provider']:<20}  {row['status']}: {row['reason']}")
            continue
        spread = f"{row['min_s'] * 1e3:.2f}..{row['max_s'] * 1e3:.2f}"
        lines.append(f"{row['provider']:<20}{row['median_s'] * 1e3:>11.2f}{spread:>19}{row['gflops']:>9.1f}"
                     f"{_ratio(row['speedup_vs_cdist']):>10}{_ratio(row['speedup_vs_addmm']):>10}"
                     f"{_ratio(row['time_vs_gemm']):>8}{_mib(row.get('peak_extra_bytes')):>11}  "
                     f"{_check_text(row.get('check', {}))}")
    return "\n".join(lines)


def write_json(path, payload: dict) -> None:
    """Write atomically, so an interrupted run leaves the previous complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)
