"""The Triton kernels as torch custom ops `vqvae_fast::triton_*` (opaque to torch.compile); their
schemas are registration.SCHEMAS's."""
from __future__ import annotations

import torch

from . import triton_nearest_code as kernels
from . import triton_codebook_update as codebook_update
from . import triton_quantize_bwd as backward
from . import triton_residual as residual
from .registration import register_ops, schema_arguments


def _op(name: str, mutates_args=()):
    """torch.library.custom_op with the schema written in registration.SCHEMAS (the one statement
    of each op's signature): the functions below take its arguments, in its order, with its
    defaults (the op may call them with the arguments as given; tests/test_op_schemas.py checks)."""
    return torch.library.custom_op(f"vqvae_fast::{name}", mutates_args=mutates_args, schema=schema_arguments(name))


@_op("triton_nearest_code")
def triton_nearest_code(z, codebook):
    return kernels.nearest_code(z, codebook)


@_op("triton_residual_nearest_code")
def triton_residual_nearest_code(z, codebooks, normalize=False):
    return residual.residual_nearest_code(z, codebooks, normalize)


@triton_residual_nearest_code.register_fake
def _(z, codebooks, normalize=False):
    return z.new_empty((z.shape[0], codebooks.shape[0]), dtype=torch.long)


@_op("triton_residual_quantize_fwd")
def triton_residual_quantize_fwd(z, codebooks, stats=0, normalize=False):
    return residual.residual_quantize_fwd(z, codebooks, stats, normalize)


@triton_residual_quantize_fwd.register_fake
def _(z, codebooks, stats=0, normalize=False):
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    s, k, d = codebooks.shape
    return (z.new_empty(z.shape, dtype=acc), z.new_empty((z.shape[0], s), dtype=torch.long),
            z.new_empty(s, dtype=torch.float64), z.new_empty((s, k) if stats else (0,), dtype=torch.float32),
            z.new_empty((s, k, d) if stats == 2 else (0,), dtype=acc))


@_op("triton_stage_losses_bwd")
def triton_stage_losses_bwd(grad, z, codebooks, indices, beta, need_grad_z, need_grad_codebooks, normalize=False):
    return residual.stage_losses_bwd(grad, z, codebooks, indices, beta, need_grad_z, need_grad_codebooks, normalize)


@triton_stage_losses_bwd.register_fake
def _(grad, z, codebooks, indices, beta, need_grad_z, need_grad_codebooks, normalize=False):
    return (z.new_empty(z.shape) if need_grad_z else z.new_empty(0),
            codebooks.new_empty(codebooks.shape) if need_grad_codebooks else codebooks.new_empty(0))


@_op("triton_quantize_fwd")
def triton_quantize_fwd(z, codebook, beta, rotation=False, normalize=False):
    return kernels.quantize_fwd(z, codebook, beta, normalize=normalize)


@_op("triton_quantize_stats_fwd")
def triton_quantize_stats_fwd(z, codebook, beta, rotation, with_sums, normalize=False):
    return kernels.quantize_stats_fwd(z, codebook, beta, with_sums, normalize)


@_op("triton_quantize_bwd")
def triton_quantize_bwd(grad_quantized, grad_loss, z, codebook, indices, beta, need_grad_z, need_grad_codebook,
                        rotation=False, normalize=False):
    return backward.quantize_bwd(grad_quantized, grad_loss, z, codebook, indices, beta, need_grad_z,
                                 need_grad_codebook, rotation, normalize)


register_ops("triton_", with_stats=True, with_normalize=True)


@_op("triton_update_codebook_state", mutates_args=("usage", "ema_count", "ema_sum", "codebook"))
def triton_update_codebook_state(usage, ema_count, ema_sum, codebook, counts, sums, candidates, candidate_rows,
                                 usage_decay, ema_decay, dead_threshold, restart, normalize, laplace_eps):
    """vector_quantizer.update_codebook_state in two Triton launches (an op: opaque to torch.compile)."""
    return codebook_update.update_codebook_state(
        usage, ema_count, ema_sum, codebook, counts, sums, candidates, candidate_rows, usage_decay=usage_decay,
        ema_decay=ema_decay, dead_threshold=dead_threshold, restart=restart, normalize=normalize,
        laplace_eps=laplace_eps)


@triton_update_codebook_state.register_fake
def _(usage, ema_count, ema_sum, codebook, *args):
    return usage.new_empty((), dtype=torch.float32), usage.new_empty(2, dtype=torch.long)
