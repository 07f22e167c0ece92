"""Residual quantizers (a stack of S codebooks): vqvae_fast.ResidualVectorQuantizer against its peers.

    python benchmarks/bench_residual.py                                # CPU, every shape, fp32
    python benchmarks/bench_residual.py --threads 2 --rounds 3 --json benchmarks/results/bench_residual_cpu_2t.json
    python benchmarks/bench_residual.py --autocast bf16 --shapes dac encodec-8
    python benchmarks/bench_residual.py --quick                        # two tiny shapes, 1 round (the test's)
    python benchmarks/bench_residual.py --shape 16384 9 1024 8 --cosine
    python benchmarks/bench_residual.py --device cuda --rounds 5

Two tasks per shape, each provider built once (k-means init in the untimed warm-up step):

    train    one training step, as bench_layer.py's: zero the gradients, forward in training mode
             (EMA, usage, dead-code restarts included), backward of loss + (quantized * g).sum()
    encode   indices only: no gradient, no state update (eval mode), (N, S) codes

Providers:

    vqvae_fast                ResidualVectorQuantizer(S, K, D, beta=0.25, ema_decay=0.99, kmeans_init=True
                              (10 Lloyd steps, stage s on the residuals of the stages before it),
                              restart_dead=True, dead_threshold=2*K/N); on triton (Euclidean, D <= 128)
                              the fused kernels (every stage's search in one launch, the EMA
                              statistics in one, the loss gradients in one), elsewhere each stage's op in a
                              Python loop; encode: .encode(z)
    vector-quantize-pytorch   ResidualVQ(dim=D, num_quantizers=S, codebook_size=K, decay=0.99,
                              kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=2,
                              commitment_weight=0.25, rotation_trick=False): the same options
                              (straight-through; its default for dim > 1 is the rotation trick).
                              Optional (`pip install vector-quantize-pytorch`), skipped with that
                              hint when absent; encode: its forward in eval mode under no_grad
    cdist loop                the hand-rolled residual loop: per stage torch.cdist + argmin +
                              gather, codebook + commitment loss, the residual minus the detached
                              code; the sum straight through to z; codebooks learned by gradient
                              (no EMA, init or restarts)
    stage loop                the same loop over our single-stage ops (vqvae_fast.quantize per
                              stage; encode: vqvae_fast.nearest_code): the baseline a fused kernel
                              must beat (issue 20); codebooks learned by gradient

The loops' encode is timed on ours' trained codebooks (copied into theirs after the training
task; without ours they keep their own): a codebook barely moved from its random init is not what
an encoder searches, and the exact search's cost depends on the codebook.

Straight-through: ours and the loops pass the gradient of the sum to z once; the peer once per
stage (its quantized output is the sum of per-stage straight-through outputs). Dead codes: the
peer retires a code whose EMA count per step falls below 2; ours compares usage scaled so that
uniform use is 1, so the same rule is dead_threshold = 2*K/N.

Cosine shapes (dac, quick-b, --cosine) run every provider with cosine distance: ours with
distance="cosine", the peer with use_cosine_sim=True, the loops on the l2-normalised residual
and codes. Each stage adds the unit code nearest to its unit residual and the next residual
subtracts it (the peer's rule; DAC picks codes the same way, but adds the raw codebook row
through a per-stage projection, which no provider here has). The check compares the unit
residual with the unit codes. On triton ours runs cosine on the fused kernels too (stacked
codebooks, D <= 128).

Timing, load recording and memory are bench_layer.py's (harness.py): providers interleaved round
by round, median with quartiles; on CPU the peak RSS growth of one call in a fresh process
started from the timed layer's saved state; on CUDA the allocator's peak minus what was
allocated before. The floor is S * 2*N*K*D flops at the large-GEMM rate measured in the same run
(of bf16 under --autocast bf16). Each provider is checked once before timing (shapes, index
range, finite loss and gradient) and, reported as information, stage by stage in eval mode: the
share of rows whose code is not the exact nearest to the residual the earlier stages left
(float64 distances against that stage's codebook).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import correctness
import vqvae_fast
from bench_layer import (AUTOCAST, BETA, EMA_DECAY, INPUT_DTYPES, KMEANS_ITERS, add_run_options, check_run_options,
                         exit_status, make_layer_inputs, measure_shapes, peer_unavailable, probe_peak_bytes,
                         step_problems)
from harness import (OtherLoad, _mib, _ratio, _short_error, _summary, available_memory_bytes, gemm_rate,
                     run_measuring_peak_cuda, time_interleaved)

OURS, PEER, CDIST_LOOP, STAGE_LOOP = "vqvae_fast", "vector-quantize-pytorch", "cdist loop", "stage loop"
TASKS = ("train", "encode")


@dataclass(frozen=True)
class ResidualShape:
    n: int  # vectors per step
    s: int  # stages
    k: int  # codes per stage
    d: int  # code dimension
    cosine: bool = False  # cosine distance: l2-normalised residuals and codes
    name: str = "custom"
    note: str = ""

    @property
    def search_flops(self) -> int:
        return 2 * self.n * self.k * self.d * self.s  # z @ E_s^T per stage: any exhaustive quantizer does this

    def label(self) -> str:
        extras = (", cosine" if self.cosine else "") + (", " + self.note if self.note else "")
        return f"{self.name} (N={self.n} S={self.s} K={self.k} D={self.d}{extras})"


SHAPES = {shape.name: shape for shape in (
    ResidualShape(16384, 9, 1024, 8, cosine=True, name="dac"),
    ResidualShape(16384, 8, 1024, 128, name="encodec-8"),
    ResidualShape(8192, 8, 2048, 256, name="mimi"),
    ResidualShape(16384, 32, 1024, 128, name="encodec-32"),
)}
QUICK_SHAPES = {shape.name: shape for shape in (
    ResidualShape(256, 3, 32, 16, name="quick-a"),
    ResidualShape(128, 2, 64, 8, cosine=True, name="quick-b"),
)}


# --------------------------------------------------------------------------- the quantizers

class LoopQuantizer(nn.Module):
    """The residual loop as users hand-roll it: per stage the nearest code of the residual
    (torch.cdist + argmin, or our single-stage op), the VQ-VAE loss of the stage, the residual
    minus the detached code; the sum passed straight through to z. Codebooks learned by gradient.
    cosine: the stage compares the l2-normalised residual and codes, and adds the unit code."""

    def __init__(self, stages: int, num_codes: int, dim: int, beta: float, use_ours: bool, cosine: bool):
        super().__init__()
        self.codebooks = nn.Parameter(torch.empty(stages, num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes))
        self.beta, self.use_ours, self.cosine = beta, use_ours, cosine

    def forward(self, z: torch.Tensor):
        books = self.codebooks
        z_in = z.to(books.dtype)
        total = torch.zeros_like(z_in).detach()
        indices, loss = [], 0.0
        for book in books.unbind(0):
            residual = z_in - total
            if self.use_ours:
                chosen, idx, stage_loss = vqvae_fast.quantize(residual, book, beta=self.beta,
                                                              distance="cosine" if self.cosine else "euclidean")
            else:
                if self.cosine:
                    residual, book = F.normalize(residual, dim=1), F.normalize(book, dim=1)
                idx = torch.cdist(residual, book).argmin(1)
                code = book[idx]
                stage_loss = F.mse_loss(code, residual.detach()) + self.beta * F.mse_loss(residual, code.detach())
                chosen = code
            total = total + chosen.detach()
            indices.append(idx)
            loss = loss + stage_loss
        quantized = z_in + (total - z_in).detach()
        return quantized.to(z.dtype), torch.stack(indices, 1), loss

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        books = self.codebooks.detach()
        z_in = z.to(books.dtype)
        total = torch.zeros_like(z_in)
        indices = []
        for book in books.unbind(0):
            residual = z_in - total
            if self.cosine:
                residual, book = F.normalize(residual, dim=1), F.normalize(book, dim=1)
            idx = vqvae_fast.nearest_code(residual, book) if self.use_ours else torch.cdist(residual, book).argmin(1)
            total = total + book[idx]
            indices.append(idx)
        return torch.stack(indices, 1)


@dataclass
class Quantizer:
    """A built quantizer: `call(z) -> (quantized (N, D), indices (N, S), loss)` in training mode,
    `encode(z) -> indices (N, S)`, `codebooks()` the (K, D) codebooks its stages search."""
    module: nn.Module
    call: Callable
    encode: Callable
    codebooks: Callable[[], list]


def build_ours(shape: ResidualShape, device: str, dead_code_count: float) -> Quantizer:
    layer = vqvae_fast.ResidualVectorQuantizer(
        shape.s, shape.k, shape.d, BETA, channels_last=True, ema_decay=EMA_DECAY, kmeans_init=True,
        kmeans_iters=KMEANS_ITERS, restart_dead=True, dead_threshold=dead_code_count * shape.k / shape.n,
        distance="cosine" if shape.cosine else "euclidean").to(device)
    return Quantizer(layer, lambda z: tuple(layer(z))[:3], layer.encode, layer.codebooks)


def build_peer(shape: ResidualShape, device: str, dead_code_count: float) -> Quantizer:
    from vector_quantize_pytorch import ResidualVQ

    layer = ResidualVQ(dim=shape.d, num_quantizers=shape.s, codebook_size=shape.k, decay=EMA_DECAY, kmeans_init=True,
                       kmeans_iters=KMEANS_ITERS, threshold_ema_dead_code=dead_code_count, commitment_weight=BETA,
                       rotation_trick=False, use_cosine_sim=shape.cosine).to(device)

    def call(z):
        quantized, indices, losses = layer(z[None])  # (batch, tokens, dim); losses (S,) or (1, S)
        return quantized[0], indices[0], losses.sum()

    def encode(z):
        with torch.no_grad():
            return layer(z[None])[1][0]

    return Quantizer(layer, call, encode, lambda: list(layer.codebooks.unbind(0)))


def build_loop(use_ours: bool):
    def build(shape: ResidualShape, device: str, dead_code_count: float) -> Quantizer:
        layer = LoopQuantizer(shape.s, shape.k, shape.d, BETA, use_ours, shape.cosine).to(device)
        return Quantizer(layer, layer, layer.encode, lambda: list(layer.codebooks.unbind(0)))
    return build


@dataclass(frozen=True)
class ResidualProvider:
    name: str
    kind: str  # "ours", "peer" or "baseline"
    build: Callable[[ResidualShape, str, float], Quantizer]
    unavailable: Callable[[ResidualShape], str | None] = lambda shape: None
    nk_bytes: float = 0.0  # bytes of N x K temporaries per element at a step's peak (one stage at a time)


PROVIDERS = (
    ResidualProvider(OURS, "ours", build_ours),
    ResidualProvider(PEER, "peer", build_peer, peer_unavailable, nk_bytes=24.0),  # bench_layer's measurement
    ResidualProvider(CDIST_LOOP, "baseline", build_loop(use_ours=False), nk_bytes=4.0),
    ResidualProvider(STAGE_LOOP, "baseline", build_loop(use_ours=True)),
)
PROVIDER_NAMES = tuple(p.name for p in PROVIDERS)


# --------------------------------------------------------------------------- one call

def task_fn(quantizer: Quantizer, task: str, g: torch.Tensor, device: str, autocast: torch.dtype | None) -> Callable:
    """fn(z, _): one training step (returns (quantized, indices, loss)) or one encode (indices)."""
    enabled, dtype = autocast is not None, autocast or torch.bfloat16

    def train(z, _=None):
        z.grad = None
        quantizer.module.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            quantized, indices, loss = quantizer.call(z)
            objective = loss + (quantized * g).sum()
        objective.backward()
        return quantized.detach(), indices, loss.detach()

    def encode(z, _=None):
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            return quantizer.encode(z)

    return train if task == "train" else encode


def set_mode(quantizer: Quantizer, task: str) -> None:
    quantizer.module.train(task == "train")


def stage_check(z: torch.Tensor, books: list, indices: torch.Tensor, cosine: bool) -> dict:
    """Stage by stage: the share of rows whose code is not the exact nearest (float64 distances)
    to the residual the earlier stages' codes left, formed as our quantizer forms it: z minus the
    float32 sum of those codes (a residual formed in float64 differs in the last bits, enough to
    turn near-ties); the worst stage's share and every stage's. Cosine: of the unit residual among
    the unit codes, normalised in float32, the sum of the unit codes subtracted."""
    total = torch.zeros(z.shape, device=z.device)  # the sum of the (unit) codes so far
    shares, worst = [], 0.0
    for s, book in enumerate(books):
        codes, idx = book.detach().float(), indices[:, s].long()
        residual = z.detach().float() - total
        if cosine:
            codes, residual = F.normalize(codes, dim=1), F.normalize(residual, dim=1)
        found = correctness.check_indices(residual.double(), codes, idx)
        shares.append(found.inexact_fraction)
        worst = max(worst, found.worst_excess)
        total = total + codes[idx]
    return dict(inexact_fraction=max(shares), stage_inexact_fractions=shares, worst_excess=worst,
                rows_checked=found.rows)


def check_quantizer(quantizer: Quantizer, train: Callable, encode: Callable, z: torch.Tensor,
                    shape: ResidualShape) -> dict:
    """One untimed training step's sanity, and the encode's exactness stage by stage (eval mode)."""
    quantized, indices, loss = train(z)
    problems = step_problems(quantized, indices, loss, z, shape.n, shape.d, shape.k, (shape.n, shape.s))
    found = dict(ok=not problems, problems=problems, loss=float(loss) if loss.numel() == 1 else None)
    if problems:
        return found
    quantizer.module.eval()
    try:
        codes = encode(z)
        if tuple(codes.shape) != (shape.n, shape.s):
            found.update(ok=False, problems=[f"encode gave shape {tuple(codes.shape)}, expected {(shape.n, shape.s)}"])
            return found
        found.update(stage_check(z, quantizer.codebooks(), codes, shape.cosine))
    finally:
        quantizer.module.train()
    return found


@torch.no_grad()
def share_trained_codebooks(quantizers: dict) -> None:
    """The loops' encode searches ours' trained codebooks (theirs are learned by gradient, barely
    moved from their init), so that both encodes do the same search: the comparison of fusion."""
    if OURS not in quantizers:
        return
    books = torch.stack([book.detach() for book in quantizers[OURS].codebooks()])
    for name in (CDIST_LOOP, STAGE_LOOP):
        if name in quantizers:
            quantizers[name].module.codebooks.copy_(books)


def build_quantizer(provider: ResidualProvider, shape: ResidualShape, device: str, dead_code_count: float):
    torch.manual_seed(0)  # the same k-means seeds and restart draws on every run
    quantizer = provider.build(shape, device, dead_code_count)
    quantizer.module.train()
    return quantizer


# --------------------------------------------------------------------------- memory

def peak_extra_bytes_cpu(name: str, task: str, quantizer: Quantizer, shape: ResidualShape, args,
                         workdir: str) -> int | None:
    """Peak RSS growth of one call of `task` in a fresh process, from `quantizer`'s state (initialised)."""
    options = ["--shape", str(shape.n), str(shape.s), str(shape.k), str(shape.d), "--tasks", task]
    options += ["--cosine"] if shape.cosine else []
    return probe_peak_bytes(__file__, name, quantizer.module, options, args, workdir)


def memory_probe_main(name: str, state: str, shape: ResidualShape, args) -> None:
    """In the probe process: the quantizer in the saved state; one call measured after one warm-up (prints JSON)."""
    from memory_probe import peak_extra_bytes

    provider = next(p for p in PROVIDERS if p.name == name)
    z, g = make_layer_inputs(shape, "cpu", INPUT_DTYPES[args.dtype])
    quantizer = build_quantizer(provider, shape, "cpu", args.dead_code_count)
    quantizer.module.load_state_dict(torch.load(state))
    task = args.tasks[0]
    set_mode(quantizer, task)
    fn = task_fn(quantizer, task, g, "cpu", AUTOCAST[args.autocast])
    print(json.dumps({name: peak_extra_bytes(fn, z, None)}))


# --------------------------------------------------------------------------- one shape

def run_shape(shape: ResidualShape, args) -> dict:
    """Build and check every selected provider at one shape; time each task (interleaved); memory."""
    device, dtype, autocast = args.device, INPUT_DTYPES[args.dtype], AUTOCAST[args.autocast]
    z, g = make_layer_inputs(shape, device, dtype)
    room = available_memory_bytes(device)
    rows, quantizers = {}, {}
    for provider in PROVIDERS:
        if provider.name not in args.providers:
            continue
        needs = provider.nk_bytes * shape.n * shape.k
        status, reason, check = "skipped", provider.unavailable(shape), None
        if reason is None and needs > 0.7 * room:
            reason = f"its N x K matrices need ~{needs / 2**30:.1f} GiB, {room / 2**30:.1f} GiB available"
        if reason is None:
            status = "failed"
            try:
                quantizer = build_quantizer(provider, shape, device, args.dead_code_count)
                train, encode = (task_fn(quantizer, task, g, device, autocast) for task in TASKS)
                train(z)  # k-means init happens here, untimed
                check = check_quantizer(quantizer, train, encode, z, shape)
                if check["ok"]:
                    quantizers[provider.name] = quantizer
                else:
                    reason = "; ".join(check["problems"])
            except Exception as err:  # out of memory, an option it does not take: reported, not fatal
                reason = _short_error(err)
        for task in args.tasks:
            row = rows[task, provider.name] = dict(provider=provider.name, kind=provider.kind, task=task)
            if reason is not None:
                row.update(status=status, reason=reason)
            if check is not None:
                row["check"] = check
    floor_dtype = "bfloat16" if autocast is not None else args.dtype
    fns = {}
    with OtherLoad() as other_load:
        rate = gemm_rate(device, floor_dtype)
        for task in args.tasks:
            for quantizer in quantizers.values():
                set_mode(quantizer, task)
            if task == "encode":
                share_trained_codebooks(quantizers)
            fns[task] = {name: task_fn(q, task, g, device, autocast) for name, q in quantizers.items()}
            times, errors = time_interleaved(fns[task], z, None, device, args.rounds)
            for name, error in errors.items():
                rows[task, name].update(status="failed", reason=error)
            for name, samples in times.items():
                row = rows[task, name]
                row.update(status="ok", **_summary(samples))
                row["calls_per_s"] = 1.0 / row["median_s"]
                row["time_vs_search_floor"] = row["median_s"] / (shape.search_flops / rate)
                if not args.no_memory and device == "cuda":
                    row["peak_extra_bytes"] = run_measuring_peak_cuda(fns[task][name], z, None)[1]
    if not args.no_memory and device == "cpu":
        del z, g, fns  # the probe process makes its own: do not hold two copies
        with tempfile.TemporaryDirectory() as workdir:
            for (task, name), row in rows.items():
                if row.get("status") == "ok":
                    row["peak_extra_bytes"] = peak_extra_bytes_cpu(name, task, quantizers[name], shape, args, workdir)
    for (task, _), row in rows.items():  # ours is X times faster than this one (>1: ours faster)
        ours = rows.get((task, OURS), {})
        both = row.get("status") == "ok" and ours.get("status") == "ok"
        row["ours_speedup"] = row["median_s"] / ours["median_s"] if both else None
    return dict(shape=shape.__dict__, search_flops=shape.search_flops, rounds=args.rounds, tasks=list(args.tasks),
                floor_dtype=floor_dtype, large_gemm_gflops=rate / 1e9, load_average=os.getloadavg(),
                other_processes_cpu_share=other_load.share, rows=list(rows.values()))


# --------------------------------------------------------------------------- output

def _check_text(check: dict | None) -> str:
    if not check or not check.get("ok"):
        return "-"
    return f"ok, {100 * check['inexact_fraction']:.1f}% rows inexact (worst stage)"


def format_shape(result: dict) -> str:
    memory = "peak extra MiB" + (" (RSS)" if result.get("device") == "cpu" else "")
    lines = [f"{'task':<7}{'provider':<25}{'median ms':>11}{'q1..q3 ms':>21}{'ours faster':>13}{'x floor':>10}"
             f"{memory:>22}  check"]
    for row in result["rows"]:
        if row.get("status") != "ok":
            lines.append(f"{row['task']:<7}{row['provider']:<25}  {row.get('status')}: {row.get('reason')}")
            continue
        spread = f"{row['q1_s'] * 1e3:.1f}..{row['q3_s'] * 1e3:.1f}"
        lines.append(f"{row['task']:<7}{row['provider']:<25}{row['median_s'] * 1e3:>11.2f}{spread:>21}"
                     f"{_ratio(row['ours_speedup']):>13}{_ratio(row['time_vs_search_floor']):>10}"
                     f"{_mib(row.get('peak_extra_bytes')):>22}  {_check_text(row.get('check'))}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), metavar="NAME",
                        help=f"named shapes (default: all, in this order): {', '.join(SHAPES)}")
    parser.add_argument("--shape", type=int, nargs=4, metavar=("N", "S", "K", "D"), help="one custom shape instead")
    parser.add_argument("--cosine", action="store_true", help="with --shape: cosine distance")
    parser.add_argument("--quick", action="store_true",
                        help="two tiny shapes (256x3x32x16; 128x2x64x8, cosine), 1 round unless --rounds")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="train, encode (default both)")
    parser.add_argument("--rounds", type=int, default=None, help="timed samples per provider (default 3; 1 with --quick)")
    add_run_options(parser, PROVIDER_NAMES)
    args = parser.parse_args(argv)
    check_run_options(parser, args)
    if args.cosine and not args.shape:
        parser.error("--cosine goes with --shape")
    if args.shape:
        args.selected = [ResidualShape(*args.shape, cosine=args.cosine)]
    elif args.quick and not args.shapes:
        args.selected = list(QUICK_SHAPES.values())
    else:
        args.selected = [SHAPES[name] for name in (args.shapes or SHAPES)]
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.tasks = [task for task in TASKS if task in args.tasks]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe_main(*args.memory_probe, args.selected[0], args)
        return 0
    results = measure_shapes(args, run_shape, format_shape, f"residual quantizers ({', '.join(args.tasks)})",
                             "S*2*N*K*D", "call", tasks=args.tasks)
    return exit_status(results)

if __name__ == "__main__":
    sys.exit(main())
