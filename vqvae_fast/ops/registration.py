"""One pair of op schemas for every compiled backend, with its fake and autograd.

    <prefix>nearest_code_fwd(Tensor z, Tensor codebook, float beta)
        -> (Tensor quantized, Tensor indices, Tensor loss)
    <prefix>quantize_bwd(Tensor grad_quantized, Tensor grad_loss, Tensor z,
                         Tensor codebook, Tensor indices, float beta)
        -> (Tensor grad_z, Tensor grad_codebook)

The C++ library (`vqvae_fast._C`, CPU and CUDA kernels) defines the un-prefixed pair;
`triton_ops.py` defines the `triton_` pair. The fakes let torch.compile trace through
them; the autograd formula makes `quantized` straight-through and differentiates the loss.
`quantized` comes first in the outputs as in the public API (opcheck also needs a float first).
"""
from __future__ import annotations

import torch


def _fake_fwd(z, codebook, beta):
    n, d = z.shape
    return codebook.new_empty(n, d), z.new_empty(n, dtype=torch.long), z.new_empty(())


def _fake_bwd(grad_quantized, grad_loss, z, codebook, indices, beta):
    return z.new_empty(z.shape), codebook.new_empty(codebook.shape)


def _setup_context(ctx, inputs, output):
    z, codebook, beta = inputs
    _, indices, _ = output
    ctx.save_for_backward(z, codebook, indices)
    ctx.beta = beta
    ctx.mark_non_differentiable(indices)


def _make_backward(bwd_op):
    def backward(ctx, grad_quantized, grad_indices, grad_loss):
        z, codebook, indices = ctx.saved_tensors
        if grad_quantized is None:
            grad_quantized = torch.zeros_like(z)
        if grad_loss is None:
            grad_loss = z.new_zeros(())
        grad_z, grad_codebook = bwd_op(grad_quantized, grad_loss, z, codebook, indices, ctx.beta)
        return grad_z, grad_codebook, None

    return backward


def register_op_pair(fwd_name: str, bwd_name: str) -> None:
    """Attach fake implementations and the autograd formula to an op pair."""
    torch.library.register_fake(fwd_name)(_fake_fwd)
    torch.library.register_fake(bwd_name)(_fake_bwd)
    bwd_op = getattr(torch.ops.vqvae_fast, bwd_name.split("::")[1])
    torch.library.register_autograd(fwd_name, _make_backward(bwd_op), setup_context=_setup_context)
