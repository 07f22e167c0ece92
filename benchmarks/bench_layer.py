"""One training step of the whole VQ layer: vqvae_fast.VectorQuantizer against its peers.

    python benchmarks/bench_layer.py                                   # CPU, every shape, fp32
    python benchmarks/bench_layer.py --shapes cifar-vqvae trainer-default --rounds 3
    python benchmarks/bench_layer.py --autocast bf16 --threads 2 --json out.json
    python benchmarks/bench_layer.py --device cuda --shape 65536 8192 64 --cosine

Providers, each a layer built once and called the way a user's training step calls it:

    vqvae_fast                VectorQuantizer with EMA codebook (decay 0.99), k-means init
                              (10 Lloyd steps) and dead-code restarts; the fused search op
    vector-quantize-pytorch   VectorQuantize (lucidrains) with the same options: EMA decay 0.99,
                              k-means init, threshold_ema_dead_code=2, commitment weight 0.25;
                              straight-through gradient (rotation_trick=False: its default for
                              dim > 1 is the rotation trick). Optional: `pip install
                              vector-quantize-pytorch`, skipped with that hint when absent
    vqvae_fast.compat         the drop-in vqvae_fast.compat.VectorQuantize, built with exactly the
                              peer's arguments (rotation_trick=False included) and called as the
                              peer is: what a user gets by switching the import line
    cdist layer               the hand-rolled layer: torch.cdist(z, E).argmin(1), gather,
                              straight-through, codebook + commitment loss, the codebook learned
                              by gradient (no EMA, no init, no restarts)

A step is what the layer costs in a training step: zero the gradients, forward under the chosen
precision (its state updates: EMA, usage, restarts, included), then backward of
loss + (quantized * g).sum(), with g a fixed random (N, D) tensor, so that the gradient flows
back to z through the straight-through path. z (N, D) is a leaf with requires_grad, as an
encoder's output (the peer gets the (1, N, D) view it expects). The optimizer step is not timed
(the cdist layer's is an O(K*D) update). k-means init runs in the untimed warm-up call.

Cosine shapes normalise z and the codebook (the peer's use_cosine_sim; the cdist layer runs
cdist on the normalised vectors, which picks the same code as the largest cosine; vqvae_fast
with distance="cosine", skipped with a message where this checkout's VectorQuantizer has no
`distance` argument yet). Dead-code thresholds match: the peer retires a code whose EMA count
per step falls below 2; ours compares usage scaled so that uniform use is 1, so the same
threshold is 2*K/N.

Timing, load recording, memory and the machine description are the harness's (harness.py):
providers interleaved round by round, the median with the spread; on CUDA CUDA-event timing
and the allocator's peak minus what was allocated before; on CPU the peak RSS growth of one
step in a fresh process started from the timed layer's saved state (memory_probe.py's method;
z's gradient, the outputs and autograd's saved tensors included). The floor is the search's 2*N*K*D flops at
the large-GEMM rate measured in the same run (of bf16 under --autocast bf16): any exhaustive
layer does at least this product; the EMA layers' codebook sums and the backward are not in
it (the peer does two more N x K x D products: the one-hot gather and the one-hot EMA sums).
Before timing, each layer's step is checked once: quantized shape, indices in range, loss and
gradient finite; and, reported as information, the share of rows whose code is not the exact
nearest (float64 distances against the layer's codebook, in eval mode).
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import correctness
import vqvae_fast
from harness import (OtherLoad, _mib, _ratio, _short_error, _summary, available_memory_bytes, gemm_rate,
                     machine_info, measure_undisturbed, run_measuring_peak_cuda, time_interleaved, write_json)

OURS, COMPAT, PEER, CDIST_LAYER = "vqvae_fast", "vqvae_fast.compat", "vector-quantize-pytorch", "cdist layer"
BETA, EMA_DECAY, KMEANS_ITERS = 0.25, 0.99, 10
DEAD_CODE_COUNT = 2  # a code is dead below this EMA count of vectors per step (the peer's threshold_ema_dead_code)
AUTOCAST = {"none": None, "bf16": torch.bfloat16}
INPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LayerShape:
    n: int  # tokens per step
    k: int  # codes
    d: int  # code dimension
    cosine: bool = False
    name: str = "custom"

    @property
    def search_flops(self) -> int:
        return 2 * self.n * self.k * self.d  # z @ E^T: every exhaustive layer does at least this

    def label(self) -> str:
        return f"{self.name} (N={self.n} K={self.k} D={self.d}{', cosine' if self.cosine else ''})"


SHAPES = {shape.name: shape for shape in (
    LayerShape(8192, 512, 64, name="cifar-vqvae"),
    LayerShape(8192, 4096, 32, name="trainer-default"),
    LayerShape(32768, 16384, 8, cosine=True, name="llamagen-vq16"),
    LayerShape(16384, 16384, 256, name="vqgan-f16"),
    LayerShape(65536, 1024, 128, name="encodec-stage"),
    LayerShape(16384, 2048, 256, name="mimi-first"),
)}
QUICK_SHAPES = ("cifar-vqvae", "trainer-default", "mimi-first")


# --------------------------------------------------------------------------- the layers

class CdistLayer(nn.Module):
    """The VQ layer as users hand-roll it: cdist + argmin + gather, straight-through, the
    VQ-VAE loss (codebook term + beta * commitment) and a codebook learned by gradient."""

    def __init__(self, num_codes: int, dim: int, beta: float, cosine: bool):
        super().__init__()
        self.codebook = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes))
        self.beta, self.cosine = beta, cosine

    def forward(self, z: torch.Tensor):
        codebook = self.codebook
        z_in = z.to(codebook.dtype)
        if self.cosine:
            z_in, codebook = F.normalize(z_in, dim=1), F.normalize(codebook, dim=1)
        indices = torch.cdist(z_in, codebook).argmin(1)
        chosen = codebook[indices]
        loss = F.mse_loss(chosen, z_in.detach()) + self.beta * F.mse_loss(z_in, chosen.detach())
        quantized = z_in + (chosen - z_in).detach()
        return quantized.to(z.dtype), indices, loss


@dataclass
class Layer:
    """A built layer: `call(z) -> (quantized (N, D), indices (N,), loss)` in training mode,
    `codebook()` the codes its search compares against (for the exactness check)."""
    module: nn.Module
    call: Callable
    codebook: Callable[[], torch.Tensor]


def ours_has_cosine() -> bool:
    return "distance" in inspect.signature(vqvae_fast.VectorQuantizer).parameters


def build_ours(shape: LayerShape, device: str, dead_code_count: float) -> Layer:
    options = dict(num_codes=shape.k, dim=shape.d, beta=BETA, ema_decay=EMA_DECAY, kmeans_init=True,
                   kmeans_iters=KMEANS_ITERS, restart_dead=True, dead_threshold=dead_code_count * shape.k / shape.n)
    if shape.cosine:
        options["distance"] = "cosine"
    layer = vqvae_fast.VectorQuantizer(**options).to(device)
    return Layer(layer, lambda z: tuple(layer(z))[:3], lambda: layer.codebook)


def peer_options(shape: LayerShape, dead_code_count: float) -> dict:
    """The peer's VectorQuantize arguments, also the drop-in's (vqvae_fast.compat takes the same)."""
    return dict(dim=shape.d, codebook_size=shape.k, decay=EMA_DECAY, kmeans_init=True, kmeans_iters=KMEANS_ITERS,
                threshold_ema_dead_code=dead_code_count, commitment_weight=BETA, use_cosine_sim=shape.cosine,
                rotation_trick=False)


def _peer_layer(layer: nn.Module) -> Layer:
    def call(z):
        quantized, indices, loss = layer(z[None])  # it takes (batch, tokens, dim)
        return quantized[0], indices[0], loss

    return Layer(layer, call, lambda: layer.codebook)


def build_peer(shape: LayerShape, device: str, dead_code_count: float) -> Layer:
    from vector_quantize_pytorch import VectorQuantize

    return _peer_layer(VectorQuantize(**peer_options(shape, dead_code_count)).to(device))


def build_compat(shape: LayerShape, device: str, dead_code_count: float) -> Layer:
    from vqvae_fast.compat import VectorQuantize

    return _peer_layer(VectorQuantize(**peer_options(shape, dead_code_count)).to(device))


def build_cdist(shape: LayerShape, device: str, dead_code_count: float) -> Layer:
    layer = CdistLayer(shape.k, shape.d, BETA, shape.cosine).to(device)
    return Layer(layer, layer, lambda: layer.codebook)


def ours_unavailable(shape: LayerShape) -> str | None:
    if shape.cosine and not ours_has_cosine():
        return "this checkout's VectorQuantizer has no distance= argument yet (cosine distance): skipped"
    return None


def peer_unavailable(shape: LayerShape) -> str | None:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        return "not installed: pip install vector-quantize-pytorch"
    return None


@dataclass(frozen=True)
class LayerProvider:
    name: str
    kind: str  # "ours", "compat" (our drop-in for the peer), "peer" or "baseline"
    build: Callable[[LayerShape, str, float], Layer]  # (shape, device, dead-code count) -> Layer
    unavailable: Callable[[LayerShape], str | None] = lambda shape: None
    # Bytes of N x K temporaries per element of the N x K matrix (0: none), so that a shape whose
    # matrices cannot fit is skipped instead of running out of memory. Measured with the probe.
    nk_bytes: float = 0.0


PROVIDERS = (
    LayerProvider(OURS, "ours", build_ours, ours_unavailable),
    LayerProvider(COMPAT, "compat", build_compat),  # the fused op: no N x K temporaries
    # Measured peak of a step (memory probe, fp32, N=8192 K=4096): 24 bytes per N x K element
    # for the peer's Euclidean step (its distance chain, the int64 one-hot and its float copy;
    # 16 for cosine), 4 for the cdist layer (the distances).
    LayerProvider(PEER, "peer", build_peer, peer_unavailable, nk_bytes=24.0),
    LayerProvider(CDIST_LAYER, "baseline", build_cdist, nk_bytes=4.0),
)
PROVIDER_NAMES = tuple(p.name for p in PROVIDERS)


# --------------------------------------------------------------------------- one step

def make_layer_inputs(shape: LayerShape, device: str, dtype: torch.dtype, seed: int = 0):
    """z (N, D), a leaf requiring grad, and the fixed upstream gradient g (N, D)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(shape.n, shape.d, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    g = torch.randn(shape.n, shape.d, generator=gen).to(device=device, dtype=dtype)
    return z, g


def training_step(layer: Layer, g: torch.Tensor, device: str, autocast: torch.dtype | None) -> Callable:
    """fn(z, _) -> (quantized, indices, loss): zero grads, forward (state updates included), backward."""

    def step(z, _codebook=None):
        z.grad = None
        layer.module.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            quantized, indices, loss = layer.call(z)
            objective = loss + (quantized * g).sum()
        objective.backward()
        return quantized.detach(), indices, loss.detach()

    return step


def step_problems(quantized: torch.Tensor, indices: torch.Tensor, loss: torch.Tensor, z: torch.Tensor, n: int,
                  d: int, k: int, index_shape: tuple) -> list[str]:
    """What is wrong with one training step's outputs: quantized (n, d) finite, integer indices of
    index_shape in [0, k), a finite scalar loss, a finite gradient at z (empty: nothing)."""
    problems = []
    if tuple(quantized.shape) != (n, d):
        problems.append(f"quantized has shape {tuple(quantized.shape)}, expected {(n, d)}")
    elif not bool(torch.isfinite(quantized).all()):
        problems.append("quantized is not finite")
    if tuple(indices.shape) != index_shape or indices.dtype.is_floating_point:
        problems.append(f"indices have shape {tuple(indices.shape)} {indices.dtype}, expected {index_shape} integer")
    elif bool(((indices < 0) | (indices >= k)).any()):
        problems.append(f"index out of range [0, {k})")
    if loss.numel() != 1 or not math.isfinite(float(loss)):
        problems.append(f"loss is not a finite scalar: {loss}")
    if z.grad is None or not bool(torch.isfinite(z.grad).all()):
        problems.append("no finite gradient reached z")
    return problems


def check_step(layer: Layer, step: Callable, z: torch.Tensor, shape: LayerShape, device: str,
               autocast: torch.dtype | None) -> dict:
    """One untimed step's sanity (shape, range, finiteness), and the search's exactness in eval mode."""
    quantized, indices, loss = step(z)
    problems = step_problems(quantized, indices, loss, z, shape.n, shape.d, shape.k, (shape.n,))
    found = dict(ok=not problems, problems=problems, loss=float(loss) if loss.numel() == 1 else None)
    if problems:
        return found
    layer.module.eval()  # no state update: the codebook below is the one the search used
    try:
        with torch.no_grad(), torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            eval_indices = layer.call(z)[1].long()
        x, codebook = z.detach().float(), layer.codebook().detach().float()
        if shape.cosine:  # the largest cosine is the nearest code of the normalised vectors
            x, codebook = F.normalize(x, dim=1), F.normalize(codebook, dim=1)
        found.update(correctness.check_indices(x, codebook, eval_indices).as_dict())
    finally:
        layer.module.train()
    return found


def build_layer(provider: LayerProvider, shape: LayerShape, device: str, dead_code_count: float) -> Layer:
    torch.manual_seed(0)  # the same k-means seeds and restart draws on every run
    layer = provider.build(shape, device, dead_code_count)
    layer.module.train()
    return layer


def prepare(provider: LayerProvider, shape: LayerShape, device: str, autocast: torch.dtype | None,
            z: torch.Tensor, g: torch.Tensor, dead_code_count: float) -> tuple[Layer, Callable, dict]:
    """Build the layer, run its warm-up step (k-means init) and the check; (layer, step, check)."""
    layer = build_layer(provider, shape, device, dead_code_count)
    step = training_step(layer, g, device, autocast)
    step(z)  # k-means init happens here, untimed
    return layer, step, check_step(layer, step, z, shape, device, autocast)


# --------------------------------------------------------------------------- memory

def probe_peak_bytes(script: str, name: str, module: nn.Module, options: list[str], args, workdir: str) -> int | None:
    """Peak RSS growth of one call in a fresh process (see memory_probe.py for why and how): runs
    `script --memory-probe NAME STATE OPTIONS` with the run's dtype, autocast, dead-code count and
    threads, STATE being `module`'s saved state; the probe prints {NAME: bytes} as its last line."""
    from memory_probe import MMAP_THRESHOLD

    state = os.path.join(workdir, "state.pt")
    torch.save(module.state_dict(), state)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD),
               GLIBC_TUNABLES=f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}")
    command = [sys.executable, script, "--memory-probe", name, state, *options, "--dtype", args.dtype,
               "--autocast", args.autocast, "--dead-code-count", str(args.dead_code_count)]
    command += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # killed for memory, say: the number is missing, not zero
        print(f"memory probe of {name} {' '.join(options)} failed ({done.returncode}): "
              f"{done.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])[name]


def peak_extra_bytes_cpu(name: str, layer: Layer, shape: LayerShape, args, workdir: str) -> int | None:
    """Peak RSS growth of one step in a fresh process, starting from `layer`'s state
    (initialised: the probe does not run k-means again)."""
    options = ["--shape", str(shape.n), str(shape.k), str(shape.d)] + (["--cosine"] if shape.cosine else [])
    return probe_peak_bytes(__file__, name, layer.module, options, args, workdir)


def memory_probe_main(name: str, state: str, shape: LayerShape, args) -> None:
    """In the probe process: the layer in the saved state; one step measured after one warm-up (prints JSON)."""
    from memory_probe import peak_extra_bytes

    provider = next(p for p in PROVIDERS if p.name == name)
    z, g = make_layer_inputs(shape, "cpu", INPUT_DTYPES[args.dtype])
    layer = build_layer(provider, shape, "cpu", args.dead_code_count)
    layer.module.load_state_dict(torch.load(state))
    step = training_step(layer, g, "cpu", AUTOCAST[args.autocast])
    print(json.dumps({name: peak_extra_bytes(step, z, None)}))


# --------------------------------------------------------------------------- one shape

def run_shape(shape: LayerShape, args) -> dict:
    """Build, check, time (interleaved) and measure every selected provider at one shape."""
    device, dtype, autocast = args.device, INPUT_DTYPES[args.dtype], AUTOCAST[args.autocast]
    z, g = make_layer_inputs(shape, device, dtype)
    room = available_memory_bytes(device)
    rows, layers, steps = {}, {}, {}
    for provider in PROVIDERS:
        if provider.name not in args.providers:
            continue
        row = rows[provider.name] = dict(provider=provider.name, kind=provider.kind)
        needs = provider.nk_bytes * shape.n * shape.k
        reason = provider.unavailable(shape)
        if reason is None and needs > 0.7 * room:
            reason = f"its N x K matrices need ~{needs / 2**30:.1f} GiB, {room / 2**30:.1f} GiB available"
        if reason is not None:
            row.update(status="skipped", reason=reason)
            continue
        try:
            layer, step, row["check"] = prepare(provider, shape, device, autocast, z, g, args.dead_code_count)
        except Exception as err:  # out of memory, an option it does not take: reported, not fatal
            row.update(status="failed", reason=_short_error(err))
            continue
        if row["check"]["ok"]:
            layers[provider.name], steps[provider.name] = layer, step
        else:
            row.update(status="failed", reason="; ".join(row["check"]["problems"]))
        del layer, step
    floor_dtype = "bfloat16" if autocast is not None else args.dtype
    with OtherLoad() as other_load:
        rate = gemm_rate(device, floor_dtype)
        times, errors = time_interleaved(steps, z, None, device, args.rounds)
    for name, error in errors.items():
        rows[name].update(status="failed", reason=error)
    for name, samples in times.items():
        row = rows[name]
        row.update(status="ok", **_summary(samples))
        row["steps_per_s"] = 1.0 / row["median_s"]
        row["time_vs_search_floor"] = row["median_s"] / (shape.search_flops / rate)
        if not args.no_memory and device == "cuda":
            row["peak_extra_bytes"] = run_measuring_peak_cuda(steps[name], z, None)[1]
    if not args.no_memory and device == "cpu":
        del z, g, steps  # the probe process makes its own: do not hold two copies
        with tempfile.TemporaryDirectory() as workdir:
            for name in times:
                rows[name]["peak_extra_bytes"] = peak_extra_bytes_cpu(name, layers[name], shape, args, workdir)
    ours, peer = rows.get(OURS, {}), rows.get(PEER, {})
    for row in rows.values():  # ours is X times faster than this one (>1: ours faster)
        both = row.get("status") == "ok" and ours.get("status") == "ok"
        row["ours_speedup"] = row["median_s"] / ours["median_s"] if both else None
        both = row.get("status") == "ok" and peer.get("status") == "ok"  # this one is X times faster than the peer
        row["vs_peer_speedup"] = peer["median_s"] / row["median_s"] if both else None
    return dict(shape=shape.__dict__, search_flops=shape.search_flops, rounds=args.rounds,
                floor_dtype=floor_dtype, large_gemm_gflops=rate / 1e9, load_average=os.getloadavg(),
                other_processes_cpu_share=other_load.share, rows=list(rows.values()))


# --------------------------------------------------------------------------- output

def _check_text(check: dict | None) -> str:
    if not check or not check.get("ok"):
        return "-"
    return f"ok, {100 * check['inexact_fraction']:.1f}% rows inexact"


def _speedup_words(row: dict) -> str:
    """'X.XXx faster than the cdist layer' (or slower, where it is)."""
    ratio, the = row["ours_speedup"], "the " if row["kind"] == "baseline" else ""
    return (f"{ratio:.2f}x faster than {the}{row['provider']}" if ratio >= 1
            else f"{1 / ratio:.2f}x slower than {the}{row['provider']}")


def format_shape(result: dict) -> str:
    """A table of one shape's providers, and the ratios in words."""
    memory = "peak extra MiB" + (" (RSS)" if result.get("device") == "cpu" else "")
    lines = [f"{'provider':<25}{'median ms':>11}{'q1..q3 ms':>19}{'steps/s':>9}{'ours faster':>13}"
             f"{'x floor':>10}{memory:>22}  check"]
    for row in result["rows"]:
        if row.get("status") != "ok":
            lines.append(f"{row['provider']:<25}  {row['status']}: {row['reason']}")
            continue
        spread = f"{row['q1_s'] * 1e3:.1f}..{row['q3_s'] * 1e3:.1f}"
        lines.append(f"{row['provider']:<25}{row['median_s'] * 1e3:>11.2f}{spread:>19}{row['steps_per_s']:>9.1f}"
                     f"{_ratio(row['ours_speedup']):>13}{_ratio(row['time_vs_search_floor']):>10}"
                     f"{_mib(row.get('peak_extra_bytes')):>22}  {_check_text(row.get('check'))}")
    words = [_speedup_words(row) for row in result["rows"] if row["kind"] != "ours" and row.get("ours_speedup")]
    if words:
        lines.append("ours is " + ", ".join(words))
    compat = next((row for row in result["rows"] if row["kind"] == "compat" and row.get("vs_peer_speedup")), None)
    if compat:
        ratio = compat["vs_peer_speedup"]
        lines.append(f"the drop-in {compat['provider']} is " + (f"{ratio:.2f}x faster" if ratio >= 1
                     else f"{1 / ratio:.2f}x slower") + f" than {PEER}")
    return "\n".join(lines)


def format_summary(results: list[dict]) -> str:
    """Median ms per step of every provider at every shape, and ours' speedups."""
    names = [name for name in PROVIDER_NAMES if any(r["provider"] == name for res in results for r in res["rows"])]
    lines = [f"{'shape':<18}" + "".join(f"{name + ' ms':>28}" for name in names)
             + "".join(f"{'vs ' + name:>28}" for name in names if name != OURS)]
    for result in results:
        rows = {r["provider"]: r for r in result["rows"]}
        ok = lambda name: rows.get(name, {}).get("status") == "ok"
        cells = [f"{rows[name]['median_s'] * 1e3:.1f}" if ok(name) else rows.get(name, {}).get("status", "-")
                 for name in names]
        ratios = [_ratio(rows[name].get("ours_speedup")) if ok(name) else "-" for name in names if name != OURS]
        lines.append(f"{result['shape']['name']:<18}" + "".join(f"{c:>28}" for c in cells + ratios))
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line

def add_run_options(parser: argparse.ArgumentParser, provider_names: tuple) -> None:
    """The options bench_layer.py and bench_residual.py share: device, precision, threads, providers,
    the dead-code rule, memory, load, JSON output and the memory probe's (hidden) entry."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=sorted(INPUT_DTYPES), default="float32", help="z's dtype")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST), default="none",
                        help="bf16: each timed call runs under torch.autocast(device, dtype=torch.bfloat16)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--providers", nargs="+", choices=provider_names, default=list(provider_names),
                        metavar="NAME", help=f"only these ({', '.join(provider_names)}; default: all)")
    parser.add_argument("--dead-code-count", type=float, default=DEAD_CODE_COUNT, metavar="COUNT",
                        help="a code is dead (restarted) when its EMA count of vectors per step is below this: the "
                             "peer's threshold_ema_dead_code, ours' dead_threshold = COUNT*K/N (default 2)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--max-other-load", type=float, default=None, metavar="SHARE",
                        help="on a shared machine: measure a shape again (after waiting for an idle machine, up "
                             "to 4 tries) while other processes used more than this share of the CPUs")
    parser.add_argument("--json", help="also write the results to this file (rewritten after every shape)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("PROVIDER", "STATE"), help=argparse.SUPPRESS)


def check_run_options(parser: argparse.ArgumentParser, args) -> None:
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), metavar="NAME",
                        help=f"named shapes (default: all): {', '.join(SHAPES)}")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("N", "K", "D"), help="one custom shape instead")
    parser.add_argument("--cosine", action="store_true", help="with --shape: cosine distance")
    parser.add_argument("--quick", action="store_true",
                        help=f"the three smaller shapes ({', '.join(QUICK_SHAPES)}), 3 rounds unless --rounds")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed samples per provider (default 5; 3 with --quick)")
    add_run_options(parser, PROVIDER_NAMES)
    args = parser.parse_args(argv)
    check_run_options(parser, args)
    if args.cosine and not args.shape:
        parser.error("--cosine goes with --shape")
    if args.shape:
        args.selected = [LayerShape(*args.shape, cosine=args.cosine)]
    else:
        args.selected = [SHAPES[name] for name in (args.shapes or (QUICK_SHAPES if args.quick else SHAPES))]
    args.rounds = args.rounds or (3 if args.quick else 5)
    return args


def measure_shapes(args, run_shape: Callable, format_shape: Callable, title: str, floor: str, call: str,
                   **settings) -> list[dict]:
    """Each selected shape: run_shape(shape, args), again while other processes disturbed it
    (--max-other-load), printed with format_shape and written to --json after every shape with
    the machine (its load average at the start and after the last shape) and the settings."""
    info = machine_info(args.device)
    info["load_average_start"] = os.getloadavg()
    precision = args.dtype + (f", {args.autocast} autocast" if AUTOCAST[args.autocast] else "")
    settings = dict(device=args.device, dtype=args.dtype, autocast=args.autocast, rounds=args.rounds, **settings,
                    beta=BETA, ema_decay=EMA_DECAY, kmeans_iters=KMEANS_ITERS, dead_code_count=args.dead_code_count,
                    memory=("off" if args.no_memory else f"peak RSS growth of one {call}, fresh process"
                            if args.device == "cpu" else "torch.cuda.max_memory_allocated minus allocated before"))
    print(f"{title} on {args.device} ({info.get('gpu') or info['cpu']}, {info['torch_threads']} threads), "
          f"{precision}; median of {args.rounds} interleaved rounds")
    results = []
    for shape in args.selected:
        result = measure_undisturbed(lambda: run_shape(shape, args), lambda r: r["other_processes_cpu_share"],
                                     args.max_other_load)
        result["device"] = args.device
        results.append(result)
        print(f"\n{shape.label()}: search floor {floor} = {shape.search_flops / 1e9:.1f} GFLOP at "
              f"{result['large_gemm_gflops']:.0f} GFLOP/s ({result['floor_dtype']} large GEMM); other processes "
              f"used {result['other_processes_cpu_share']:.0%} of the CPUs while timing; load average "
              f"{result['load_average'][0]:.2f}")
        print(format_shape(result), flush=True)
        if args.json:
            info["load_average_end"] = os.getloadavg()
            write_json(args.json, dict(machine=info, settings=settings, results=results))
    return results


def exit_status(results: list[dict]) -> int:
    """1 (with a message) if one of ours' rows (the drop-in's included) failed, else 0."""
    failed = [row for res in results for row in res["rows"]
              if row["kind"] in ("ours", "compat") and row.get("status") == "failed"]
    for row in failed:
        print(f"FAILED: {row['provider']}{' ' + row['task'] if 'task' in row else ''}: {row['reason']}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe_main(*args.memory_probe, args.selected[0], args)
        return 0
    results = measure_shapes(args, run_shape, format_shape, "one training step of the VQ layer", "2*N*K*D", "step")
    if len(results) > 1:
        print("\n" + format_summary(results))
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
