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

A row with a NaN/Inf entry takes code 0 at every stage; a code with one is never chosen.
Scope: codebooks stacked as (S, K, D), D <= RESIDENT_MAX_D (128); other inputs take the
per-stage loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_prepare import _bf16_nearest

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
def _residual_encode_kernel(
    # pointers: z (N, D), codebooks (S, K, D), absmax (fp32 bits), indices (N, S) int64 out
    z_ptr, books_ptr, absmax_ptr, indices_ptr,
    # sizes and the fp32 error bound's coefficients (residual_bound)
    N, K, D, S, bound_rel, bound_abs,
    # strides
    stride_zn, stride_zd, stride_bs, stride_bk, stride_bd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, EXACT_D: tl.constexpr,
    IN_DTYPE: tl.constexpr, ACC: tl.constexpr, SETTLE: tl.constexpr, PRECISION: tl.constexpr,
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
                                    s, S, K, D, d, d_mask, stride_zn, stride_zd, stride_bs, stride_bk, stride_bd,
                                    BLOCK_N, BLOCK_K, EXACT_D, IN_DTYPE, ACC, PRECISION)
        best_idx = tl.where(finite_row, best_idx, 0)
        tl.store(indices_ptr + rows64 * S + s, best_idx.to(tl.int64), mask=row_mask)
        total += tl.load(base + best_idx.to(tl.int64)[:, None] * stride_bk + d[None, :] * stride_bd, mask=mask,
                         other=0.0).to(ACC)


@triton.jit
def _rescore(z_ptr, books_ptr, indices_ptr, rs, scale, threshold, flagged, best_idx, rows64, stage, S, K, D, d,
             d_mask, stride_zn, stride_zd, stride_bs, stride_bk, stride_bd, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, EXACT_D: tl.constexpr, IN_DTYPE: tl.constexpr, ACC: tl.constexpr,
             PRECISION: tl.constexpr):
    """The flagged rows' nearest code among those whose fp32 score is within their threshold, by
    float64 distances sum((r - e)^2) of the unscaled values, EXACT_D columns at a time (the
    residual rebuilt from memory, `_residual_chunk`); ties to the lowest index."""
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
                                    stride_zd, stride_bs, stride_bk, stride_bd, IN_DTYPE, ACC).to(tl.float64)
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


# ----------------------------------------------------------------------------- launcher

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


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


def encode_meta(d: int, dtype: torch.dtype) -> dict:
    """The encode kernel's constexprs: 32 rows a program up to D = 64, 16 beyond (two resident
    (BLOCK_N, D_PAD) tiles), code tiles of 64 (32 for fp64 or D > 64, 16 for D > 128: chosen for no
    spills on sm_90/sm_80, scripts/inspect_kernels.py; not timed on a GPU)."""
    d_pad = max(16, triton.next_power_of_2(d))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    block_k = 64 if d_pad <= 64 and acc == torch.float32 else 32 if d_pad <= 128 else 16
    return dict(BLOCK_N=32 if d_pad <= 64 else 16, BLOCK_K=block_k, D_PAD=d_pad, EXACT_D=1, IN_DTYPE=_TL[dtype],
                ACC=_TL[acc], SETTLE=acc == torch.float32, PRECISION="tf32x3" if acc == torch.float32 else "ieee")


def encode_warps(d: int) -> int:
    """8 warps from D = 33 (the resident tiles spread over more threads: with 4, D = 128 spilled
    88-528 bytes on sm_90 and D = 64 8 bytes on sm_80, at 255 registers), else 4."""
    return 8 if d > 32 else 4


def absmax_rows(d_pad: int) -> int:
    return max(1, 4096 // d_pad)  # a (rows, d_pad) tile of 4096 values


def residual_nearest_code(z: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """(N, S) int64: the fused residual encoding (module docstring) of z (N, D) with (S, K, D)."""
    n, d = z.shape
    s, k, _ = codebooks.shape
    z, books = z.contiguous(), codebooks.contiguous()
    meta = encode_meta(d, z.dtype)
    absmax = torch.zeros(1, dtype=torch.int32, device=z.device)
    block_r = absmax_rows(meta["D_PAD"])
    z_programs = triton.cdiv(n, block_r)
    _absmax_kernel[(z_programs + triton.cdiv(s * k, block_r),)](z, books, absmax, n, s * k, d, z_programs,
                                                                BLOCK_R=block_r, D_PAD=meta["D_PAD"])
    indices = torch.empty(n, s, dtype=torch.long, device=z.device)
    _residual_encode_kernel[(triton.cdiv(n, meta["BLOCK_N"]),)](
        z, books, absmax, indices, n, k, d, s, *residual_bound(meta["D_PAD"]), z.stride(0), z.stride(1),
        books.stride(0), books.stride(1), books.stride(2), **meta, num_warps=encode_warps(d))
    return indices
