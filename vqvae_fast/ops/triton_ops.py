"""The Triton kernels as torch custom ops `vqvae_fast::triton_*` (opaque to torch.compile)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import triton_nearest_code as kernels
from . import triton_quantize_bwd as backward
from .registration import register_ops


@torch.library.custom_op("vqvae_fast::triton_nearest_code", mutates_args=())
def triton_nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    return kernels.nearest_code(z, codebook)


@torch.library.custom_op("vqvae_fast::triton_quantize_fwd", mutates_args=())
def triton_quantize_fwd(z: Tensor, codebook: Tensor, beta: float,
                        rotation: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.quantize_fwd(z, codebook, beta)


@torch.library.custom_op("vqvae_fast::triton_quantize_bwd", mutates_args=())
def triton_quantize_bwd(grad_quantized: Tensor, grad_loss: Tensor, z: Tensor, codebook: Tensor, indices: Tensor,
                        beta: float, need_grad_z: bool, need_grad_codebook: bool,
                        rotation: bool = False) -> tuple[Tensor, Tensor]:
    return backward.quantize_bwd(grad_quantized, grad_loss, z, codebook, indices, beta, need_grad_z,
                                 need_grad_codebook, rotation)


register_ops("triton_")
