"""The op schemas, each stated once (SCHEMAS below), with fakes and the autograd formula.

SCHEMAS is the one statement of every `vqvae_fast::` op's signature. The C++ library
(`vqvae_fast._C`, the CPU kernels) defines the un-prefixed ops with these strings
(csrc/ops.cpp, csrc/cpu/nearest_code.cpp for cpu_forward_path); `triton_ops.py` registers the
`triton_` ones by passing them to `torch.library.custom_op`; tests/test_op_schemas.py checks
that every registered schema is the one written here, so they cannot drift.

What the arguments and outputs mean:
- nearest_code: z (N, D), codebook (K, D) -> indices int64 (N,) of the nearest codes (no
  gather, no loss, no gradient).
- quantize_fwd: quantized = codebook[indices] (N, D), indices int64 (N,), loss = (1 + beta) *
  mean((z - quantized)^2), a 0-dim tensor in z's dtype. `rotation` picks the rotation trick's
  gradient to z (Fifty et al. 2024; reference.rotation_gradient has the formula and its
  guards) instead of the straight-through one; the forward ignores it and only hands it to
  the backward. `quantized` comes first in the outputs as in the public API (opcheck also
  needs a float first).
- quantize_bwd: the gradients of (quantized, loss) with respect to (z, codebook); one that is
  not needed (need_grad_* false) comes back as an empty tensor and is not computed.
- quantize_stats_fwd (Triton): quantize_fwd and the per-code counts (K,) and sums of z (K, D)
  (empty unless with_sums) that a VectorQuantizer step needs, from the search's epilogue;
  its gradient is quantize_fwd's.
- `normalize` (the Triton ops' last argument): the cosine quantizer, everything between the
  l2-normalised rows of z and codes, gradients through the normalisation.
- cpu_forward_path (C++, no tensors, so no dispatch): the CPU forward's path ("fused-amx",
  "fused-avx512", "fused-avx512-bf16", "fused-avx512-bf16-rounded", "fused-avx2", "fused-portable" or "gemm") for rows of D elements of dtype (None: float32) and K codes.
- cpu_pack_norms (C++, a test hook): the squared norms ||z_i - centre||^2 that a CPU scan body's
  packing reports (they enter only the float error bound, so no result shows a wrong one).
- triton_residual_nearest_code: the (N, S) codes of residual quantization with codebooks
  (S, K, D), every stage in one kernel (triton_residual.py); no gradient.
- triton_residual_quantize_fwd: the same kernel for the training forward: the sum of the chosen
  codes (N, D) (fp32; fp64 for fp64 z), the indices (N, S) and each stage's summed squared error
  (S,) float64 (residual.residual_quantize turns them into the stage losses); stats 1: the counts
  (S, K) of each stage's codes, 2: and the sums (S, K, D) of their residuals (the module's EMA), else empty.
- triton_stage_losses_bwd: residual.StageLosses' gradients in one launch, from the upstream
  gradient of the stage losses (S,), z, the codebooks (S, K, D) and the indices.
- The three residual ops' `normalize`: cosine; the codebooks given are the unit codes (normalised
  by the caller, residual.unit_codebooks), each residual is normalised inside the kernels.
- triton_update_codebook_state: vector_quantizer.update_codebook_state in two Triton launches
  (usage, EMA, restarts, codebook, perplexity); returns (perplexity, tallies).

The fakes let torch.compile trace through the ops; the autograd formula makes `quantized`
straight-through and differentiates the loss, and asks the backward only for the gradients
autograd needs (none for an EMA codebook).
"""
from __future__ import annotations

import torch


# name -> "name(arguments) -> outputs", as torch prints `torch.ops.vqvae_fast.<name>.default._schema`
# (without the "vqvae_fast::" namespace).
SCHEMAS = {
    # the C++ library (csrc/)
    "nearest_code": "nearest_code(Tensor z, Tensor codebook) -> Tensor",
    "quantize_fwd": "quantize_fwd(Tensor z, Tensor codebook, float beta, bool rotation=False) -> "
                    "(Tensor quantized, Tensor indices, Tensor loss)",
    "quantize_bwd": "quantize_bwd(Tensor grad_quantized, Tensor grad_loss, Tensor z, Tensor codebook, "
                    "Tensor indices, float beta, bool need_grad_z, bool need_grad_codebook, bool rotation=False) -> "
                    "(Tensor grad_z, Tensor grad_codebook)",
    "cpu_forward_path": "cpu_forward_path(int D=256, ScalarType? dtype=None, int K=1024) -> str",
    "cpu_pack_norms": "cpu_pack_norms(Tensor z, Tensor centre, str body) -> Tensor",
    # the Triton kernels (triton_ops.py)
    "triton_nearest_code": "triton_nearest_code(Tensor z, Tensor codebook) -> Tensor",
    "triton_quantize_fwd": "triton_quantize_fwd(Tensor z, Tensor codebook, float beta, bool rotation=False, "
                           "bool normalize=False) -> (Tensor quantized, Tensor indices, Tensor loss)",
    "triton_quantize_stats_fwd": "triton_quantize_stats_fwd(Tensor z, Tensor codebook, float beta, bool rotation, "
                                 "bool with_sums, bool normalize=False) -> (Tensor quantized, Tensor indices, "
                                 "Tensor loss, Tensor counts, Tensor sums)",
    "triton_quantize_bwd": "triton_quantize_bwd(Tensor grad_quantized, Tensor grad_loss, Tensor z, Tensor codebook, "
                           "Tensor indices, float beta, bool need_grad_z, bool need_grad_codebook, "
                           "bool rotation=False, bool normalize=False) -> (Tensor grad_z, Tensor grad_codebook)",
    "triton_residual_nearest_code": "triton_residual_nearest_code(Tensor z, Tensor codebooks, bool normalize=False) -> Tensor",
    "triton_residual_quantize_fwd": "triton_residual_quantize_fwd(Tensor z, Tensor codebooks, int stats=0, bool normalize=False) -> "
                                    "(Tensor total, Tensor indices, Tensor stage_err, Tensor counts, Tensor sums)",
    "triton_stage_losses_bwd": "triton_stage_losses_bwd(Tensor grad, Tensor z, Tensor codebooks, Tensor indices, "
                               "float beta, bool need_grad_z, bool need_grad_codebooks, bool normalize=False) -> "
                               "(Tensor grad_z, Tensor grad_codebooks)",
    "triton_update_codebook_state": "triton_update_codebook_state(Tensor(a0!) usage, Tensor(a1!)? ema_count, "
                                    "Tensor(a2!)? ema_sum, Tensor(a3!)? codebook, Tensor counts, Tensor sums, "
                                    "Tensor candidates, Tensor? candidate_rows, float usage_decay, float? ema_decay, "
                                    "float dead_threshold, bool restart, bool normalize, float laplace_eps) -> "
                                    "(Tensor perplexity, Tensor tallies)",
}


def schema_arguments(name: str) -> str:
    """SCHEMAS[name] without the op's name: "(arguments) -> outputs", as torch.library.custom_op takes it."""
    return SCHEMAS[name].removeprefix(name)


def _fake_nearest(z, codebook):
    return z.new_empty(z.shape[0], dtype=torch.long)


def _fake_fwd(z, codebook, beta, rotation=False, normalize=False):
    n, d = z.shape
    return codebook.new_empty(n, d), z.new_empty(n, dtype=torch.long), z.new_empty(())


def _fake_bwd(grad_quantized, grad_loss, z, codebook, indices, beta, need_grad_z, need_grad_codebook,
              rotation=False, normalize=False):
    return (z.new_empty(z.shape if need_grad_z else (0,)),
            codebook.new_empty(codebook.shape if need_grad_codebook else (0,)))


def _fake_stats_fwd(z, codebook, beta, rotation, with_sums, normalize=False):
    k, d = codebook.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    return (*_fake_fwd(z, codebook, beta), z.new_empty(k, dtype=torch.float32),
            z.new_empty((k, d) if with_sums else (0,), dtype=acc))


def _make_setup_context(with_normalize: bool):
    def setup_context(ctx, inputs, output):
        z, codebook, beta, *rest = inputs  # rest: rotation (, with_sums) (, normalize: the last)
        _, indices, _, *stats = output  # quantize_stats_fwd: and the per-code counts and sums
        ctx.save_for_backward(z, codebook, indices)
        ctx.beta = beta
        ctx.rotation = bool(rest[0]) if rest else False
        ctx.normalize = (bool(rest[-1]),) if with_normalize else ()  # passed on only where the op has it
        ctx.mark_non_differentiable(indices, *stats)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the indices and statistics

    return setup_context


def _make_backward(bwd_op):
    def backward(ctx, grad_quantized, grad_indices, grad_loss, *grad_stats):
        need_grad_z, need_grad_codebook = ctx.needs_input_grad[:2]
        rest = (None,) * (len(ctx.needs_input_grad) - 2)  # beta, rotation, ...: no gradient
        if not (need_grad_z or need_grad_codebook):
            return None, None, *rest
        z, codebook, indices = ctx.saved_tensors
        if grad_quantized is None:
            grad_quantized = torch.zeros_like(z)
        if grad_loss is None:
            grad_loss = z.new_zeros(())
        grad_z, grad_codebook = bwd_op(grad_quantized, grad_loss, z, codebook, indices, ctx.beta,
                                       need_grad_z, need_grad_codebook, ctx.rotation, *ctx.normalize)
        return (grad_z if need_grad_z else None), (grad_codebook if need_grad_codebook else None), *rest

    return backward


def register_ops(prefix: str = "", with_stats: bool = False, with_normalize: bool = False) -> None:
    """Attach fakes and the autograd formula to vqvae_fast::<prefix>{nearest_code, quantize_fwd, quantize_bwd}
    (with_stats: and <prefix>quantize_stats_fwd, which has quantize_fwd's gradient; with_normalize:
    the ops take `normalize` last)."""
    setup_context = _make_setup_context(with_normalize)
    name = f"vqvae_fast::{prefix}"
    torch.library.register_fake(f"{name}nearest_code")(_fake_nearest)
    torch.library.register_fake(f"{name}quantize_fwd")(_fake_fwd)
    torch.library.register_fake(f"{name}quantize_bwd")(_fake_bwd)
    bwd_op = getattr(torch.ops.vqvae_fast, f"{prefix}quantize_bwd")
    torch.library.register_autograd(f"{name}quantize_fwd", _make_backward(bwd_op), setup_context=setup_context)
    if with_stats:
        torch.library.register_fake(f"{name}quantize_stats_fwd")(_fake_stats_fwd)
        torch.library.register_autograd(f"{name}quantize_stats_fwd", _make_backward(bwd_op),
                                        setup_context=setup_context)
