"""What the benchmarks time: the project's ops and the usual PyTorch ways of doing the same job.

Three tasks, each a function (z, codebook) -> result on the same inputs:

    nearest   index of the nearest code, (N,) int64
    forward   a VQ layer's forward: straight-through output, indices and the VQ-VAE loss
    backward  forward + backward of that layer: gradients for z and for the codebook

Providers, all implementing every task:

    cdist            torch.cdist(z, E).argmin(1), then gather: what most VQ-VAE code does
    addmm            ||e||^2 - 2 z E^T in one addmm, then argmin and gather
    compiled addmm   torch.compile of the addmm version (specialised to the shape)
    flash-kmeans     the assignment kernel of the Triton k-means library `flash-kmeans` (GPU,
                     when importable: `pip install flash-kmeans`), then gather. Its fp32 runs
                     as plain TF32, so it is checked with TF32's tolerance.
    faiss            FAISS' exact flat L2 index (`IndexFlatL2`, k = 1; CPU, when importable:
                     `pip install faiss-cpu`), the standard fast CPU answer, then gather. The index
                     is rebuilt on every call (the codebook changes every training step), it uses
                     as many threads as torch, and works in fp32 (16-bit inputs are converted).
    GEMM floor       the bare z @ E^T of the same dtype: any exhaustive search does at least this
                     product, so its time is the floor for every task (it computes no indices).
                     fp32 on CUDA: full fp32 ("highest"), the precision ours matches
    GEMM floor tf32  fp32 on CUDA only: one TF32 pass, the floor of a TF32 search; ours runs
                     three TF32 passes (3xTF32), so its own floor is about three times this
    vqvae_fast[B]    nearest_code / quantize with backend B, for each backend this machine runs
"""
from __future__ import annotations

from dataclasses import dataclass
import os
from typing import Callable

import torch

import vqvae_fast

TASKS = ("nearest", "forward", "backward")
BETA = 0.25  # commitment weight of the VQ-VAE loss, the same for every provider

CDIST, ADDMM, COMPILED, GEMM = "cdist", "addmm", "compiled addmm", "GEMM floor"
GEMM_TF32, FLASH_KMEANS, FAISS = "GEMM floor tf32", "flash-kmeans", "faiss"


def cdist_indices(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z, codebook).argmin(1)


def addmm_indices(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, and ||z||^2 is the same for every code of a row.
    return torch.addmm((codebook * codebook).sum(1), z, codebook.T, alpha=-2).argmin(1)


def gemm(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return z @ codebook.T


def gemm_tf32(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return z @ codebook.T
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def flash_kmeans_indices():
    """flash-kmeans' assignment (its own autotuned/heuristic configs) as an indices function,
    or None when the package is not importable."""
    try:
        from flash_kmeans.assign_euclid_triton import euclid_assign_triton
    except ImportError:
        return None

    def indices(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        x = z[None]
        x_sq = (x.float() ** 2).sum(-1)  # its API takes ||x||^2 precomputed: part of the call
        return euclid_assign_triton(x, codebook[None], x_sq)[0].long()

    return indices


def faiss_indices():
    """FAISS' IndexFlatL2 nearest-neighbour search (k = 1) as an indices function, or None when
    faiss is not importable."""
    try:
        import faiss
    except ImportError:
        return None
    level = os.environ.get("VQVAE_FAST_BENCH_FAISS_SIMD")  # e.g. AVX2: as on a CPU without AVX-512 (cpu_paths.py)
    if level:
        faiss.SIMDConfig.set_level(getattr(faiss, f"SIMDLevel_{level}"))

    def indices(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(codebook.shape[1])
        index.add(codebook.detach().float().contiguous().numpy())
        _, found = index.search(z.detach().float().contiguous().numpy(), 1)
        return torch.from_numpy(found[:, 0])

    return indices


def lookup_forward(indices_fn: Callable, beta: float = BETA) -> Callable:
    """A VQ layer's forward built on an index search: what vqvae_fast.quantize does in one op."""

    def forward(z, codebook):
        indices = indices_fn(z, codebook)
        chosen = codebook[indices]
        loss = torch.mean((chosen - z.detach()) ** 2) + beta * torch.mean((z - chosen.detach()) ** 2)
        quantized = z + (chosen - z).detach()  # straight-through: forward value chosen, gradient to z
        return quantized, indices, loss

    return forward


def upstream_weights(z: torch.Tensor) -> tuple[float, float]:
    """(weight of sum(quantized), weight of the loss) in the backward of `training_step`.

    The loss is weighted by N*D relative to the straight-through output, so that its gradient
    terms are as large as the 1s the output passes to z and the correctness check sees them
    both. In float16 both weights shrink so that no gradient exceeds its range (65504).
    """
    numel = z.numel()
    scale = min(1.0, 2.0**12 / numel) if z.dtype == torch.float16 else 1.0
    return scale, scale * numel


def training_step(forward: Callable) -> Callable:
    """Forward + backward of a VQ layer; returns (indices, grad of z, grad of codebook)."""

    def step(z, codebook):
        z = z.detach().requires_grad_()
        codebook = codebook.detach().requires_grad_()
        quantized, indices, loss = forward(z, codebook)
        output_weight, loss_weight = upstream_weights(z)
        # Only the gradients matter: the value may overflow in float16.
        (quantized.sum() * output_weight + loss * loss_weight).backward()
        return indices, z.grad, codebook.grad

    return step


@dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "baseline", "peer", "floor" or "ours"
    make: Callable[[str], Callable]  # task -> fn(z, codebook)
    # Bytes of N x K-sized temporaries per element of the N x K matrix it materialises (0: none),
    # so that points whose matrix cannot fit are skipped instead of running out of memory.
    nk_bytes_per_element: Callable[[torch.dtype, str], float] = lambda dtype, task: 0.0
    backend: str | None = None
    only_dtype: torch.dtype | None = None  # runs at points of this dtype only


def _search_task(indices_fn: Callable, compile_it: bool = False) -> Callable[[str], Callable]:
    def make(task: str) -> Callable:
        if task == "nearest":
            fn = indices_fn
        else:
            fn = lookup_forward(indices_fn)
        if compile_it:
            # Specialised to the shape (dynamic=False): the compiler's best case. fullgraph: a
            # graph break would silently time eager code.
            fn = torch.compile(fn, dynamic=False, fullgraph=True)
        return training_step(fn) if task == "backward" else fn

    return make


def _ours(backend: str) -> Callable[[str], Callable]:
    def nearest(z, codebook):
        return vqvae_fast.nearest_code(z, codebook, backend=backend)

    def forward(z, codebook):
        return vqvae_fast.quantize(z, codebook, beta=BETA, backend=backend)

    return lambda task: {"nearest": nearest, "forward": forward, "backward": training_step(forward)}[task]


def _nk_matrices(count_forward: float, count_backward: float):
    """The baselines hold `count` N x K matrices of the input dtype (at least fp32 for the distances)."""

    def bytes_per_element(dtype: torch.dtype, task: str) -> float:
        size = max(torch.finfo(dtype).bits // 8, 4)
        return size * (count_backward if task == "backward" else count_forward)

    return bytes_per_element


def ours_backends(device: str) -> list[str]:
    """The compiled/GPU backends that run for tensors on `device` on this machine."""
    candidates = ("cpu",) if device == "cpu" else ("triton",)  # never the Triton interpreter
    found = []
    for backend in candidates:
        try:
            vqvae_fast.functional.resolve_backend(backend, torch.device(device))
        except (RuntimeError, ValueError):
            continue
        found.append(backend)
    return found


def providers(device: str) -> list[Provider]:
    """Every provider for tensors on `device`, baselines first, ours last."""
    found = [
        Provider(CDIST, "baseline", _search_task(cdist_indices), _nk_matrices(2, 3)),
        Provider(ADDMM, "baseline", _search_task(addmm_indices), _nk_matrices(2, 3)),
        Provider(COMPILED, "baseline", _search_task(addmm_indices, compile_it=True), _nk_matrices(2, 3)),
    ]
    flash = flash_kmeans_indices() if device == "cuda" else None
    if flash is not None:
        found.append(Provider(FLASH_KMEANS, "peer", _search_task(flash)))
    flat_l2 = faiss_indices() if device == "cpu" else None
    if flat_l2 is not None:
        found.append(Provider(FAISS, "peer", _search_task(flat_l2)))
    found.append(Provider(GEMM, "floor", lambda task: gemm, _nk_matrices(1, 1)))
    if device == "cuda":
        found.append(Provider(GEMM_TF32, "floor", lambda task: gemm_tf32, _nk_matrices(1, 1),
                              only_dtype=torch.float32))
    found += [Provider(f"vqvae_fast[{b}]", "ours", _ours(b), backend=b) for b in ours_backends(device)]
    return found


def all_provider_names() -> list[str]:
    """Names of every provider on any machine (for test ids that do not depend on the machine)."""
    return ([CDIST, ADDMM, COMPILED, FLASH_KMEANS, FAISS, GEMM, GEMM_TF32]
            + [f"vqvae_fast[{b}]" for b in ("cpu", "triton")])


def indices_of(task: str, result) -> torch.Tensor | None:
    """The (N,) indices in a task's result (None for the GEMM floor, which computes none)."""
    if isinstance(result, torch.Tensor):
        return result if result.dtype == torch.int64 else None
    return result[0] if task == "backward" else result[1]
