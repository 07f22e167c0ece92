"""Residual quantization: a stack of codebooks, each quantizing what the stages before it left.

    r_0 = z,  e_s = nearest code of r_s in codebook s,  r_{s+1} = r_s - e_s

`quantized` is the sum of the stages' codes, passed straight through to z (the gradient of the
sum reaches z once, as EnCodec's implementation does; vector-quantize-pytorch's ResidualVQ
passes it once per stage); stage s's loss is mean((e_s - sg[r_s])^2) + beta * mean((r_s -
sg[e_s])^2), with r_s = z - sg[e_0 + ... + e_{s-1}], so every stage's commitment term reaches z
and its codebook term reaches codebook s.

distance="cosine" (the l2-normalised codes of DAC and of vector-quantize-pytorch's
ResidualVQ(use_cosine_sim=True)): with unit(x) = x / max(|x|, 1e-12) (a zero residual stays zero,
as in the single-stage op), e_s = unit(c) for the code c of highest cosine similarity with r_s
(the nearest unit code to unit(r_s)), r_{s+1} = r_s - e_s, `quantized` is the sum of the unit
codes, and stage s's loss is the single-stage cosine loss, between unit vectors:
mean((e_s - sg[unit(r_s)])^2) + beta * mean((unit(r_s) - sg[e_s])^2).
This is vector-quantize-pytorch's ResidualVQ with use_cosine_sim=True (each stage outputs the
unit code, the residual subtracts it, the commitment loss compares unit vectors; it normalises
with eps 1e-6, so rows of norm below 1e-6 differ; its gradient: each stage's output passes it
to that stage's residual through the normalisation, ours passes the sum's to z once, unchanged,
which the sum of unit codes approximates). DAC picks the code the same way but adds the
raw codebook row, through a per-stage projection back to the input's width, and its losses
compare raw vectors: the same as ours only for unit-norm rows and identity projections.

Each stage is the single-stage op of the chosen backend (`quantize`, `nearest_code`; with cosine
`quantize(..., distance="cosine")` in encoding too, so codes and unit codes are the forward's),
so every stage's argmin obeys that backend's precision table; the residual is formed in torch
between stages. Euclidean quantization on triton with stacked (S, K, D) codebooks and D <= 128 is
fused (ops/triton_residual.py): every stage's search in one kernel, the residual in registers,
the same codes as the loop. Encoding is two launches whatever S; the training forward is the
same two launches (the kernel also writes the sum of the codes and each row's squared error per
stage), the stage losses' backward one (StackedStageLosses). Cosine too: the codebooks are
normalised once in torch (unit_codebooks, as the Triton kernels normalise a row), each residual
inside the kernels (one launch fewer: unit vectors need no scale).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from . import reference
from .functional import (NORMALIZE_EPS, InputError, check_distance, check_inputs, check_options, l2_normalize,
                         nearest_code, quantize, resolve_backend)


class ResidualQuantizeOutput(NamedTuple):
    quantized: torch.Tensor  # (N, D) sum of the stages' codes; straight-through (or rotated) gradient to z
    indices: torch.Tensor  # (N, S) int64, stage by stage
    loss: torch.Tensor  # () the sum of the stage losses
    stage_losses: torch.Tensor  # (S,) each stage's codebook loss + beta * commitment loss


Codebooks = torch.Tensor | Sequence[torch.Tensor]


def as_codebooks(z: torch.Tensor, codebooks: Codebooks, stages: int | None = None) -> list[torch.Tensor]:
    """The first `stages` codebooks (all when None) as a list of (K_s, D) tensors, each checked
    against z; a (S, K, D) tensor gives views of it (gradients reach the stacked tensor)."""
    if isinstance(codebooks, torch.Tensor):
        if codebooks.dim() != 3:
            raise InputError(f"codebooks must be (S, K, D) or a list of (K, D) tensors, got shape "
                             f"{tuple(codebooks.shape)}")
        books = list(codebooks.unbind(0))
    elif isinstance(codebooks, (list, tuple)) and all(isinstance(c, torch.Tensor) for c in codebooks):
        books = list(codebooks)
    else:
        raise InputError(f"codebooks must be a (S, K, D) tensor or a list of (K, D) tensors, got "
                         f"{type(codebooks).__name__}")
    if not books:
        raise InputError("codebooks is empty (S = 0): there is no stage to quantize with")
    if stages is not None:
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= len(books):
            raise InputError(f"stages must be an int in [1, {len(books)}], got {stages!r}")
        books = books[:stages]
    for s, book in enumerate(books):
        try:
            check_inputs(z, book)
        except InputError as error:
            raise InputError(f"stage {s}: {error}") from None
    return books


def stage_residual(z: torch.Tensor, total: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """r_s = z - sg[e_0 + ... + e_{s-1}] as every residual path forms it (forward, backward,
    encode, the module): from the sum `total` of the earlier codes kept in at least fp32, rounded
    once to z's dtype. `out`: written there (no autograd; z's dtype must be total's), so that a
    stack of stages reuses one N x D buffer instead of paying a new tensor's page faults."""
    if out is not None:
        return torch.sub(z, total, out=out)
    return (z.to(total.dtype) - total).to(z.dtype)


def _stages(z: torch.Tensor, books: list[torch.Tensor], quantize_stage):
    """Runs quantize_stage(residual, codebook) -> (chosen codes, indices, loss or None) stage by
    stage; returns (sum of the chosen codes in z's dtype, [indices], [losses]). The sum is kept in
    at least fp32 and each residual is formed from it (16-bit inputs: one rounding each);
    without autograd in one buffer for every stage."""
    total = z.new_zeros(z.shape, dtype=torch.promote_types(z.dtype, torch.float32))
    reuse = not torch.is_grad_enabled() and z.dtype == total.dtype
    buffer = torch.empty_like(z) if reuse else None
    indices, losses = [], []
    for book in books:
        residual = stage_residual(z, total, buffer)
        chosen, idx, loss = quantize_stage(residual, book)
        total.add_(chosen.detach())
        indices.append(idx)
        losses.append(loss)
    return total.to(z.dtype), indices, losses


class StageLosses(torch.autograd.Function):
    """The stage losses mean((e_s - sg[r_s])^2) + beta * mean((r_s - sg[e_s])^2) (Euclidean), their
    values as the searches computed them, with gradients formed from z, the codebooks searched and
    the indices alone: the backward forms the residuals again, stage by stage, so autograd keeps
    O(N*D + S*K*D) for the whole stack, not every stage's residual (S*N*D).

    apply(z (N, D), beta, indices (N, S), losses (S,), total_dtype, *books): the residuals are
    r_s = (z - t_s).to(z.dtype) with t_s the sum of the earlier stages' codes kept in total_dtype,
    exactly as the forward formed them. Gradients: 2 beta (r_s - e_s) / (N D) to z from every
    stage, 2 (e_s - r_s) / (N D) to the rows of book s its codes chose; a stage whose loss has no
    gradient adds nothing (not 0 * NaN through a code with a NaN entry).
    """

    @staticmethod
    def forward(ctx, z, beta, indices, losses, total_dtype, *books):
        ctx.beta, ctx.total_dtype = beta, total_dtype
        ctx.save_for_backward(z, indices, *books)
        return losses.clone()

    @staticmethod
    def backward(ctx, grad):
        z, indices, *books = ctx.saved_tensors
        grad_z, grad_books = stage_losses_grads(grad, z, indices, books, ctx.beta, ctx.total_dtype,
                                                ctx.needs_input_grad[0], ctx.needs_input_grad[5:])
        return grad_z, None, None, None, None, *grad_books


def stage_losses_grads(grad, z, indices, books, beta, total_dtype, need_z, need_books):
    """StageLosses' gradients, stage by stage in torch: (grad_z or None, [grad of each book or None])."""
    count = max(z.numel(), 1)
    total = z.new_zeros(z.shape, dtype=total_dtype)
    grad_z = torch.zeros_like(z, dtype=torch.promote_types(z.dtype, torch.float32))
    # One buffer each for the residual, the chosen codes and their difference, reused stage by
    # stage: a new N x D tensor per operation cost its page faults (most of this backward's time).
    residual = torch.empty_like(z) if z.dtype == total.dtype else None
    chosen, diff = torch.empty_like(z, dtype=books[0].dtype), torch.empty_like(z, dtype=books[0].dtype)
    grad_books = []
    for s, book in enumerate(books):
        idx = indices[:, s]
        torch.index_select(book, 0, idx, out=chosen)
        torch.sub(stage_residual(z, total, residual).to(book.dtype), chosen, out=diff)  # r_s - e_s
        weight = grad[s] * (2.0 / count)
        diff.masked_fill_(weight == 0, 0.0)  # no gradient: nothing, not 0 * NaN
        grad_z.addcmul_(diff, beta * weight)
        if need_books[s]:
            grad_books.append(torch.zeros_like(book).index_put_((idx,), diff.mul_(-weight), accumulate=True))
        else:
            grad_books.append(None)
        total.add_(chosen)
    return (grad_z.to(z.dtype) if need_z else None), grad_books


class StackedStageLosses(torch.autograd.Function):
    """StageLosses for codebooks stacked as one (S, K, D) tensor on triton, the backward one launch
    (ops/triton_residual.stage_losses_bwd). Under torch.use_deterministic_algorithms a codebook
    gradient is formed stage by stage in torch instead (the launch adds it with atomics; cosine
    never gets here in that mode: residual_quantize takes the stage loop).

    apply(z (N, D), beta, indices (N, S), losses (S,), codebooks (S, K, D), normalize): normalize
    (cosine): the codebooks are the unit codes, and each stage's loss compares them with the unit
    residual (its gradient to z through the residual's normalisation)."""

    @staticmethod
    def forward(ctx, z, beta, indices, losses, codebooks, normalize=False):
        ctx.beta, ctx.normalize = beta, normalize
        ctx.save_for_backward(z, indices, codebooks)
        return losses.clone()

    @staticmethod
    def backward(ctx, grad):
        z, indices, codebooks = ctx.saved_tensors
        need_z, need_books = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        if need_books and torch.are_deterministic_algorithms_enabled() and not ctx.normalize:
            total_dtype = torch.promote_types(z.dtype, torch.float32)
            grad_z, grad_books = stage_losses_grads(grad, z, indices, list(codebooks.unbind(0)), ctx.beta,
                                                    total_dtype, need_z, [True] * codebooks.shape[0])
            return grad_z, None, None, None, torch.stack(grad_books), None
        grad_z, grad_books = torch.ops.vqvae_fast.triton_stage_losses_bwd(grad, z, codebooks, indices, ctx.beta,
                                                                          need_z, need_books, ctx.normalize)
        return (grad_z if need_z else None), None, None, None, (grad_books if need_books else None), None


def unit_codebooks(codebooks: torch.Tensor) -> torch.Tensor:
    """The unit codes of (S, K, D) codebooks, x * (1 / max(|x|, 1e-12)) in float64 rounded once
    to their dtype (16-bit via fp32), as the Triton cosine kernels normalise a row (unit_rows), so
    the fused kernels search and add the codes the single-stage op would; differentiable."""
    x = codebooks.double()
    y = x * (1.0 / torch.sqrt((x * x).sum(-1, keepdim=True)).clamp_min(NORMALIZE_EPS))
    return (y.float() if codebooks.dtype in (torch.float16, torch.bfloat16) else y).to(codebooks.dtype)


def fused_stages(z: torch.Tensor, stacked: torch.Tensor, beta: float, loss_dtype: torch.dtype, stats: int = 0,
                 cosine: bool = False):
    """Every stage on the fused Triton kernels (ops/triton_residual.py): (sum of the codes (N, D)
    in at least fp32, indices (N, S), stage losses (S,) in loss_dtype with their gradients
    (StackedStageLosses), counts, sums: the EMA statistics `stats` asks for, see
    triton_residual.residual_quantize_fwd; the codes searched and summed, detached). cosine: the
    unit codes (unit_codebooks, whose gradient reaches `stacked` through autograd) against each
    normalised residual."""
    books = unit_codebooks(stacked) if cosine else stacked
    total, indices, stage_err, counts, sums = torch.ops.vqvae_fast.triton_residual_quantize_fwd(
        z.detach(), books.detach(), stats, cosine)
    losses = (stage_err * ((1.0 + beta) / z.numel())).to(loss_dtype)
    losses = StackedStageLosses.apply(z, beta, indices, losses, books, cosine)
    return total, indices, losses, counts, sums, books.detach()


def fused_triton_codebooks(z: torch.Tensor, codebooks: Codebooks, stages: int, backend: str):
    """The (stages, K, D) codebooks the fused Triton kernel takes (a view of the stacked tensor), or
    None: another backend, a list of codebooks, rows too wide, N = 0 (the per-stage loop)."""
    if backend != "triton" or not isinstance(codebooks, torch.Tensor):
        return None
    from .ops import triton_residual

    stacked = codebooks[:stages]
    if not triton_residual.supports(z, stacked):
        return None
    from .ops import triton_ops  # noqa: F401  (registers the ops)

    return stacked


def residual_quantize(z: torch.Tensor, codebooks: Codebooks, *, beta: float = 0.25, backend: str = "auto",
                      gradient: str = "ste", stages: int | None = None,
                      distance: str = "euclidean") -> ResidualQuantizeOutput:
    """Residual quantization of z (N, D) with codebooks (S, K, D), or a list of (K_s, D).

    Args:
        beta: weight of each stage's commitment loss.
        backend: as `quantize` ("auto", "triton", "cpu", "reference").
        gradient: "ste", or "rotation" (the rotation trick from z to the sum of the codes).
        stages: use only the first `stages` codebooks (bitrate scalability); all by default.
        distance: "euclidean", or "cosine": every stage adds the l2-normalised code of highest
            cosine similarity with its residual (see the module docstring).

    Returns ResidualQuantizeOutput(quantized (N, D), indices (N, S), loss (), stage_losses (S,)):
    see the module docstring for the formulas.
    """
    check_options(beta, gradient)
    check_distance(distance)
    books = as_codebooks(z, codebooks, stages)
    backend = resolve_backend(backend, z.device)
    cosine = distance == "cosine"
    straight = reference._Rotation if gradient == "rotation" else reference._StraightThrough
    # Cosine under deterministic algorithms: the stage loop (the fused backward's codebook
    # gradient is added with atomics, and only the Euclidean one has a torch form here).
    fused = not (cosine and torch.are_deterministic_algorithms_enabled())
    stacked = fused_triton_codebooks(z, codebooks, len(books), backend) if fused else None
    if stacked is not None:  # every stage in one kernel: the forward in two launches, the backward in one
        total, indices, stage_losses, *_ = fused_stages(z, stacked, beta, z.dtype, cosine=cosine)
        return ResidualQuantizeOutput(straight.apply(z, total.to(z.dtype)), indices, stage_losses.sum(), stage_losses)
    with torch.set_grad_enabled(cosine and torch.is_grad_enabled()):  # Euclidean: StageLosses forms the gradients
        total, indices, losses = _stages(
            z, books, lambda r, book: quantize(r, book, beta=beta, backend=backend, distance=distance))
    quantized = straight.apply(z, total)  # bit for bit the sum; its gradient goes to z
    stage_losses = torch.stack(losses)
    if not cosine:
        total_dtype = torch.promote_types(z.dtype, torch.float32)  # as _stages keeps the sum
        stage_losses = StageLosses.apply(z, beta, torch.stack(indices, dim=1), stage_losses, total_dtype, *books)
    return ResidualQuantizeOutput(quantized, torch.stack(indices, dim=1), stage_losses.sum(), stage_losses)


def residual_nearest_code(z: torch.Tensor, codebooks: Codebooks, *, backend: str = "auto",
                          stages: int | None = None, distance: str = "euclidean") -> torch.Tensor:
    """(N, S) int64 codes of z, stage by stage, as `residual_quantize` finds them (encoding only:
    no gradient)."""
    check_distance(distance)
    books = as_codebooks(z, codebooks, stages)
    backend = resolve_backend(backend, z.device)
    stacked = fused_triton_codebooks(z, codebooks, len(books), backend)
    if stacked is not None:
        cosine = distance == "cosine"
        stacked = unit_codebooks(stacked.detach()) if cosine else stacked.detach()
        return torch.ops.vqvae_fast.triton_residual_nearest_code(z.detach(), stacked, cosine)
    if distance == "cosine":  # the forward's own op: the same codes and unit codes, bit for bit
        with torch.no_grad():
            _, indices, _ = _stages(z.detach(), [book.detach() for book in books],
                                    lambda r, book: quantize(r, book, backend=backend, distance="cosine"))
        return torch.stack(indices, dim=1)

    gathered = torch.empty_like(z, dtype=books[0].dtype)  # one buffer for every stage's codes

    def nearest(residual, book):
        idx = nearest_code(residual, book, backend=backend)
        return torch.index_select(book.detach(), 0, idx, out=gathered), idx, None

    with torch.no_grad():
        _, indices, _ = _stages(z, books, nearest)
    return torch.stack(indices, dim=1)


def residual_decode(indices: torch.Tensor, codebooks: Codebooks, *, distance: str = "euclidean") -> torch.Tensor:
    """(N, D) the sum of the codes `indices` (N, S') picks, S' <= S (the first S' stages); an
    index of -1 (a stage left out, e.g. by quantizer dropout) adds nothing. distance="cosine":
    the sum of the l2-normalised codes, as `residual_quantize(..., distance="cosine")` adds them
    (bit for bit on cpu and reference; the triton kernels normalise with a float64 norm, so
    theirs may differ in the last bit)."""
    check_distance(distance)
    books = list(codebooks.unbind(0)) if isinstance(codebooks, torch.Tensor) else list(codebooks)
    if indices.dim() != 2 or indices.shape[1] > len(books):
        raise InputError(f"indices must be (N, S') with S' <= {len(books)} stages, got shape {tuple(indices.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise InputError(f"indices must be int64 or int32, got {indices.dtype}")
    out = books[0].new_zeros(indices.shape[0], books[0].shape[1],
                             dtype=torch.promote_types(books[0].dtype, torch.float32))  # rounded once, at the end
    for s in range(indices.shape[1]):
        idx = indices[:, s].long()
        k = books[s].shape[0]
        if bool(((idx < -1) | (idx >= k)).any()):
            raise InputError(f"stage {s}: indices must be in [0, {k}) (or -1 for a stage left out)")
        used = idx >= 0
        book = l2_normalize(books[s]) if distance == "cosine" else books[s]  # as `quantize` normalises it
        out = out + torch.where(used[:, None], book[idx.clamp_min(0)], 0.0)
    return out.to(books[0].dtype)
