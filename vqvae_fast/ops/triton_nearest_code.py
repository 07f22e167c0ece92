"""Triton nearest-code search (the forward of `nearest_code` and `quantize`).

Read top to bottom: the kernels, the search plan (modes, tiles, splits, autotuning), the
launchers (check, allocate, launch). The backward is in `triton_quantize_bwd.py`; the
registration as torch custom ops in `triton_ops.py`.

Forward of z (N, D) against a codebook (K, D), in four to six launches, none of them N x K
(`tests/test_triton_nearest_code.py` counts them):

1. `_stats_kernel`: per column, the sum, count, min and max over the finite codes (a code
   with any NaN/Inf entry takes no part), and the largest |z| entry of the finite rows of z.
   It also zeroes the two scratch words the later launches accumulate into.
2. `_prepare_kernel` (both in `triton_prepare.py`): the centre c (the column means, see
   `_centre_and_scale`) and a power of two s, then both operands as s (x - c), computed in
   float64 and converted once into the
   form `tl.dot` takes, padded with zeros: the codes (K_PAD, D_PAD) with 1/2 |s (e - c)|^2 per
   code (+inf for codes with a NaN/Inf entry and for padding, so they are never chosen), and
   z (N_PAD, D_PAD) with each row's norm (NaN for a row with a NaN/Inf entry). s maps the
   largest centred value to [2^32, 2^33): scores can neither overflow nor underflow whatever
   the inputs' scale (1e-30 or 1e20), and the argmin does not change (every score is scaled
   by s^2). O((N + K) D).
3. `_search_kernel`: one program per BLOCK_N rows of z (times a split of the codebook when
   there are too few row blocks to fill the GPU). It loads its z tile once, before the
   codebook loop (D <= 512; wider rows are streamed in chunks, split-D), then feeds codebook
   tiles straight into `tl.dot`; the score 1/2 |y|^2 - x.y (x, y the prepared z and code: 1/2
   |x - y|^2 minus a per-row constant) updates a running element-wise best (and, fp32, the
   second best), and one argmin at the end keeps the lowest index on exact ties. Without a
   split it also writes the indices, gathers `quantized` and the per-row squared error in
   float64; with one, it writes (score, second, index) per split. 16-bit: a second,
   re-scoring launch of the same kernel (see Precision), a no-op for every row block without
   a flagged row.
4. `_merge_kernel` (split codebook only): the lexicographic (score, index) minimum over the
   splits, then the rows' outputs.
5. `_rescore_kernel` (fp32 only): the rows the error bound could not settle (see Precision),
   re-scored exactly. Its programs read the count of such rows on the device: no host sync.
6. `_loss_kernel` (`quantize_fwd` only): the loss from the per-row errors, in float64, in a
   fixed order.

A row of z with a NaN/Inf entry gets index 0, as every distance from it is NaN or +inf.

Cosine (`normalize=True`): the stats kernel takes each row's and code's norm in float64 and
keeps 1 / max(|x|, 1e-12) (N + K values); every later read of z or of the codebook, in the
prepare, search epilogue, merge and re-scoring kernels, goes through `unit_rows`, which
normalises with it and rounds once to the input's dtype. So all of them see the same unit
vectors, no normalised copy of z is written, and the exactness rules below hold for those
vectors. The backward (`triton_quantize_bwd.py`) recomputes the norms in one launch.

Precision. Scores are computed on values centred on the codebook mean, so a large common
offset cannot cancel.
- fp32 is exact, as on the cpu backend: one tensor-core pass (`triton_plan.FP32_PRECISIONS`; default
  "bf16x3": x and y split into two bf16 parts each, x.y ~ xl.yh + xh.yl + xh.yh, three bf16
  products accumulated in fp32, half the tensor-core work of 3xTF32) keeps each row's best
  and second-best score. `triton_plan.settle_bound` is a rigorous bound on a score's error (dropped
  parts of the split, fp32 accumulation with truncation, the half norm's rounding, flushed
  denormals). A row whose second best lies beyond twice that bound of its best has one
  candidate and is settled; every other row goes to `_rescore_kernel`, which scores it again
  and computes the float64 distance from the original values of every code whose score is
  within the bound, keeping the smallest (ties -> lowest index). So the index is the exact
  nearest code, up to float64 rounding of the distances.
- fp64: fp64 dot products (error ~1e-16 of the scale, not re-checked).
- 16-bit: the centre of a column is zero unless the column's finite entries lie in a narrow
  band around their mean, and then it is that mean rounded to 16 bits; either way every
  centred code is exact in 16 bits (`_centre_and_scale`), and so is every z entry near the
  codebook, so the 16-bit products of the one tensor-core dot are exact and summed in fp32.
  Rows whose centred z is not exact in 16 bits are flagged, and the re-scoring launch scores
  their row blocks again with z as three 16-bit terms (exact). The scores' error is then fp32
  accumulation only (tests: 2e-5 of the scale).
The per-row squared errors and the loss are summed in float64 in every mode.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_plan import (LOSS_BLOCK, RESCORE_WARPS, SM90, CodeStats, fp32_pair, keep_config, machine_for, merge_meta,
                          mode_for, plan_search, rescore_meta, rescore_programs, rescoring_plan, search_configs,
                          search_meta, settle_bound)
from .triton_prepare import prepare_operands, unit_rows
from .triton_quantize_bwd import code_counts_and_sums, code_sums

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile_dot(z0, z1, z2, codes_ptr, codes_tail_ptr, offsets, acc, small,
              DOT_DTYPE: tl.constexpr, Z_TERMS: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """acc (+ small) += x . y^T for one codebook tile, from the prepared operands.

    SPLIT: the two small products go to `small` and the large one to `acc`, so that the small
    ones' accumulation error is relative to their own (2^-8 smaller) size (settle_bound)."""
    # out_dtype names the accumulator type: Triton 3.6 asserts it equals acc.dtype (fp64 too).
    e = tl.load(codes_ptr + offsets).to(DOT_DTYPE)  # a no-op cast except in the interpreter (bf16)
    if SPLIT:  # lo.hi + hi.lo, then hi.hi
        tail = tl.load(codes_tail_ptr + offsets).to(DOT_DTYPE)
        small = tl.dot(z1, tl.trans(e), small, input_precision=PRECISION, out_dtype=small.dtype)
        small = tl.dot(z0, tl.trans(tail), small, input_precision=PRECISION, out_dtype=small.dtype)
    acc = tl.dot(z0, tl.trans(e), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    if Z_TERMS == 3:  # 16-bit re-scoring: (term0 + term1 + term2) . e, exact products
        acc = tl.dot(z1, tl.trans(e), acc, input_precision=PRECISION, out_dtype=acc.dtype)
        acc = tl.dot(z2, tl.trans(e), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc, small


@triton.jit
def _load_z_operands(z_op_ptr, z_tail_ptr, z_tail2_ptr, offsets, flagged,
                     DOT_DTYPE: tl.constexpr, Z_TERMS: tl.constexpr, ONLY_FLAGGED: tl.constexpr):
    """The z operand tile(s). The 16-bit remainder terms exist only for flagged rows."""
    z0 = tl.load(z_op_ptr + offsets).to(DOT_DTYPE)
    z1 = z0
    z2 = z0
    if ONLY_FLAGGED:
        z1 = tl.load(z_tail_ptr + offsets, mask=flagged[:, None], other=0.0).to(DOT_DTYPE)
        z2 = tl.load(z_tail2_ptr + offsets, mask=flagged[:, None], other=0.0).to(DOT_DTYPE)
    elif Z_TERMS == 2:
        z1 = tl.load(z_tail_ptr + offsets).to(DOT_DTYPE)
    return z0, z1, z2


@triton.jit
def _tile_scores(z0, z1, z2, z_op_ptr, z_tail_ptr, z_tail2_ptr, codes_ptr, codes_tail_ptr, half_norm_ptr,
                 z_rows64, codes64, flagged, RESIDENT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                 ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, Z_TERMS: tl.constexpr,
                 SPLIT: tl.constexpr, ONLY_FLAGGED: tl.constexpr):
    """(BLOCK_N, BLOCK_K) scores 1/2 |y|^2 - x.y of a tile of codes: from the resident z
    operands z0..z2 (RESIDENT: D_PAD == BLOCK_D), or from chunks of D loaded here."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), ACC_DTYPE)
    small = tl.zeros((BLOCK_N, BLOCK_K), ACC_DTYPE)
    if RESIDENT:
        d = tl.arange(0, D_PAD)
        acc, small = _tile_dot(z0, z1, z2, codes_ptr, codes_tail_ptr, codes64[:, None] * D_PAD + d[None, :], acc,
                               small, DOT_DTYPE, Z_TERMS, SPLIT, PRECISION)
    else:
        for d0 in range(0, D_PAD, BLOCK_D):
            dc = d0 + tl.arange(0, BLOCK_D)
            c0, c1, c2 = _load_z_operands(z_op_ptr, z_tail_ptr, z_tail2_ptr, z_rows64[:, None] * D_PAD + dc[None, :],
                                          flagged, DOT_DTYPE, Z_TERMS, ONLY_FLAGGED)
            acc, small = _tile_dot(c0, c1, c2, codes_ptr, codes_tail_ptr, codes64[:, None] * D_PAD + dc[None, :],
                                   acc, small, DOT_DTYPE, Z_TERMS, SPLIT, PRECISION)
    if SPLIT:
        acc = acc + small
    half_norm = tl.load(half_norm_ptr + codes64)
    return half_norm[None, :] - acc


@triton.jit
def _write_rows(z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr, z_inv_ptr,
                code_inv_ptr, rows64, store_mask, idx, D, stride_zn, stride_zd, stride_ck, stride_cd,
                BLOCK_D: tl.constexpr, WANT_QUANTIZED: tl.constexpr, WANT_STATS: tl.constexpr,
                NORMALIZE: tl.constexpr):
    """indices[rows] = idx; with WANT_QUANTIZED also quantized[rows] = codebook[idx] and the
    rows' squared error sum((z - e)^2), in float64 (it neither overflows nor underflows).
    WANT_STATS: counts[idx] += 1 (1), and sums[idx] += z (2), with atomics (each row is
    written once, by the search, the merge or the re-scoring). NORMALIZE: z and the codes
    are their l2-normalised rows (`unit_rows`)."""
    z_inv = _inverse_norms(z_inv_ptr, rows64, store_mask, NORMALIZE)
    code_inv = _inverse_norms(code_inv_ptr, idx, store_mask, NORMALIZE)
    tl.store(indices_ptr + rows64, idx.to(tl.int64), mask=store_mask)
    if WANT_STATS >= 1:
        tl.atomic_add(counts_ptr + idx, tl.full(idx.shape, 1.0, tl.float32), mask=store_mask)
    if WANT_STATS == 2:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = store_mask[:, None] & (d < D)[None, :]
            z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd, mask=mask, other=0.0)
            z = unit_rows(z, z_inv, NORMALIZE)
            tl.atomic_add(sums_ptr + idx.to(tl.int64)[:, None] * D + d[None, :], z.to(sums_ptr.dtype.element_ty),
                          mask=mask)
    if WANT_QUANTIZED:
        idx64 = idx.to(tl.int64)
        sq_err = tl.zeros(idx.shape, tl.float64)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = store_mask[:, None] & (d < D)[None, :]
            z = unit_rows(tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd, mask=mask, other=0.0),
                          z_inv, NORMALIZE)
            e = unit_rows(tl.load(codebook_ptr + idx64[:, None] * stride_ck + d[None, :] * stride_cd, mask=mask,
                                  other=0.0), code_inv, NORMALIZE)
            tl.store(quantized_ptr + rows64[:, None] * D + d[None, :], e, mask=mask)
            diff = z.to(tl.float64) - e.to(tl.float64)
            sq_err += tl.sum(diff * diff, axis=1)
        tl.store(row_err_ptr + rows64, sq_err, mask=store_mask)


@triton.jit
def _inverse_norms(inv_ptr, rows, mask, NORMALIZE: tl.constexpr):
    """NORMALIZE: the stored 1 / max(|row|, eps) of `rows` (else a placeholder `unit_rows` ignores)."""
    inv = rows.to(tl.float64)
    if NORMALIZE:
        inv = tl.load(inv_ptr + rows, mask=mask, other=1.0)
    return inv


@triton.jit
def _settle_rows(rows64, row_mask, row_best, row_second, row_idx, row_norm_ptr, scratch_ptr, flag_rows_ptr,
                 flag_threshold_ptr, bound_rel, bound_norm, bound_abs, SETTLE: tl.constexpr):
    """(index, rows to write now) of the rows' search results.

    A row with a NaN/Inf entry takes index 0. SETTLE: a row whose second-best score is within
    twice the error bound of its best (settle_bound) is left unwritten and appended, with its
    threshold (best + 2 bound), to the rows `_rescore_kernel` settles."""
    norm = tl.load(row_norm_ptr + rows64, mask=row_mask, other=0.0)
    finite = norm == norm
    row_idx = tl.where(finite, row_idx, 0)
    write = row_mask
    if SETTLE:
        largest_half_norm = tl.load(scratch_ptr + 1).to(tl.float64, bitcast=True).to(tl.float32)
        largest_norm = tl.sqrt(2.0 * largest_half_norm)
        bound = bound_rel * norm * largest_norm + bound_norm * largest_half_norm + bound_abs
        threshold = row_best + 2.0 * bound
        flagged = row_mask & finite & (row_best < float("inf")) & (row_second <= threshold)
        slot = tl.atomic_add(scratch_ptr + tl.zeros_like(rows64), tl.full(rows64.shape, 1, tl.int64), mask=flagged)
        tl.store(flag_rows_ptr + slot, rows64.to(tl.int32), mask=flagged)
        tl.store(flag_threshold_ptr + slot, threshold, mask=flagged)
        write = row_mask & ~flagged
    return row_idx, write


@triton.jit
def _search_kernel(
    # pointers: raw inputs, prepared operands, per-split results, per-row data, outputs
    z_ptr, codebook_ptr, z_op_ptr, z_tail_ptr, z_tail2_ptr, codes_ptr, codes_tail_ptr, half_norm_ptr,
    part_score_ptr, part_second_ptr, part_idx_ptr, inexact_ptr, row_norm_ptr, scratch_ptr, flag_rows_ptr,
    flag_threshold_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr, z_inv_ptr, code_inv_ptr,
    # sizes and the error bound's coefficients (settle_bound); n_bucket only keys the autotuning
    N, D, K_PAD, codes_per_split, n_bucket, bound_rel, bound_norm, bound_abs,
    # strides of the raw inputs (for the gather)
    stride_zn, stride_zd, stride_ck, stride_cd,
    # meta-parameters; D_PAD: the operands' row length
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    Z_TERMS: tl.constexpr, SPLIT: tl.constexpr, SETTLE: tl.constexpr, ONLY_FLAGGED: tl.constexpr,
    SPLIT_K: tl.constexpr, WANT_QUANTIZED: tl.constexpr, WANT_STATS: tl.constexpr, GATHER_D: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    """Nearest code of BLOCK_N rows of z among codes [pid_s * codes_per_split, ...).

    D_PAD == BLOCK_D: the z operands are loaded once, before the codebook loop.
    D_PAD > BLOCK_D (split-D, wide rows): z chunks are loaded inside the loop.
    SETTLE: the second-best score is kept too. ONLY_FLAGGED: the 16-bit re-scoring pass: skip
    blocks without flagged rows, write only those. SPLIT_K: the codebook is split across programs.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    store_mask = row_mask
    if ONLY_FLAGGED:
        flagged = tl.load(inexact_ptr + rows64, mask=row_mask, other=0) != 0
        if tl.max(flagged.to(tl.int32), axis=0) == 0:
            return
        store_mask = row_mask & flagged

    z0 = tl.zeros((BLOCK_N, BLOCK_D), DOT_DTYPE)
    z1 = z0
    z2 = z0
    if D_PAD == BLOCK_D:  # operand rows are padded to a multiple of every BLOCK_N: no masks
        d = tl.arange(0, D_PAD)
        z0, z1, z2 = _load_z_operands(z_op_ptr, z_tail_ptr, z_tail2_ptr, rows64[:, None] * D_PAD + d[None, :],
                                      store_mask, DOT_DTYPE, Z_TERMS, ONLY_FLAGGED)
    cols = tl.arange(0, BLOCK_K)
    k_begin = pid_s * codes_per_split
    k_end = tl.minimum(k_begin + codes_per_split, K_PAD)
    best = tl.full((BLOCK_N, BLOCK_K), float("inf"), ACC_DTYPE)
    second = tl.full((BLOCK_N, BLOCK_K), float("inf"), ACC_DTYPE)
    best_base = tl.full((BLOCK_N, BLOCK_K), k_begin, tl.int32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        score = _tile_scores(z0, z1, z2, z_op_ptr, z_tail_ptr, z_tail2_ptr, codes_ptr, codes_tail_ptr,
                             half_norm_ptr, rows64, (k0 + cols).to(tl.int64), store_mask, D_PAD == BLOCK_D,
                             BLOCK_N, BLOCK_K, D_PAD,
                             BLOCK_D, ACC_DTYPE, DOT_DTYPE, PRECISION, Z_TERMS, SPLIT, ONLY_FLAGGED)
        # Strict <: a column keeps its earliest (lowest) code on ties. Scores are never NaN
        # (non-finite rows are zeroed, non-finite codes score +inf).
        better = score < best
        if SETTLE:
            second = tl.minimum(second, tl.maximum(score, best))
        best = tl.where(better, score, best)
        best_base = tl.where(better, k0, best_base)

    # One argmin: the lowest index among the columns that hold the row's best score. A row
    # whose scores are all +inf keeps k_begin, a real code.
    row_best = tl.min(best, axis=1)
    candidates = tl.where(best == row_best[:, None], best_base + cols[None, :], 2147483647)
    row_idx = tl.min(candidates, axis=1)
    row_second = row_best
    if SETTLE:  # the best of the other columns, or the second best of the argmin's column
        own = (best_base + cols[None, :]) == row_idx[:, None]
        row_second = tl.min(tl.where(own, second, best), axis=1)
    if SPLIT_K:
        out = pid_s * N + rows64
        tl.store(part_score_ptr + out, row_best, mask=store_mask)
        if SETTLE:
            tl.store(part_second_ptr + out, row_second, mask=store_mask)
        tl.store(part_idx_ptr + out, row_idx, mask=store_mask)
    else:
        row_idx, write = _settle_rows(rows64, store_mask, row_best, row_second, row_idx, row_norm_ptr, scratch_ptr,
                                      flag_rows_ptr, flag_threshold_ptr, bound_rel, bound_norm, bound_abs, SETTLE)
        _write_rows(z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr, z_inv_ptr,
                    code_inv_ptr, rows64, write, row_idx, D, stride_zn, stride_zd, stride_ck, stride_cd, GATHER_D,
                    WANT_QUANTIZED, WANT_STATS, NORMALIZE)


@triton.jit
def _merge_kernel(
    # pointers
    part_score_ptr, part_second_ptr, part_idx_ptr, row_norm_ptr, scratch_ptr, flag_rows_ptr, flag_threshold_ptr,
    z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr, z_inv_ptr, code_inv_ptr,
    # sizes and the error bound's coefficients
    N, D, splits, bound_rel, bound_norm, bound_abs,
    # strides
    stride_zn, stride_zd, stride_ck, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, SETTLE: tl.constexpr,
    WANT_QUANTIZED: tl.constexpr, WANT_STATS: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """The lexicographic (score, index) minimum over the splits (SETTLE: and the second-best
    score: the winner's second or another split's best), then the rows' outputs."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    best = tl.full((BLOCK_N,), float("inf"), ACC_DTYPE)
    second = tl.full((BLOCK_N,), float("inf"), ACC_DTYPE)
    best_idx = tl.load(part_idx_ptr + rows64, mask=row_mask, other=0)  # split 0: all +inf keeps its index
    for s in range(0, splits):
        score = tl.load(part_score_ptr + s * N + rows64, mask=row_mask, other=float("inf"))
        idx = tl.load(part_idx_ptr + s * N + rows64, mask=row_mask, other=0)
        better = (score < best) | ((score == best) & (idx < best_idx))
        if SETTLE:
            own_second = tl.load(part_second_ptr + s * N + rows64, mask=row_mask, other=float("inf"))
            second = tl.where(better, tl.minimum(best, own_second), tl.minimum(second, score))
        best = tl.where(better, score, best)
        best_idx = tl.where(better, idx, best_idx)
    best_idx, write = _settle_rows(rows64, row_mask, best, second, best_idx, row_norm_ptr, scratch_ptr, flag_rows_ptr,
                                   flag_threshold_ptr, bound_rel, bound_norm, bound_abs, SETTLE)
    _write_rows(z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr, z_inv_ptr,
                code_inv_ptr, rows64, write, best_idx, D, stride_zn, stride_zd, stride_ck, stride_cd, BLOCK_D,
                WANT_QUANTIZED, WANT_STATS, NORMALIZE)


@triton.jit
def _rescore_kernel(
    # pointers: raw inputs, prepared operands, the rows to settle, outputs
    z_ptr, codebook_ptr, z_op_ptr, z_tail_ptr, codes_ptr, codes_tail_ptr, half_norm_ptr,
    scratch_ptr, flag_rows_ptr, flag_threshold_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr,
    z_inv_ptr, code_inv_ptr,
    # sizes
    K, D, K_PAD,
    # strides of the raw inputs
    stride_zn, stride_zd, stride_ck, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    EXACT_D: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    Z_TERMS: tl.constexpr, SPLIT: tl.constexpr, WANT_QUANTIZED: tl.constexpr, WANT_STATS: tl.constexpr,
    GATHER_D: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """Settles the rows the search flagged (their number is read here, on the device): scores
    every code again, and computes the float64 distance sum((z - e)^2) from the original
    values for the codes whose score is within the row's threshold (every code that can be the
    nearest); the smallest wins, ties to the lowest index (NORMALIZE: between the l2-normalised
    vectors). The programs take blocks of the flagged rows in turn, so a fixed grid covers any count."""
    count = tl.load(scratch_ptr).to(tl.int32)
    cols = tl.arange(0, BLOCK_K)
    for first in range(tl.program_id(0) * BLOCK_N, count, tl.num_programs(0) * BLOCK_N):
        slots = first + tl.arange(0, BLOCK_N)
        valid = slots < count
        rows64 = tl.load(flag_rows_ptr + slots, mask=valid, other=0).to(tl.int64)
        threshold = tl.load(flag_threshold_ptr + slots, mask=valid, other=float("-inf"))
        best = tl.full((BLOCK_N,), float("inf"), tl.float64)
        best_idx = tl.zeros((BLOCK_N,), tl.int32)
        z_inv = _inverse_norms(z_inv_ptr, rows64, valid, NORMALIZE)
        unused = tl.zeros((BLOCK_N, BLOCK_D), DOT_DTYPE)
        for k0 in range(0, K_PAD, BLOCK_K):
            codes = k0 + cols
            score = _tile_scores(unused, unused, unused, z_op_ptr, z_tail_ptr, z_tail_ptr, codes_ptr, codes_tail_ptr,
                                 half_norm_ptr, rows64, codes.to(tl.int64), valid, False, BLOCK_N, BLOCK_K, D_PAD,
                                 BLOCK_D,
                                 ACC_DTYPE, DOT_DTYPE, PRECISION, Z_TERMS, SPLIT, False)
            candidate = score <= threshold[:, None]
            if tl.max(tl.max(candidate.to(tl.int32), axis=1), axis=0) > 0:
                dist = tl.zeros((BLOCK_N, BLOCK_K), tl.float64)
                code_inv = _inverse_norms(code_inv_ptr, codes, codes < K, NORMALIZE)
                for d0 in range(0, D, EXACT_D):
                    d = d0 + tl.arange(0, EXACT_D)
                    z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd,
                                mask=valid[:, None] & (d < D)[None, :], other=0.0)
                    e = tl.load(codebook_ptr + codes.to(tl.int64)[:, None] * stride_ck + d[None, :] * stride_cd,
                                mask=(codes < K)[:, None] & (d < D)[None, :], other=0.0)
                    z = unit_rows(z, z_inv, NORMALIZE).to(tl.float64)
                    e = unit_rows(e, code_inv, NORMALIZE).to(tl.float64)
                    diff = z[:, None, :] - e[None, :, :]
                    dist += tl.sum(diff * diff, axis=2)
                dist = tl.where(candidate, dist, float("inf"))
                tile_best = tl.min(dist, axis=1)
                tile_idx = tl.min(tl.where(dist == tile_best[:, None], codes[None, :], 2147483647), axis=1)
                better = tile_best < best  # strict: an earlier tile keeps its (lower) index on ties
                best_idx = tl.where(better, tile_idx, best_idx)
                best = tl.where(better, tile_best, best)
        _write_rows(z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr, z_inv_ptr,
                    code_inv_ptr, rows64, valid, best_idx, D, stride_zn, stride_zd, stride_ck, stride_cd, GATHER_D,
                    WANT_QUANTIZED, WANT_STATS, NORMALIZE)


@triton.jit
def _loss_kernel(row_err_ptr, loss_ptr, N, scale_head, scale_tail, BLOCK: tl.constexpr):
    """loss = scale * sum(row_err), summed in float64 in a fixed order, stored in loss_ptr's dtype (fp32 or fp64)."""
    total = tl.zeros((BLOCK,), tl.float64)
    for i in range(0, N, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        total += tl.load(row_err_ptr + offs, mask=offs < N, other=0.0)
    total = tl.sum(total, axis=0)
    head = total * scale_head
    loss = head + total * scale_tail  # see fp32_pair
    # total = +inf (distances past float64's range): inf times a zero or negative tail is NaN; the loss is inf
    tl.store(loss_ptr, tl.where(loss == loss, loss, head))


# ----------------------------------------------------------------------------- autotuning


def _prune(configs, named_args, **kwargs):
    z = named_args["z_ptr"]
    mode = mode_for(z.dtype)
    machine = machine_for(z.device)
    kept = [c for c in configs
            if keep_config(c, machine, named_args["N"], kwargs["D_PAD"], kwargs["BLOCK_D"], mode)]
    return kept or configs[-1:]


_search_tuned = triton.autotune(
    configs=search_configs(SM90),
    key=["n_bucket", "K_PAD", "D_PAD", "BLOCK_D", "codes_per_split", "Z_TERMS", "SPLIT", "PRECISION",
         "WANT_QUANTIZED", "WANT_STATS", "NORMALIZE"],
    prune_configs_by={"early_config_prune": _prune},
)(_search_kernel)


# ----------------------------------------------------------------------------- launchers


def _search(z: torch.Tensor, codebook: torch.Tensor, want_quantized: bool, stats: CodeStats | None = None,
            normalize: bool = False):
    """(indices, quantized or None, per-row float64 squared error or None, normalize: the rows'
    (N,) fp64 1 / max(|z|, eps)); `stats` filled in. `normalize`: the search, the outputs and
    the statistics are those of the l2-normalised rows and codes."""
    N, D = z.shape
    K = codebook.shape[0]
    plan = plan_search(N, K, D, z.dtype, machine_for(z.device))
    mode = plan.mode
    ops = prepare_operands(z, codebook, plan, stats, normalize)

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device=z.device)

    split = plan.splits > 1
    indices = empty(N, dtype=torch.long)
    quantized = empty(N, D, dtype=codebook.dtype) if want_quantized else None
    row_err = empty(N, dtype=torch.float64) if want_quantized else None
    part_score = empty(plan.splits, N, dtype=mode.acc) if split else None
    part_second = empty(plan.splits, N, dtype=mode.acc) if split and mode.settle else None
    part_idx = empty(plan.splits, N, dtype=torch.int32) if split else None
    flag_rows = empty(N, dtype=torch.int32) if mode.settle else None
    flag_threshold = empty(N, dtype=mode.acc) if mode.settle else None
    bound = settle_bound(mode, plan.d_pad) if mode.settle else (0.0, 0.0, 0.0)
    strides = (z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1))
    outputs = (indices, quantized, row_err, *(stats[:2] if stats else (None, None)), ops.z_inv, ops.code_inv)
    level = stats.level if stats else 0
    # n_bucket = min(N.bit_length(), 20): one autotuning per power of two of N up to 2^20 rows (not
    # measured: the tile's best is assumed not to change beyond a million rows).
    args = (z, codebook, *ops[:6], part_score, part_second, part_idx, ops.inexact, ops.row_norm, ops.scratch,
            flag_rows, flag_threshold, *outputs,
            N, D, plan.k_pad, plan.codes_per_split, min(N.bit_length(), 20), *bound, *strides)

    meta = search_meta(plan, mode, want_quantized=want_quantized, want_stats=level, normalize=normalize)
    if plan.machine.interpreted:
        config = search_configs(plan.machine)[0]
        _search_kernel[(triton.cdiv(N, config.kwargs["BLOCK_N"]), plan.splits)](
            *args, **config.all_kwargs(), **meta)
    else:
        _search_tuned[lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]), plan.splits)](*args, **meta)
    if mode.flag_inexact:  # re-score the row blocks holding a row whose z - c is not exact in 16 bits
        rescoring, config = rescoring_plan(plan)
        _search_kernel[(triton.cdiv(N, config.kwargs["BLOCK_N"]), plan.splits)](
            *args, **config.all_kwargs(),
            **search_meta(rescoring, rescoring.mode, want_quantized=want_quantized, only_flagged=True,
                          normalize=normalize))
    if split:
        meta = merge_meta(plan, want_quantized, level, normalize)
        _merge_kernel[(triton.cdiv(N, meta["BLOCK_N"]),)](
            part_score, part_second, part_idx, ops.row_norm, ops.scratch, flag_rows, flag_threshold,
            z, codebook, *outputs, N, D, plan.splits, *bound, *strides, **meta)
    if mode.settle:
        _rescore_kernel[(rescore_programs(N, plan.machine),)](
            z, codebook, ops.z_op, ops.z_tail, ops.codes, ops.codes_tail, ops.half_norm, ops.scratch, flag_rows,
            flag_threshold, *outputs, K, D, plan.k_pad, *strides,
            **rescore_meta(plan, want_quantized, level, normalize), num_warps=RESCORE_WARPS)
    return indices, quantized, row_err, ops.z_inv


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """indices (N,) int64 of the nearest codes: no gather, no loss."""
    if z.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    if z.shape[1] == 0:  # every code is at distance 0: the lowest index wins
        return torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    return _search(z, codebook, want_quantized=False)[0]


def quantize_fwd(z: torch.Tensor, codebook: torch.Tensor, beta: float, stats: CodeStats | None = None,
                 normalize: bool = False):
    """quantized (N, D) = codebook[indices], indices (N,) int64, loss () in z.dtype; `stats`
    (zeroed and) filled in by the search. `normalize` (the cosine quantizer): all of it between
    the l2-normalised rows of z and codes (`triton_prepare.unit_rows`), so quantized is the
    normalised code."""
    return _quantize(z, codebook, beta, stats, normalize)[:3]


def _quantize(z, codebook, beta, stats, normalize):
    """quantize_fwd, and (normalize, N > 0) the rows' 1 / max(|z|, eps) (else None)."""
    N, D = z.shape
    if N == 0 or D == 0:
        indices = torch.zeros(N, dtype=torch.long, device=z.device)
        quantized = torch.empty((N, D), dtype=codebook.dtype, device=z.device)
        if stats is not None:
            stats.counts.zero_()
            if stats.sums is not None:
                stats.sums.zero_()
        return quantized, indices, torch.full((), float("nan"), dtype=z.dtype, device=z.device), None
    indices, quantized, row_err, z_inv = _search(z, codebook, want_quantized=True, stats=stats, normalize=normalize)
    # 16-bit: stored as fp32 and converted by torch (the interpreter's conversion of values
    # below the 16-bit range is wrong: 7e-45 became 5.9e-39)
    loss = torch.empty((), dtype=z.dtype if z.dtype.itemsize >= 4 else torch.float32, device=z.device)
    _loss_kernel[(1,)](row_err, loss, N, *fp32_pair((1.0 + beta) / (N * D)), BLOCK=LOSS_BLOCK)
    return quantized, indices, loss.to(z.dtype), z_inv


def quantize_stats_fwd(z: torch.Tensor, codebook: torch.Tensor, beta: float, with_sums: bool,
                       normalize: bool = False):
    """quantize_fwd and the per-code statistics a VectorQuantizer step needs: counts (K,) fp32
    and, with_sums, the sums of each code's rows of z (K, D) (fp32; fp64 for fp64 z; normalize:
    of the normalised rows), from the search's epilogue. Under torch.use_deterministic_algorithms
    the sums are fixed-order segment sums (triton_quantize_bwd.code_sums) instead of atomics;
    counts are exact either way. 16-bit inputs (whose rows may be written twice) count after the search."""
    K, D = codebook.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    counts = torch.empty(K, dtype=torch.float32, device=z.device)
    sums = torch.empty((K, D) if with_sums else (0,), dtype=acc, device=z.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    fused = not mode_for(z.dtype).flag_inexact
    level = 2 if with_sums and not deterministic else 1
    quantized, indices, loss, z_inv = _quantize(z, codebook, beta, CodeStats(counts, sums, level) if fused else None,
                                                normalize)
    if not fused:
        code_counts_and_sums(z, indices, counts, sums if level == 2 else None, z_inv)
    if with_sums and level == 1:
        code_sums(z, indices, sums, z_inv)
    return quantized, indices, loss, counts, sums
