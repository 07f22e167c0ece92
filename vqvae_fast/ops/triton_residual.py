"""Fused residual encoding on Triton: every stage of a residual quantizer in one kernel.

`residual_nearest_code(z, codebooks)` gives the (N, S) codes that `vqvae_fast.residual_nearest_code`
finds stage by stage, in two launches whatever S (the per-stage loop takes about eight per stage):

1. `_absmax_kernel`: the largest |value| of the finite entries of z and of the codebooks (an
   atomic max of fp32 bits), for a power-of-two scale s that puts it in [0.5, 1): scores can
   neither overflow nor underflow fp32, whatever the inputs' scale.
2. `_residual_encode_kernel`: one program per BLOCK_N rows keeps the running sum of the rows'
   chosen codes in registers across the stages (the residual never goes to memory; z is read
   once a stage).
   Per stage it scans the stage's codebook in tiles: score 1/2 |e|^2 - r.e of the scaled
   residual and codes, one "tf32x3" `tl.dot` per tile (tensor cores), keeping each row's best and second-best
   score. A rigorous bound of the fp32 error (`residual_bound`) settles the rows whose second
   best lies beyond twice it; the others are re-scored in the same program, in float64 from the
   unscaled values (sum((r - e)^2) of the candidates within the bound), so every stage's
   code is exact, as the single-stage fp32 search's. float64 inputs are scored in float64 (the
   single-stage fp64 rule: not re-checked). The chosen code is added to the sum in fp32 (fp64 for
   fp64) and the next residual is formed as the loop forms it: (z - sum) rounded to z's dtype.

Training (`residual_quantize_fwd`, the forward of `vqvae_fast.residual_quantize` and of
ResidualVectorQuantizer): the same two launches, the encode kernel also writing the sum of the
chosen codes (N, D) and each row's squared error |r_s - e_s|^2 per stage in float64 (the
losses); for the module's EMA and usage, each stage's code counts and residual sums come from a
third launch (atomics, as the single-stage search's epilogue). `stage_losses_bwd`: the stage losses' gradients
(residual.StageLosses' formulas) in one launch of `_stage_rows_kernel`: each program forms its
rows' residuals again stage by stage, sums the commitment terms into grad_z in registers and
adds the codebook terms to the codes chosen with atomics (the same kernel, in the forward, adds
the module's counts and residual sums). So a training step of the quantizer is three launches of
these kernels whatever S (four with the module's statistics; plus a few small torch ops), where
the per-stage loop launches about eight a stage forward and six backward.

A row with a NaN/Inf entry takes code 0 at every stage; a code with one is never chosen.
Cosine (`normalize`): the caller passes the unit codes (residual.unit_codebooks); each residual
is normalised in the kernels as the single-stage cosine search normalises its input (a float64
inverse norm, one rounding: `unit_rows`); the chosen unit code is added to the sum, so the next
residual subtracts it; errors, sums and gradients are of the unit residual, the gradient to z
through its normalisation. No absmax launch: unit vectors need no scale.

Scope: codebooks stacked as (S, K, D), D <= RESIDENT_MAX_D (128); other inputs take the
per-stage loop. Not measured on a GPU: any of these kernels' time.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_prepare import _bf16_nearest, normalize_eps, unit_rows
from .triton_quantize_bwd import _normalization_grad

# The widest rows the fused kernel takes: at D = 256 it spilled 264-344 bytes a thread even at 8
# warps and 16-code tiles (fp32/16-bit, sm_90, scripts/inspect_kernels.py); wider rows take the loop.
RESIDENT_MAX_D = 128


@triton.jit
def _absmax_kernel(z_ptr, books_ptr, out_ptr, N, R, D, z_programs, BLOCK_R: tl.constexpr, D_PAD: tl.constexpr):
    """out (int32, zeroed) = max over the finite entries of z (N, D) and books (R = S*K rows, D),
    both contiguous, of |x| as fp32 bits (non-negative floats order as their bits)."""
    pid = tl.program_id(0)
    is_z = pid < z_programs
    rows = (pid - tl.where(is_z, 0, z_programs)) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, D_PAD)
    if is_z:
        mask = (rows < N)[:, None] & (d < D)[None, :]
        x = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        mask = (rows < R)[:, None] & (d < D)[None, :]
        x = tl.load(books_ptr + rows.to(tl.int64)[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.abs(x)
    largest = tl.max(tl.max(tl.where(x < float("inf"), x, 0.0), axis=1), axis=0)  # NaN fails the comparison
    tl.atomic_max(out_ptr, largest.to(tl.int32, bitcast=True))


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE (to nearest, as a GPU converts), back in fp32."""
    if DTYPE == tl.bfloat16:
        return _bf16_nearest(x).to(tl.float32)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _stage_scores(rs, scale, tile_ptr, cols, k_mask, d, d_mask, stride_bk, stride_bd, ACC: tl.constexpr,
                  PRECISION: tl.constexpr):
    """(scores (BLOCK_N, BLOCK_K) of the scaled residual rs against a tile of codes, the codes'
    usable mask, their scaled |e|^2). Non-finite codes score +inf."""
    e = tl.load(tile_ptr + cols.to(tl.int64)[:, None] * stride_bk + d[None, :] * stride_bd,
                mask=k_mask[:, None] & d_mask[None, :], other=0.0).to(ACC) * scale
    ee = tl.sum(e * e, axis=1)
    usable = k_mask & (ee < float("inf"))
    e = tl.where(usable[:, None], e, 0.0)
    dot = tl.dot(rs, tl.trans(e), input_precision=PRECISION, out_dtype=ACC)
    return tl.where(usable[None, :], 0.5 * ee[None, :] - dot, float("inf")), usable, ee


@triton.jit
def _residual_chunk(z_ptr, books_ptr, indices_ptr, rows64, row_mask, stage, S, dc, D, stride_zn, stride_zd,
                    stride_bs, stride_bk, stride_bd, IN_DTYPE: tl.constexpr, ACC: tl.constexpr):
    """Columns dc of the residual of `stage`, rebuilt from memory exactly as the scan formed it:
    z minus the codes the earlier stages chose (stored in `indices`), summed in the same order."""
    mask = row_mask[:, None] & (dc < D)[None, :]
    total = tl.zeros(mask.shape, ACC)
    for t in range(0, stage):
        idx = tl.load(indices_ptr + rows64 * S + t, mask=row_mask, other=0)
        total += tl.load(books_ptr + t * stride_bs + idx[:, None] * stride_bk + dc[None, :] * stride_bd, mask=mask,
                         other=0.0).to(ACC)
    z = tl.load(z_ptr + rows64[:, None] * stride_zn + dc[None, :] * stride_zd, mask=mask, other=0.0).to(ACC)
    return _round_to(z - total, IN_DTYPE)


@triton.jit
def _unit_residual(r, rows64, IN_DTYPE: tl.constexpr, ACC: tl.constexpr, NORMALIZE: tl.constexpr):
    """(r, placeholder) or, NORMALIZE, (unit(r), 1 / max(|r|, eps) in fp64): r (in ACC, exact in
    IN_DTYPE) normalised as the single-stage cosine search normalises its input (unit_rows)."""
    inv = rows64.to(tl.float64)  # a placeholder unless NORMALIZE
    if NORMALIZE:
        r64 = r.to(tl.float64)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(r64 * r64, axis=1)), normalize_eps())
        r = unit_rows(r.to(IN_DTYPE), inv, NORMALIZE).to(ACC)
    return r, inv


@triton.jit
def _residual_encode_kernel(
    # pointers: z (N, D), codebooks (S, K, D), absmax (fp32 bits), indices (N, S) int64 out;
    # WANT_LOSS: total (N, D) in ACC out (the sum of the chosen codes), row_err (N, S) float64 out
    z_ptr, books_ptr, absmax_ptr, indices_ptr, total_ptr, row_err_ptr,
    # sizes and the fp32 error bound's coefficients (residual_bound)
    N, K, D, S, bound_rel, bound_abs,
    # strides
    stride_zn, stride_zd, stride_bs, stride_bk, stride_bd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, EXACT_D: tl.constexpr,
    IN_DTYPE: tl.constexpr, ACC: tl.constexpr, SETTLE: tl.constexpr, PRECISION: tl.constexpr,
    WANT_LOSS: tl.constexpr, NORMALIZE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    mask = row_mask[:, None] & d_mask[None, :]
    bits = tl.load(absmax_ptr)
    exponent = ((bits >> 23) & 0xFF) - 126  # the largest |value| is m 2^exponent, m in [0.5, 1)
    exponent = tl.where((bits > 0) & (ACC == tl.float32), exponent, 0).to(tl.int64)  # fp64: not scaled
    scale = ((1023 - exponent) << 52).to(tl.float64, bitcast=True).to(ACC)  # 2^-exponent: exact
    total = tl.zeros((BLOCK_N, D_PAD), ACC)  # the chosen codes so far: with z (reloaded), the residual
    cols = tl.arange(0, BLOCK_K)
    for s in range(0, S):
        base = books_ptr + s * stride_bs
        z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd, mask=mask, other=0.0).to(ACC)
        r = _round_to(z - total, IN_DTYPE)  # the residual as the per-stage loop forms it
        finite_row = tl.sum((mask & ~(tl.abs(r) < float("inf"))).to(tl.int32), axis=1) == 0
        r, inv = _unit_residual(r, rows64, IN_DTYPE, ACC, NORMALIZE)  # cosine: the search's vector
        rs = tl.where(finite_row[:, None], r, 0.0) * scale
        best = tl.full((BLOCK_N,), float("inf"), ACC)
        second = tl.full((BLOCK_N,), float("inf"), ACC)
        best_idx = tl.zeros((BLOCK_N,), tl.int32)
        largest_ee = tl.zeros((BLOCK_N,), ACC)
        for k0 in range(0, K, BLOCK_K):
            codes = k0 + cols
            score, usable, ee = _stage_scores(rs, scale, base, codes, codes < K, d, d_mask, stride_bk, stride_bd, ACC,
                                              PRECISION)
            largest_ee = tl.maximum(largest_ee, tl.max(tl.where(usable, ee, 0.0), axis=0))
            tile_best = tl.min(score, axis=1)
            tile_idx = tl.min(tl.where(score == tile_best[:, None], codes[None, :], 2147483647), axis=1)
            tile_second = tl.min(tl.where(codes[None, :] == tile_idx[:, None], float("inf"), score), axis=1)
            better = tile_best < best  # strict: an earlier tile keeps its lower index on ties
            second = tl.where(better, tl.minimum(best, tile_second), tl.minimum(second, tile_best))
            best_idx = tl.where(better, tile_idx, best_idx)
            best = tl.where(better, tile_best, best)
        if SETTLE:
            bound = bound_rel * (tl.sqrt(tl.sum(rs * rs, axis=1)) * tl.sqrt(largest_ee) + 0.5 * largest_ee) + bound_abs
            threshold = best + 2.0 * bound
            flagged = row_mask & finite_row & (best < float("inf")) & (second <= threshold)
            if tl.max(flagged.to(tl.int32), axis=0) > 0:
                best_idx = _rescore(z_ptr, books_ptr, indices_ptr, rs, scale, threshold, flagged, best_idx, rows64,
                                    inv, s, S, K, D, d, d_mask, stride_zn, stride_zd, stride_bs, stride_bk,
                                    stride_bd, BLOCK_N, BLOCK_K, EXACT_D, IN_DTYPE, ACC, PRECISION, NORMALIZE)
        best_idx = tl.where(finite_row, best_idx, 0)
        tl.store(indices_ptr + rows64 * S + s, best_idx.to(tl.int64), mask=row_mask)
        chosen = tl.load(base + best_idx.to(tl.int64)[:, None] * stride_bk + d[None, :] * stride_bd, mask=mask,
                         other=0.0).to(ACC)
        if WANT_LOSS:  # |r - e|^2 in float64, as the single-stage op's per-row error
            diff = r.to(tl.float64) - chosen.to(tl.float64)
            tl.store(row_err_ptr + rows64 * S + s, tl.sum(diff * diff, axis=1), mask=row_mask)
        total += chosen
    if WANT_LOSS:
        tl.store(total_ptr + rows64[:, None] * D + d[None, :], total, mask=mask)


@triton.jit
def _rescore(z_ptr, books_ptr, indices_ptr, rs, scale, threshold, flagged, best_idx, rows64, inv, stage, S, K, D, d,
             d_mask, stride_zn, stride_zd, stride_bs, stride_bk, stride_bd, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EXACT_D: tl.constexpr, IN_DTYPE: tl.constexpr, ACC: tl.constexpr,
             PRECISION: tl.constexpr, NORMALIZE: tl.constexpr):
    """The flagged rows' nearest code among those whose fp32 score is within their threshold, by
    float64 distances sum((r - e)^2) of the unscaled values, EXACT_D columns at a time (the
    residual rebuilt from memory, `_residual_chunk`; NORMALIZE: times the row's inv, as the scan
    normalised it); ties to the lowest index."""
    base = books_ptr + stage * stride_bs
    cols = tl.arange(0, BLOCK_K)
    best = tl.full((BLOCK_N,), float("inf"), tl.float64)
    idx = best_idx
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + cols
        k_mask = codes < K
        score, usable, _ = _stage_scores(rs, scale, base, codes, k_mask, d, d_mask, stride_bk, stride_bd, ACC,
                                         PRECISION)
        candidate = flagged[:, None] & (score <= threshold[:, None])
        if tl.max(tl.max(candidate.to(tl.int32), axis=1), axis=0) > 0:
            dist = tl.zeros((BLOCK_N, BLOCK_K), tl.float64)
            for d0 in range(0, D, EXACT_D):
                dc = d0 + tl.arange(0, EXACT_D)
                r = _residual_chunk(z_ptr, books_ptr, indices_ptr, rows64, flagged, stage, S, dc, D, stride_zn,
                                    stride_zd, stride_bs, stride_bk, stride_bd, IN_DTYPE, ACC)
                r = unit_rows(r.to(IN_DTYPE), inv, NORMALIZE).to(tl.float64)
                e = tl.load(base + codes.to(tl.int64)[:, None] * stride_bk + dc[None, :] * stride_bd,
                            mask=k_mask[:, None] & (dc < D)[None, :], other=0.0).to(tl.float64)
                diff = r[:, None, :] - e[None, :, :]
                dist += tl.sum(diff * diff, axis=2)
            dist = tl.where(candidate, dist, float("inf"))
            tile_best = tl.min(dist, axis=1)
            tile_idx = tl.min(tl.where(dist == tile_best[:, None], codes[None, :], 2147483647), axis=1)
            better = tile_best < best
            idx = tl.where(better & flagged, tile_idx, idx)
            best = tl.where(better, tile_best, best)
    return idx


@triton.jit
def _stage_rows_kernel(
    # pointers: grad (S,) of the stage losses (any stride), z (N, D), codebooks (S, K, D), indices (N, S);
    # out: grad_z (N, D) in z's dtype; grad_books (S, K, D), counts (S, K) fp32 and sums (S, K, D), in ACC,
    # zeroed, added with atomics
    grad_ptr, z_ptr, books_ptr, indices_ptr, grad_z_ptr, grad_books_ptr, counts_ptr, sums_ptr,
    N, K, D, S, beta, two_over_count, stride_grad,
    BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, IN_DTYPE: tl.constexpr, ACC: tl.constexpr,
    WANT_Z: tl.constexpr, WANT_BOOKS: tl.constexpr, WANT_STATS: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """For BLOCK_N rows, every stage's residual r_s formed again as the forward formed it (z minus
    the sum of the earlier stages' codes, rounded to z's dtype), then what the caller wants of it:
    WANT_STATS, what each stage's EMA update and usage need: counts[s, idx] += 1 (1), and
    sums[s, idx] += r_s (2); WANT_Z / WANT_BOOKS, residual.StageLosses' backward: 2 beta w_s (r_s -
    e_s) / (N D) summed into the rows' grad_z and -2 w_s (r_s - e_s) / (N D) added to the rows of
    codebook s they chose, w_s = grad[s]. A stage whose loss has no gradient (w_s = 0) adds nothing
    (not 0 * NaN). NORMALIZE (cosine; the codebooks given are unit codes): unit(r_s) in place of
    r_s, and the commitment term taken back through the residual's normalisation."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    d = tl.arange(0, D_PAD)
    mask = row_mask[:, None] & (d < D)[None, :]
    total = tl.zeros((BLOCK_N, D_PAD), ACC)
    grad_z = tl.zeros((BLOCK_N, D_PAD), ACC)
    for s in range(0, S):
        z = tl.load(z_ptr + rows64[:, None] * D + d[None, :], mask=mask, other=0.0).to(ACC)
        r, inv = _unit_residual(_round_to(z - total, IN_DTYPE), rows64, IN_DTYPE, ACC, NORMALIZE)
        idx = tl.load(indices_ptr + rows64 * S + s, mask=row_mask, other=0)
        code_rows = (s * K + idx)[:, None] * D + d[None, :]
        chosen = tl.load(books_ptr + code_rows, mask=mask, other=0.0).to(ACC)
        if WANT_STATS >= 1:
            tl.atomic_add(counts_ptr + s * K + idx, tl.full(idx.shape, 1.0, tl.float32), mask=row_mask, sem="relaxed")
        if WANT_STATS == 2:
            tl.atomic_add(sums_ptr + code_rows, r, mask=mask, sem="relaxed")
        if WANT_Z or WANT_BOOKS:
            weight = tl.load(grad_ptr + s * stride_grad).to(ACC) * two_over_count
            diff = tl.where(weight == 0, 0.0, r - chosen)
            if WANT_Z:
                step = diff * (beta * weight)
                if NORMALIZE:
                    step = _normalization_grad(step, r, tl.sum(r * step, axis=1), inv)
                grad_z += step
            if WANT_BOOKS:
                if weight != 0:
                    tl.atomic_add(grad_books_ptr + code_rows, -weight * diff, mask=mask, sem="relaxed")
        total += chosen
    if WANT_Z:
        tl.store(grad_z_ptr + rows64[:, None] * D + d[None, :], grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launcher

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_ACC = {torch.float32: torch.float32, torch.float64: torch.float64, torch.bfloat16: torch.float32,
        torch.float16: torch.float32}


def residual_bound(d_pad: int) -> tuple[float, float]:
    """(rel, abs): |score error| <= rel (|r| max|e| + max|e|^2 / 2) + abs for the fp32 scores of
    scaled values (every value below 1), as triton_plan.settle_bound reasons for the single-stage
    search: r.e by one "tf32x3" tl.dot (tails truncated to TF32, 2^-21 each, tail.tail dropped,
    2^-22: 2^-19 per |r_i e_i|; fp32 accumulation taken as (terms + 16) 2^-22), |e|^2 by fp32
    products summed (gamma_d), one rounding of the difference; products flushed below fp32's
    normal range add at most 2^-126 each. With 1% of slack."""
    u = 2.0 ** -24
    operands = 2.0 ** -19 + 2 * u
    accumulation = (d_pad + 16) * 2.0 ** -22 * (1 + 2.0 ** -7)
    gamma = (d_pad + 2) * u / (1 - (d_pad + 2) * u)
    return 1.01 * (operands + accumulation * (1 + operands) + gamma + u), 3 * (d_pad + 16) * 2.0 ** -126


def supports(z: torch.Tensor, codebooks) -> bool:
    """Whether the fused kernel takes these inputs (else the per-stage loop does)."""
    return (isinstance(codebooks, torch.Tensor) and codebooks.dim() == 3 and z.dtype in _TL
            and 0 < z.shape[1] <= RESIDENT_MAX_D and z.shape[0] > 0)


def encode_meta(d: int, dtype: torch.dtype, normalize: bool = False) -> dict:
    """The encode kernel's constexprs: 32 rows a program up to D = 64, 16 beyond (two resident
    (BLOCK_N, D_PAD) tiles) and for cosine up to D = 32 but in fp32, code tiles of 64 (32 for fp64
    or D > 64, 16 for D > 128). Chosen for no spills on sm_90/sm_80 (scripts/inspect_kernels.py:
    cosine at D = 8 with 32 rows spilled 8 bytes on sm_80 in fp64 and bf16, fp32 with 16 rows 32
    bytes on sm_90, 8 warps or halved code tiles more); not timed on a GPU."""
    d_pad = max(16, triton.next_power_of_2(d))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    block_k = 64 if d_pad <= 64 and acc == torch.float32 else 32 if d_pad <= 128 else 16
    rows = 32 if d_pad <= 64 and not (normalize and d_pad <= 32 and dtype != torch.float32) else 16
    return dict(BLOCK_N=rows, BLOCK_K=block_k, D_PAD=d_pad, EXACT_D=1, IN_DTYPE=_TL[dtype],
                ACC=_TL[acc], SETTLE=acc == torch.float32, PRECISION="tf32x3" if acc == torch.float32 else "ieee")


def encode_warps(d: int) -> int:
    """8 warps from D = 33 (the resident tiles spread over more threads: with 4, D = 128 spilled
    88-528 bytes on sm_90 and D = 64 8 bytes on sm_80, at 255 registers), else 4."""
    return 8 if d > 32 else 4


def backward_meta(d: int, dtype: torch.dtype) -> dict:
    """The stage losses' backward constexprs: 32 rows a program up to D = 64, 16 beyond (the
    residual, the sum and the gradient resident; at 32 rows and 4 warps D = 64 and 128 spilled
    112-2840 bytes a thread in fp64 on sm_90, scripts/inspect_kernels.py; not timed on a GPU).
    Its warps are encode_warps(d)."""
    meta = encode_meta(d, dtype)
    return dict(BLOCK_N=meta["BLOCK_N"], D_PAD=meta["D_PAD"], IN_DTYPE=meta["IN_DTYPE"], ACC=meta["ACC"])


def absmax_rows(d_pad: int) -> int:
    return max(1, 4096 // d_pad)  # a (rows, d_pad) tile of 4096 values


def _encode(z: torch.Tensor, codebooks: torch.Tensor, want_loss: bool, normalize: bool):
    """(indices (N, S) int64, total (N, D) or None, row_err (N, S) float64 or None): the two
    launches of the module docstring; want_loss: the kernel also writes the sum of the chosen
    codes (fp32, fp64 for fp64) and each row's squared error |r_s - e_s|^2 at each stage.
    normalize (cosine; codebooks holds unit codes): each residual is normalised before its search
    (and in its error), one launch: unit vectors need no scale (the absmax stays 0: scale 1)."""
    n, d = z.shape
    s, k, _ = codebooks.shape
    z, books = z.contiguous(), codebooks.contiguous()
    meta = encode_meta(d, z.dtype, normalize)
    absmax = torch.zeros(1, dtype=torch.int32, device=z.device)
    if not normalize:
        block_r = absmax_rows(meta["D_PAD"])
        z_programs = triton.cdiv(n, block_r)
        _absmax_kernel[(z_programs + triton.cdiv(s * k, block_r),)](z, books, absmax, n, s * k, d, z_programs,
                                                                    BLOCK_R=block_r, D_PAD=meta["D_PAD"])
    indices = torch.empty(n, s, dtype=torch.long, device=z.device)
    total = torch.empty(n, d, dtype=_ACC[z.dtype], device=z.device) if want_loss else None
    row_err = torch.empty(n, s, dtype=torch.float64, device=z.device) if want_loss else None
    _residual_encode_kernel[(triton.cdiv(n, meta["BLOCK_N"]),)](
        z, books, absmax, indices, total, row_err, n, k, d, s, *residual_bound(meta["D_PAD"]), z.stride(0),
        z.stride(1), books.stride(0), books.stride(1), books.stride(2), **meta, WANT_LOSS=want_loss,
        NORMALIZE=normalize, num_warps=encode_warps(d))
    return indices, total, row_err


def residual_nearest_code(z: torch.Tensor, codebooks: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """(N, S) int64: the fused residual encoding (module docstring) of z (N, D) with (S, K, D)
    (normalize: unit codes, and each residual normalised for its search: cosine)."""
    return _encode(z, codebooks, want_loss=False, normalize=normalize)[0]


def residual_quantize_fwd(z: torch.Tensor, codebooks: torch.Tensor, stats: int = 0, normalize: bool = False):
    """The training forward: (total (N, D), the sum of the chosen codes in fp32 (fp64 for fp64 z),
    indices (N, S) int64, stage_err (S,) float64: the sum over rows of |r_s - e_s|^2, so that stage
    s's loss is (1 + beta) stage_err[s] / (N D), then counts (S, K) fp32 and sums (S, K, D) of each
    stage's codes and residuals (stats 1: counts only; 0: both empty) for the stages' EMA and usage
    (ResidualVectorQuantizer). The encoder's two launches, and a third for the statistics
    (`_stage_rows_kernel`: in the search kernel their atomics made ptxas cap it at 128 registers
    and spill 16-84 bytes a thread on sm_80). normalize: cosine (unit codes given; the errors and
    sums are of the unit residuals)."""
    z, codebooks = z.contiguous(), codebooks.contiguous()  # once, for both launches
    indices, total, row_err = _encode(z, codebooks, want_loss=True, normalize=normalize)
    s, k, d = codebooks.shape
    counts = torch.zeros((s, k) if stats else (0,), dtype=torch.float32, device=z.device)
    sums = torch.zeros((s, k, d) if stats == 2 else (0,), dtype=_ACC[z.dtype], device=z.device)
    if stats:
        _stage_rows(z, codebooks, indices, counts=counts, sums=sums if stats == 2 else None, normalize=normalize)
    return total, indices, row_err.sum(0), counts, sums


def _stage_rows(z, codebooks, indices, *, grad=None, beta=0.0, grad_z=None, grad_books=None, counts=None,
                sums=None, normalize=False):
    """One launch of `_stage_rows_kernel` filling the outputs given (the others None)."""
    n, d = z.shape
    s, k, _ = codebooks.shape
    meta = backward_meta(d, z.dtype)
    stats = 2 if sums is not None else 1 if counts is not None else 0
    _stage_rows_kernel[(triton.cdiv(n, meta["BLOCK_N"]),)](
        grad, z.contiguous(), codebooks.contiguous(), indices.contiguous(), grad_z, grad_books, counts, sums, n, k,
        d, s, float(beta), 2.0 / max(n * d, 1), 0 if grad is None else grad.stride(0), **meta,
        WANT_Z=grad_z is not None, WANT_BOOKS=grad_books is not None, WANT_STATS=stats, NORMALIZE=normalize,
        num_warps=encode_warps(d))


def stage_losses_bwd(grad: torch.Tensor, z: torch.Tensor, codebooks: torch.Tensor, indices: torch.Tensor,
                     beta: float, need_grad_z: bool, need_grad_codebooks: bool, normalize: bool = False):
    """The stage losses' gradients (residual.StageLosses' formulas) in one launch: (grad_z (N, D)
    in z's dtype, grad_codebooks (S, K, D) in theirs); one not needed is an empty tensor. grad
    (S,): the upstream gradient of each stage's loss. The codebooks' gradient is added with
    atomics (fp32, fp64 for fp64): its summation order is not fixed. normalize: cosine (the
    codebooks given are the unit codes; their gradient is the unit codes', z's goes through each
    residual's normalisation)."""
    n, d = z.shape
    s, k, _ = codebooks.shape
    acc = _ACC[z.dtype]
    grad_z = torch.empty(n, d, dtype=z.dtype, device=z.device) if need_grad_z else z.new_empty(0)
    grad_books = (torch.zeros(s, k, d, dtype=acc, device=z.device) if need_grad_codebooks
                  else codebooks.new_empty(0))
    if n and (need_grad_z or need_grad_codebooks):
        _stage_rows(z, codebooks, indices, grad=grad, beta=beta, grad_z=grad_z if need_grad_z else None,
                    grad_books=grad_books if need_grad_codebooks else None, normalize=normalize)
    return grad_z, grad_books.to(codebooks.dtype)
