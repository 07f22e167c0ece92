"""The Triton kernels as torch custom ops `vqvae_fast::triton_*` (opaque to torch.compile)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_nearest_code as kernels
from . import triton_codebook_update as codebook_update
from . import triton_quantize_bwd as backward
from .registration import register_ops


@torch.library.custom_op("vqvae_fast::triton_nearest_code", mutates_args=())
def triton_nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    return kernels.nearest_code(z, codebook)


@torch.library.custom_op("vqvae_fast::triton_quantize_fwd", mutates_args=())
def triton_quantize_fwd(z: Tensor, codebook: Tensor, beta: float, rotation: bool = False,
                        normalize: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.quantize_fwd(z, codebook, beta, normalize=normalize)


@torch.library.custom_op("vqvae_fast::triton_quantize_stats_fwd", mutates_args=())
def triton_quantize_stats_fwd(z: Tensor, codebook: Tensor, beta: float, rotation: bool, with_sums: bool,
                              normalize: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return kernels.quantize_stats_fwd(z, codebook, beta, with_sums, normalize)


@torch.library.custom_op("vqvae_fast::triton_quantize_bwd", mutates_args=())
def triton_quantize_bwd(grad_quantized: Tensor, grad_loss: Tensor, z: Tensor, codebook: Tensor, indices: Tensor,
                        beta: float, need_grad_z: bool, need_grad_codebook: bool,
                        rotation: bool = False, normalize: bool = False) -> tuple[Tensor, Tensor]:
    return backward.quantize_bwd(grad_quantized, grad_loss, z, codebook, indices, beta, need_grad_z,
                                 need_grad_codebook, rotation, normalize)


register_ops("triton_", with_stats=True, with_normalize=True)


@torch.library.custom_op("vqvae_fast::triton_update_codebook_state",
                         mutates_args=("usage", "ema_count", "ema_sum", "codebook"))
def triton_update_codebook_state(usage: Tensor, ema_count: Optional[Tensor], ema_sum: Optional[Tensor],
                                 codebook: Optional[Tensor], counts: Tensor, sums: Tensor, candidates: Tensor,
                                 candidate_rows: Optional[Tensor], usage_decay: float, ema_decay: Optional[float],
                                 dead_threshold: float, restart: bool, normalize: bool,
                                 laplace_eps: float) -> tuple[Tensor, Tensor]:
    """vector_quantizer.update_codebook_state in two Triton launches (an op: opaque to torch.compile)."""
    return codebook_update.update_codebook_state(
        usage, ema_count, ema_sum, codebook, counts, sums, candidates, candidate_rows, usage_decay=usage_decay,
        ema_decay=ema_decay, dead_threshold=dead_threshold, restart=restart, normalize=normalize,
        laplace_eps=laplace_eps)


@triton_update_codebook_state.register_fake
def _(usage, ema_count, ema_sum, codebook, *args):
    return usage.new_empty((), dtype=torch.float32), usage.new_empty(2, dtype=torch.long)
