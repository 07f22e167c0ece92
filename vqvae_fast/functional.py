"""Public functional API and the one place that maps `backend=` to an implementation."""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from . import _extension, reference
from .ops import triton_available, triton_interpreting

BACKENDS = ("auto", "triton", "cpu", "reference")


class InputError(ValueError, TypeError, RuntimeError):
    """Bad input to a quantizer op (shape, dtype or device).

    Subclasses ValueError and TypeError, and RuntimeError (what torch raises for the same
    mistakes), so any of those except clauses catches it.
    """


class QuantizeOutput(NamedTuple):
    quantized: torch.Tensor  # (N, D), codebook[indices] forward, identity gradient to z
    indices: torch.Tensor  # (N,) int64
    loss: torch.Tensor  # () codebook loss + beta * commitment loss


class QuantizeStats(NamedTuple):
    quantized: torch.Tensor  # as QuantizeOutput
    indices: torch.Tensor
    loss: torch.Tensor
    counts: torch.Tensor  # (K,) float32: rows of z per code
    sums: torch.Tensor  # (K, D) sum of each code's rows of z (float32; float64 for float64 z), or (0,)


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_inputs(z: torch.Tensor, codebook: torch.Tensor) -> None:
    """Raise InputError naming the problem unless z (N, D) and codebook (K, D) fit together."""
    for name, t in (("z", z), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided or t.is_mkldnn:
            raise InputError(f"{name} must be a dense (strided) tensor, got layout {t.layout}"
                             f"{' (mkldnn)' if t.is_mkldnn else ''}: use .to_dense()")
        if t.dim() != 2:
            raise InputError(f"{name} must be 2-D ({'N' if name == 'z' else 'K'}, D), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise InputError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if z.shape[1] != codebook.shape[1]:
        raise InputError(f"D mismatch: z is {tuple(z.shape)} but codebook is {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise InputError("codebook is empty (K = 0): there is no code to choose")
    if z.dtype != codebook.dtype:
        raise InputError(f"dtype mismatch: z is {z.dtype} but codebook is {codebook.dtype}")
    if z.device != codebook.device:
        raise InputError(f"device mismatch: z is on {z.device} but codebook is on {codebook.device}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend that runs for tensors on `device`, or a clear error."""
    if backend == "cuda":
        raise InputError("backend='cuda' was removed: the CUDA C++ backend was retired (the Triton backend is "
                         "faster); use backend='triton' (or 'auto'), which runs on CUDA tensors")
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if device.type == "cuda":
            backend = "triton" if triton_available() else "reference"
        elif device.type == "cpu":
            backend = "cpu" if _extension.has_compiled() else "reference"
        else:
            backend = "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not importable")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise InputError(f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                             f"got tensors on {device}")
    elif backend == "cpu":
        if device.type != "cpu":
            raise InputError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        if not _extension.has_compiled():
            raise RuntimeError(f"backend='cpu' is unavailable: {_extension.LOAD_ERROR}")
    return backend


def _op_prefix(backend: str):
    """The op namespace of a compiled backend: names `{prefix}nearest_code`, `{prefix}quantize_fwd`."""
    if backend == "triton":
        from .ops import triton_ops  # noqa: F401  (imported lazily: registers the ops)

        return "triton_"
    return ""  # 'cpu': the ops of the compiled library


def _op(backend: str, name: str):
    return getattr(torch.ops.vqvae_fast, _op_prefix(backend) + name)


DISTANCES = ("euclidean", "cosine")
NORMALIZE_EPS = 1e-12  # floor of the norm in l2_normalize: a zero vector stays zero


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(|x|, 1e-12) along the last dim (torch.nn.functional.normalize): what
    `distance="cosine"` compares, done in torch wherever a kernel does not do it itself."""
    return torch.nn.functional.normalize(x, dim=-1, eps=NORMALIZE_EPS)


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise InputError(f"unknown distance {distance!r}; choose one of {DISTANCES}")


def check_options(beta: float, gradient: str) -> None:
    """Raise InputError (a ValueError) unless beta is a finite number >= 0 and gradient is a known estimator."""
    # Comparisons, not math.isfinite: torch.compile traces them (NaN fails both).
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0.0 <= beta < math.inf:
        raise InputError(f"beta must be a finite number >= 0, got {beta!r}")
    if gradient not in reference.GRADIENTS:
        raise InputError(f"unknown gradient estimator {gradient!r}; choose one of {reference.GRADIENTS}")


def _checked_backend(z, codebook, beta, gradient: str, distance: str, backend: str) -> str:
    """The backend that runs `quantize`-like ops on these arguments, after checking all of them."""
    check_inputs(z, codebook)
    check_options(beta, gradient)
    check_distance(distance)
    return resolve_backend(backend, z.device)


def quantize(z: torch.Tensor, codebook: torch.Tensor, *, beta: float = 0.25, backend: str = "auto",
             gradient: str = "ste", distance: str = "euclidean") -> QuantizeOutput:
    """Nearest-code quantization with a straight-through gradient and the VQ-VAE losses.

    Args:
        z: (N, D) float32/float64/bfloat16/float16 encoder outputs.
        codebook: (K, D), same dtype and device as z.
        beta: weight of the commitment loss.
        backend: "auto", "triton", "cpu" or "reference".
        gradient: how `quantized` passes its gradient to z: "ste" (straight through,
            unchanged) or "rotation" (the rotation trick, Fifty et al. 2024: rotated from the
            code's direction to z's and rescaled by ||e|| / ||z||; see reference.rotation_gradient).
        distance: "euclidean", or "cosine": everything below is computed between the
            l2-normalised rows of z and of the codebook (x / max(|x|, 1e-12), as
            torch.nn.functional.normalize in their dtype): the nearest normalised code, which is
            the code of highest cosine similarity; quantized is that normalised code; the loss
            compares normalised vectors; gradients reach z and the codebook through the
            normalisation. On the triton backend the normalisation happens inside the kernels
            (no normalised copy of z is written); elsewhere it is done in torch first.

    Returns:
        QuantizeOutput(quantized, indices, loss): quantized (N, D) is bitwise codebook[indices]
        and passes its gradient to z as `gradient` says; indices (N,) int64;
        loss () = mean((codebook[indices] - sg[z])**2) + beta * mean((z - sg[codebook[indices]])**2),
        differentiable w.r.t. z and codebook.
    """
    backend = _checked_backend(z, codebook, beta, gradient, distance, backend)
    if backend == "triton":
        return QuantizeOutput(*_op(backend, "quantize_fwd")(z, codebook, float(beta), gradient == "rotation",
                                                            distance == "cosine"))
    if distance == "cosine":
        z, codebook = l2_normalize(z), l2_normalize(codebook)
    if backend == "reference":
        return QuantizeOutput(*reference.quantize(z, codebook, beta, gradient))
    return QuantizeOutput(*_op(backend, "quantize_fwd")(z, codebook, float(beta), gradient == "rotation"))


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Index of the nearest code by squared Euclidean distance.

    Args:
        z: (N, D) float tensor; codebook: (K, D), same dtype and device.
        backend: "auto", "triton", "cpu" or "reference".

    Returns:
        (N,) int64; exact ties go to the lowest index.
    """
    check_inputs(z, codebook)
    backend = resolve_backend(backend, z.device)
    if backend == "reference":
        return reference.nearest_code(z, codebook)
    return _op(backend, "nearest_code")(z, codebook)


def code_counts(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(num_codes,) float32 number of times each code occurs in `indices`, without host syncs."""
    counts = torch.zeros(num_codes, device=indices.device, dtype=torch.float32)
    flat = indices.reshape(-1)
    return counts.index_put_((flat,), torch.ones_like(flat, dtype=torch.float32), accumulate=True)


def quantize_with_code_stats(z: torch.Tensor, codebook: torch.Tensor, *, beta: float = 0.25, backend: str = "auto",
                             gradient: str = "ste", with_sums: bool = False,
                             distance: str = "euclidean") -> QuantizeStats:
    """`quantize`, and the per-code statistics of the batch that codebook updates need.

    Returns QuantizeStats(quantized, indices, loss, counts, sums): the first three as
    `quantize`'s; counts (K,) float32, how many rows of z chose each code; sums (K, D), the sum
    of each code's rows of z (float32, float64 for float64 z; shape (0,) unless `with_sums`;
    distance="cosine": of the normalised rows).
    On the triton backend they come out of the search's epilogue (no second pass over z, no
    extra launch; fixed-order sums under torch.use_deterministic_algorithms), elsewhere they
    are summed after it.
    """
    backend = _checked_backend(z, codebook, beta, gradient, distance, backend)
    if backend == "triton":
        return QuantizeStats(*_op(backend, "quantize_stats_fwd")(z, codebook, float(beta), gradient == "rotation",
                                                                 bool(with_sums), distance == "cosine"))
    if distance == "cosine":
        z, codebook = l2_normalize(z), l2_normalize(codebook)
    quantized, indices, loss = quantize(z, codebook, beta=beta, backend=backend, gradient=gradient)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    counts = code_counts(indices, codebook.shape[0])
    if with_sums:
        sums = torch.zeros(codebook.shape, dtype=acc, device=z.device).index_add_(0, indices, z.detach().to(acc))
    else:
        sums = torch.zeros(0, dtype=acc, device=z.device)
    return QuantizeStats(quantized, indices, loss, counts, sums)
