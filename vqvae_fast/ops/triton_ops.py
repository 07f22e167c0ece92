"""The Triton kernels as torch custom ops `vqvae_fast::triton_*` (opaque to torch.compile)."""
from __future__ import annotations

import torch
from torch import Tensor

from . import triton_nearest_code as kernels
from .registration import register_op_pair


@torch.library.custom_op("vqvae_fast::triton_nearest_code_fwd", mutates_args=())
def triton_nearest_code_fwd(z: Tensor, codebook: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    return kernels.nearest_code_fwd(z, codebook, beta)


@torch.library.custom_op("vqvae_fast::triton_quantize_bwd", mutates_args=())
def triton_quantize_bwd(grad_quantized: Tensor, grad_loss: Tensor, z: Tensor, codebook: Tensor,
                        indices: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    return kernels.quantize_bwd(grad_quantized, grad_loss, z, codebook, indices, beta)


register_op_pair("vqvae_fast::triton_nearest_code_fwd", "vqvae_fast::triton_quantize_bwd")
