"""Triton nearest-code search and its fused straight-through backward.

Read top to bottom: the kernels, the search plan (tiles, splits, autotuning), the launchers
(check, allocate, launch). Registration as torch custom ops is in `triton_ops.py`.

Forward of z (N, D) against a codebook (K, D), in three to six launches, none of them N x K
(`tests/test_triton_nearest_code.py` counts them):

1. `_codebook_stats_kernel`: per column, the sum, count, min and max of the finite entries.
2. `_prepare_kernel`: both operands centred on the centre c (the column means, see
   `_column_centre`) and converted once, into the form `tl.dot` takes, padded with zeros:
   the codes (K_PAD, D_PAD) with 1/2 ||e - c||^2 per code (+inf for codes with a NaN/Inf
   entry and for padding, so they are never chosen), and z (N_PAD, D_PAD). O((N + K) D).
3. `_search_kernel`: one program per BLOCK_N rows of z (times a split of the codebook when
   there are too few row blocks to fill the GPU). It loads its z tile once, before the
   codebook loop (D <= 512; wider rows are streamed in chunks, split-D), then feeds codebook
   tiles straight into `tl.dot`; the score 1/2 ||e - c||^2 - (z - c).(e - c) (= 1/2 ||z - e||^2
   minus a per-row constant) updates a running element-wise best, and one argmin at the end
   keeps the lowest index on exact ties. Without a split it also writes the indices, gathers
   `quantized` and the per-row squared error; with one, it writes a (score, index) per split.
   16-bit: a second, re-scoring launch of the same kernel (see Precision), a no-op for every
   row block without a flagged row.
4. `_merge_kernel` (split codebook only): the lexicographic (score, index) minimum over the
   splits, then the rows' outputs.
5. `_loss_kernel` (`quantize_fwd` only): the loss from the per-row errors, in a fixed order.

Precision. Scores are computed on values centred on the codebook mean, so a large common
offset cannot cancel. fp64: fp64 dot. fp32 on GPUs: 3xTF32 with both operands split once
into a TF32 head and an fp32 tail: the dot is head.head + head.tail + tail.head, near-fp32
accurate (plain TF32 flips neighbours). 16-bit: the centre of a column is zero unless the
column's finite entries lie in a narrow band around their mean, and then it is that mean
rounded to 16 bits; either way every centred code is exact in 16 bits (`_column_centre`),
and so is every z entry near the codebook, so the 16-bit products of the one tensor-core dot
are exact and summed in fp32. Rows whose centred z is not exact in 16 bits are flagged, and
the re-scoring launch scores their row blocks again with z as three 16-bit terms (exact).

Backward: grad_z is element-wise; grad_codebook is a scatter-add by index, done with float
atomics, or (under torch.use_deterministic_algorithms) as fixed-order segment sums over
the indices sorted once. Each is skipped when its input does not need a gradient.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from . import triton_interpreting as interpreting

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _codebook_stats_kernel(
    # pointers; stats: (programs, 4, D_PAD) ACC_DTYPE
    codebook_ptr, stats_ptr,
    # sizes
    K, D, rows_per_program,
    # strides
    stride_ck, stride_cd,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """stats[p, :, d] = (sum, count, min, max) of the finite entries of column d in rows of program p."""
    pid = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, K)
    total = tl.zeros((BLOCK_D,), ACC_DTYPE)
    count = tl.zeros((BLOCK_D,), ACC_DTYPE)
    low = tl.full((BLOCK_D,), float("inf"), ACC_DTYPE)
    high = tl.full((BLOCK_D,), float("-inf"), ACC_DTYPE)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < end)[:, None] & d_mask[None, :]
        x = tl.load(codebook_ptr + r.to(tl.int64)[:, None] * stride_ck + d[None, :] * stride_cd,
                    mask=mask, other=0.0).to(ACC_DTYPE)
        ok = mask & (tl.abs(x) < float("inf"))  # finite: NaN fails the comparison
        total += tl.sum(tl.where(ok, x, 0.0), axis=0)
        count += tl.sum(ok.to(ACC_DTYPE), axis=0)
        low = tl.minimum(low, tl.min(tl.where(ok, x, float("inf")), axis=0))
        high = tl.maximum(high, tl.max(tl.where(ok, x, float("-inf")), axis=0))
    out = stats_ptr + pid * 4 * D_PAD + d
    tl.store(out, total, mask=d_mask)
    tl.store(out + D_PAD, count, mask=d_mask)
    tl.store(out + 2 * D_PAD, low, mask=d_mask)
    tl.store(out + 3 * D_PAD, high, mask=d_mask)


@triton.jit
def _tf32_head(x):
    """x with its 13 low mantissa bits cleared: exact in TF32, and x - head is exact in fp32."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _column_centre(stats_ptr, stat_programs, d, d_mask,
                   D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, CODE_DTYPE: tl.constexpr,
                   NARROW_CENTRE: tl.constexpr):
    """The centre c: the mean of each column's finite entries, from the stats partials.

    NARROW_CENTRE (16-bit codes): c_d = 0 unless column d's finite entries satisfy
    max - min <= |mean| / 4, and then c_d = the mean rounded to 16 bits. Every centred entry
    e - c_d is then exact in 16 bits: trivially for c_d = 0; otherwise e and c_d lie within
    [0.74, 1.26] |mean| of each other, so both are multiples of the unit u of the lower one's
    binade (u > 0.37 |mean| 2^(1-p), p = 8 or 11 significant bits) and |e - c_d| < 0.26 |mean|
    < 2^p u: e - c_d is a multiple of u with at most p significant bits.
    """
    total = tl.zeros((D_PAD,), ACC_DTYPE)
    count = tl.zeros((D_PAD,), ACC_DTYPE)
    low = tl.full((D_PAD,), float("inf"), ACC_DTYPE)
    high = tl.full((D_PAD,), float("-inf"), ACC_DTYPE)
    for p in range(0, stat_programs):  # a fixed order: every program gets the same centre
        part = stats_ptr + p * 4 * D_PAD + d
        total += tl.load(part, mask=d_mask, other=0.0)
        count += tl.load(part + D_PAD, mask=d_mask, other=0.0)
        low = tl.minimum(low, tl.load(part + 2 * D_PAD, mask=d_mask, other=float("inf")))
        high = tl.maximum(high, tl.load(part + 3 * D_PAD, mask=d_mask, other=float("-inf")))
    mean = total / tl.maximum(count, 1.0)
    if NARROW_CENTRE:
        narrow = (count > 0) & (high - low <= 0.25 * tl.abs(mean))
        return tl.where(narrow, mean.to(CODE_DTYPE).to(ACC_DTYPE), 0.0)
    return mean


@triton.jit
def _prepare_kernel(
    # pointers: inputs and stats; outputs: the centre, code operands and half norms, z
    # operands and (16-bit) the per-row inexact flags
    codebook_ptr, z_ptr, stats_ptr, centre_ptr, codes_ptr, codes_tail_ptr, half_norm_ptr,
    z_op_ptr, z_tail_ptr, z_tail2_ptr, inexact_ptr,
    # sizes: code operands are (K_PAD, WIDTH), z operands (N_PAD, WIDTH), zero beyond (K or N, D)
    K, N, D, K_PAD, N_PAD, WIDTH, stat_programs, code_programs,
    # strides
    stride_ck, stride_cd, stride_zn, stride_zd,
    # meta-parameters; D_PAD: a power of two >= WIDTH
    BLOCK_R: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, CODE_DTYPE: tl.constexpr,
    SPLIT_TF32: tl.constexpr, NARROW_CENTRE: tl.constexpr, FLAG_INEXACT: tl.constexpr,
    CODE_MAX: tl.constexpr,
):
    """Centre both operands once per call, in the form `tl.dot` takes (programs below
    code_programs do BLOCK_R codes each, the others BLOCK_R rows of z).

    Codes: centred, as TF32 head + tail (3xTF32) or in CODE_DTYPE; 1/2 ||e - c||^2, +inf for
    codes with a NaN/Inf entry and for padding, so that they are never chosen.
    z: centred, as TF32 head + tail, or in CODE_DTYPE. 16-bit: a row whose centred values are
    not all exact in 16 bits is flagged, and its two 16-bit remainder terms are written (the
    three terms sum to z - c exactly, up to fp16 underflow) for the re-scoring pass.
    """
    pid = tl.program_id(0)
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    centre = _column_centre(stats_ptr, stat_programs, d, d_mask, D_PAD, ACC_DTYPE, CODE_DTYPE, NARROW_CENTRE)
    is_code = pid < code_programs
    rows = (pid - tl.where(is_code, 0, code_programs)) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    out = rows64[:, None] * WIDTH + d[None, :]
    if is_code:
        if pid == 0:
            tl.store(centre_ptr + d, centre)
        row_ok = rows < K
        mask = row_ok[:, None] & d_mask[None, :]
        x = tl.load(codebook_ptr + rows64[:, None] * stride_ck + d[None, :] * stride_cd,
                    mask=mask, other=0.0).to(ACC_DTYPE)
        non_finite = tl.sum((mask & ~(tl.abs(x) < float("inf"))).to(tl.int32), axis=1)
        row_ok = row_ok & (non_finite == 0)
        centred = tl.where(row_ok[:, None] & d_mask[None, :], x - centre[None, :], 0.0)
        half_norm = 0.5 * tl.sum(centred * centred, axis=1)
        in_buffer = rows < K_PAD
        tl.store(half_norm_ptr + rows64, tl.where(row_ok, half_norm, float("inf")), mask=in_buffer)
        out_mask = in_buffer[:, None] & (d < WIDTH)[None, :]
        if SPLIT_TF32:
            head = _tf32_head(centred)
            tl.store(codes_ptr + out, head, mask=out_mask)
            tl.store(codes_tail_ptr + out, centred - head, mask=out_mask)
        else:
            tl.store(codes_ptr + out, centred.to(CODE_DTYPE), mask=out_mask)
    else:
        row_ok = rows < N
        mask = row_ok[:, None] & d_mask[None, :]
        x = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd,
                    mask=mask, other=0.0).to(ACC_DTYPE)
        centred = tl.where(mask, x - centre[None, :], 0.0)
        out_mask = (rows < N_PAD)[:, None] & (d < WIDTH)[None, :]
        if SPLIT_TF32:
            head = _tf32_head(centred)
            tl.store(z_op_ptr + out, head, mask=out_mask)
            tl.store(z_tail_ptr + out, centred - head, mask=out_mask)
        elif FLAG_INEXACT:
            term0 = tl.clamp(centred, -CODE_MAX, CODE_MAX).to(CODE_DTYPE)  # fp16 z - c can pass 65504
            rest = centred - term0.to(ACC_DTYPE)
            tl.store(z_op_ptr + out, term0, mask=out_mask)
            # Only finite remainders: re-scoring cannot help a NaN/Inf row.
            inexact = tl.max(((rest != 0) & (tl.abs(rest) < float("inf"))).to(tl.int8), axis=1)
            tl.store(inexact_ptr + rows64, inexact, mask=rows < N_PAD)
            term1 = rest.to(CODE_DTYPE)
            rest = rest - term1.to(ACC_DTYPE)
            flagged = out_mask & (inexact != 0)[:, None]
            tl.store(z_tail_ptr + out, term1, mask=flagged)
            tl.store(z_tail2_ptr + out, rest.to(CODE_DTYPE), mask=flagged)
        else:
            tl.store(z_op_ptr + out, centred.to(CODE_DTYPE), mask=out_mask)


@triton.jit
def _tile_dot(z0, z1, z2, codes_ptr, codes_tail_ptr, offsets, acc,
              DOT_DTYPE: tl.constexpr, Z_TERMS: tl.constexpr, SPLIT_TF32: tl.constexpr,
              PRECISION: tl.constexpr):
    """acc += (z - c) . (e - c)^T for one codebook tile, from the prepared operands."""
    # out_dtype names the accumulator type: Triton 3.6 asserts it equals acc.dtype (fp64 too).
    e = tl.load(codes_ptr + offsets).to(DOT_DTYPE)  # a no-op cast except in the interpreter (bf16)
    acc = tl.dot(z0, tl.trans(e), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    if SPLIT_TF32:  # head.head + head.tail + tail.head
        tail = tl.load(codes_tail_ptr + offsets)
        acc = tl.dot(z0, tl.trans(tail), acc, input_precision=PRECISION, out_dtype=acc.dtype)
        acc = tl.dot(z1, tl.trans(e), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    elif Z_TERMS == 3:  # 16-bit re-scoring: (term0 + term1 + term2) . e, exact products
        acc = tl.dot(z1, tl.trans(e), acc, input_precision=PRECISION, out_dtype=acc.dtype)
        acc = tl.dot(z2, tl.trans(e), acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return acc


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
def _write_rows(z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr,
                rows64, store_mask, idx, D, stride_zn, stride_zd, stride_ck, stride_cd,
                BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, WANT_QUANTIZED: tl.constexpr):
    """indices[rows] = idx; with WANT_QUANTIZED also quantized[rows] = codebook[idx] and the
    rows' exact squared error sum((z - e)^2)."""
    tl.store(indices_ptr + rows64, idx.to(tl.int64), mask=store_mask)
    if WANT_QUANTIZED:
        idx64 = idx.to(tl.int64)
        sq_err = tl.zeros(idx.shape, ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = store_mask[:, None] & (d < D)[None, :]
            z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd, mask=mask, other=0.0)
            e = tl.load(codebook_ptr + idx64[:, None] * stride_ck + d[None, :] * stride_cd, mask=mask, other=0.0)
            tl.store(quantized_ptr + rows64[:, None] * D + d[None, :], e, mask=mask)
            diff = z.to(ACC_DTYPE) - e.to(ACC_DTYPE)
            sq_err += tl.sum(diff * diff, axis=1)
        tl.store(row_err_ptr + rows64, sq_err, mask=store_mask)


@triton.jit
def _search_kernel(
    # pointers: raw inputs, prepared operands, per-split results, per-row flags, outputs
    z_ptr, codebook_ptr, z_op_ptr, z_tail_ptr, z_tail2_ptr, codes_ptr, codes_tail_ptr, half_norm_ptr,
    part_score_ptr, part_idx_ptr, inexact_ptr, indices_ptr, quantized_ptr, row_err_ptr,
    # sizes; n_bucket only keys the autotuning
    N, D, K_PAD, codes_per_split, n_bucket,
    # strides of the raw inputs (for the gather)
    stride_zn, stride_zd, stride_ck, stride_cd,
    # meta-parameters; D_PAD: the operands' row length
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    Z_TERMS: tl.constexpr, SPLIT_TF32: tl.constexpr, ONLY_FLAGGED: tl.constexpr, SPLIT: tl.constexpr,
    WANT_QUANTIZED: tl.constexpr, GATHER_D: tl.constexpr,
):
    """Nearest code of BLOCK_N rows of z among codes [pid_s * codes_per_split, ...).

    D_PAD == BLOCK_D: the z operands are loaded once, before the codebook loop.
    D_PAD > BLOCK_D (split-D, wide rows): z chunks are loaded inside the loop.
    ONLY_FLAGGED: the 16-bit re-scoring pass: skip blocks without flagged rows, write only those.
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

    if D_PAD == BLOCK_D:  # operand rows are padded to a multiple of every BLOCK_N: no masks
        d = tl.arange(0, D_PAD)
        z0, z1, z2 = _load_z_operands(z_op_ptr, z_tail_ptr, z_tail2_ptr, rows64[:, None] * D_PAD + d[None, :],
                                      store_mask, DOT_DTYPE, Z_TERMS, ONLY_FLAGGED)
    cols = tl.arange(0, BLOCK_K)
    k_begin = pid_s * codes_per_split
    k_end = tl.minimum(k_begin + codes_per_split, K_PAD)
    best = tl.full((BLOCK_N, BLOCK_K), float("inf"), ACC_DTYPE)
    best_base = tl.full((BLOCK_N, BLOCK_K), k_begin, tl.int32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        codes = (k0 + cols).to(tl.int64)
        if D_PAD == BLOCK_D:
            acc = _tile_dot(z0, z1, z2, codes_ptr, codes_tail_ptr, codes[:, None] * D_PAD + d[None, :],
                            tl.zeros((BLOCK_N, BLOCK_K), ACC_DTYPE), DOT_DTYPE, Z_TERMS, SPLIT_TF32, PRECISION)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), ACC_DTYPE)
            for d0 in range(0, D_PAD, BLOCK_D):
                dc = d0 + tl.arange(0, BLOCK_D)
                c0, c1, c2 = _load_z_operands(z_op_ptr, z_tail_ptr, z_tail2_ptr,
                                              rows64[:, None] * D_PAD + dc[None, :], store_mask, DOT_DTYPE, Z_TERMS,
                                              ONLY_FLAGGED)
                acc = _tile_dot(c0, c1, c2, codes_ptr, codes_tail_ptr, codes[:, None] * D_PAD + dc[None, :], acc,
                                DOT_DTYPE, Z_TERMS, SPLIT_TF32, PRECISION)
        half_norm = tl.load(half_norm_ptr + codes)
        score = half_norm[None, :] - acc
        # Strict <: a column keeps its earliest (lowest) code on ties; NaN never wins.
        better = score < best
        best = tl.where(better, score, best)
        best_base = tl.where(better, k0, best_base)

    # One argmin: the lowest index among the columns that hold the row's best score. A row
    # whose scores are all +inf or NaN keeps k_begin, a real code.
    row_best = tl.min(best, axis=1)
    candidates = tl.where(best == row_best[:, None], best_base + cols[None, :], 2147483647)
    row_idx = tl.min(candidates, axis=1)
    if SPLIT:
        out = pid_s * N + rows64
        tl.store(part_score_ptr + out, row_best, mask=store_mask)
        tl.store(part_idx_ptr + out, row_idx, mask=store_mask)
    else:
        _write_rows(z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, rows64, store_mask, row_idx,
                    D, stride_zn, stride_zd, stride_ck, stride_cd, GATHER_D, ACC_DTYPE, WANT_QUANTIZED)


@triton.jit
def _merge_kernel(
    # pointers
    part_score_ptr, part_idx_ptr, z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr,
    # sizes
    N, D, splits,
    # strides
    stride_zn, stride_zd, stride_ck, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, WANT_QUANTIZED: tl.constexpr,
):
    """The lexicographic (score, index) minimum over the splits, then the rows' outputs."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    best = tl.full((BLOCK_N,), float("inf"), ACC_DTYPE)
    best_idx = tl.load(part_idx_ptr + rows64, mask=row_mask, other=0)  # split 0: all +inf keeps its index
    for s in range(0, splits):
        score = tl.load(part_score_ptr + s * N + rows64, mask=row_mask, other=float("inf"))
        idx = tl.load(part_idx_ptr + s * N + rows64, mask=row_mask, other=0)
        better = (score < best) | ((score == best) & (idx < best_idx))
        best = tl.where(better, score, best)
        best_idx = tl.where(better, idx, best_idx)
    _write_rows(z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, rows64, row_mask, best_idx,
                D, stride_zn, stride_zd, stride_ck, stride_cd, BLOCK_D, ACC_DTYPE, WANT_QUANTIZED)


@triton.jit
def _loss_kernel(row_err_ptr, loss_ptr, N, scale_head, scale_tail, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """loss = scale * sum(row_err), summed in a fixed order, stored in loss_ptr's dtype."""
    total = tl.zeros((BLOCK,), ACC_DTYPE)
    for i in range(0, N, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        total += tl.load(row_err_ptr + offs, mask=offs < N, other=0.0)
    total = tl.sum(total, axis=0)
    tl.store(loss_ptr, total * scale_head + total * scale_tail)  # in ACC_DTYPE: see fp32_pair


@triton.jit
def _grad_z_kernel(
    # pointers
    grad_q_ptr, z_ptr, codebook_ptr, indices_ptr, grad_loss_ptr, grad_z_ptr,
    # sizes and the loss scale 2 * beta / (N * D) as an fp32 pair (fp32_pair)
    N, D, scale_head, scale_tail,
    # strides
    stride_gn, stride_gd, stride_zn, stride_zd, stride_cn, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, ROTATION: tl.constexpr,
):
    """grad_z = grad_quantized (straight through, or rotated: ROTATION) + grad_loss * scale * (z - e_idx).

    The rotation trick: rot(g) = lam (g - 2 w (w . g) + 2 u (q . g)), u = z / |z|, q = e / |e|,
    lam = |e| / |z|, w = (u + q) / |u + q|, from per-row sums over D taken in two first passes;
    guards as in vqvae_fast/reference.py (g unchanged when lam is outside [1e-6, 1e6], w = 0 when
    |u + q| <= 1e-6)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    idx = tl.load(indices_ptr + rows64, mask=row_mask, other=0)
    grad_loss = tl.load(grad_loss_ptr).to(ACC_DTYPE)
    coef = grad_loss * scale_head + grad_loss * scale_tail  # in ACC_DTYPE: see fp32_pair
    g_rows = grad_q_ptr + rows64[:, None] * stride_gn
    z_rows = z_ptr + rows64[:, None] * stride_zn
    e_rows = codebook_ptr + idx[:, None] * stride_cn
    if ROTATION:
        zz = tl.zeros((BLOCK_N,), ACC_DTYPE)
        ee = tl.zeros((BLOCK_N,), ACC_DTYPE)
        gz = tl.zeros((BLOCK_N,), ACC_DTYPE)
        ge = tl.zeros((BLOCK_N,), ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (d < D)[None, :]
            g = tl.load(g_rows + d[None, :] * stride_gd, mask=mask, other=0.0).to(ACC_DTYPE)
            z = tl.load(z_rows + d[None, :] * stride_zd, mask=mask, other=0.0).to(ACC_DTYPE)
            e = tl.load(e_rows + d[None, :] * stride_cd, mask=mask, other=0.0).to(ACC_DTYPE)
            zz += tl.sum(z * z, axis=1)
            ee += tl.sum(e * e, axis=1)
            gz += tl.sum(g * z, axis=1)
            ge += tl.sum(g * e, axis=1)
        nz = tl.sqrt(zz)
        ne = tl.sqrt(ee)
        regular = (nz > 0.0) & (nz * 1e6 >= ne) & (ne * 1e6 >= nz)
        nz = tl.where(regular, nz, 1.0)
        ne = tl.where(regular, ne, 1.0)
        ss = tl.zeros((BLOCK_N,), ACC_DTYPE)  # |u + q|^2 summed directly (2 + 2 u.q cancels)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (d < D)[None, :]
            z = tl.load(z_rows + d[None, :] * stride_zd, mask=mask, other=0.0).to(ACC_DTYPE)
            e = tl.load(e_rows + d[None, :] * stride_cd, mask=mask, other=0.0).to(ACC_DTYPE)
            s = z / nz[:, None] + e / ne[:, None]
            ss += tl.sum(s * s, axis=1)
        ns = tl.sqrt(ss)
        reflect = ns <= 1e-6
        ns = tl.where(reflect, 1.0, ns)
        wg = tl.where(reflect, 0.0, (gz / nz + ge / ne) / ns)  # w . g
        qg = ge / ne
        lam = ne / nz
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        g = tl.load(g_rows + d[None, :] * stride_gd, mask=mask, other=0.0).to(ACC_DTYPE)
        z_raw = tl.load(z_rows + d[None, :] * stride_zd, mask=mask, other=0.0)
        z = z_raw.to(ACC_DTYPE)
        e = tl.load(e_rows + d[None, :] * stride_cd, mask=mask, other=0.0).to(ACC_DTYPE)
        if ROTATION:
            u = z / nz[:, None]
            w = tl.where(reflect[:, None], 0.0, (u + e / ne[:, None]) / ns[:, None])
            rotated = lam[:, None] * (g - 2.0 * w * wg[:, None] + 2.0 * u * qg[:, None])
            g = tl.where(regular[:, None], rotated, g)
        out = g + coef * (z - e)
        tl.store(grad_z_ptr + rows64[:, None] * D + d[None, :], out.to(z_raw.dtype), mask=mask)


@triton.jit
def _codebook_diff_atomic_kernel(
    # pointers; out: (K, D) ACC_DTYPE, zero-filled
    z_ptr, codebook_ptr, indices_ptr, out_ptr,
    # sizes
    N, D,
    # strides
    stride_zn, stride_zd, stride_cn, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """out[idx_i] += e_idx_i - z_i, with float atomics (fast, order not fixed)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    idx = tl.load(indices_ptr + rows64, mask=row_mask, other=0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd, mask=mask, other=0.0)
        e = tl.load(codebook_ptr + idx[:, None] * stride_cn + d[None, :] * stride_cd, mask=mask, other=0.0)
        tl.atomic_add(out_ptr + idx[:, None] * D + d[None, :], e.to(ACC_DTYPE) - z.to(ACC_DTYPE), mask=mask)


@triton.jit
def _codebook_diff_segment_kernel(
    # pointers; order: row ids sorted by code; starts: (K + 1,) segment bounds; out: (K, D)
    z_ptr, codebook_ptr, order_ptr, starts_ptr, out_ptr,
    # sizes
    D,
    # strides
    stride_zn, stride_zd, stride_cn, stride_cd,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """out[k] = count_k * e_k - sum of the z rows assigned to k, summed in a fixed order."""
    code = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < D
    start = tl.load(starts_ptr + code)
    end = tl.load(starts_ptr + code + 1)
    total = tl.zeros((BLOCK_D,), ACC_DTYPE)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < end
        rows = tl.load(order_ptr + r, mask=r_mask, other=0)
        z = tl.load(z_ptr + rows[:, None] * stride_zn + d[None, :] * stride_zd,
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        total += tl.sum(z.to(ACC_DTYPE), axis=0)
    e = tl.load(codebook_ptr + code * stride_cn + d * stride_cd, mask=d_mask, other=0.0)
    count = (end - start).to(ACC_DTYPE)
    tl.store(out_ptr + code * D + d, count * e.to(ACC_DTYPE) - total, mask=d_mask)


# ----------------------------------------------------------------------------- search plan

_TL_DTYPE = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}
_CODE_MAX = {torch.float16: 65504.0, torch.bfloat16: 3.3895313892515355e38}
RESIDENT_MAX_D = 512  # widest z tile kept resident; wider rows take the split-D path


class Machine(NamedTuple):
    """What the plan depends on: SMs to fill, shared memory per block, the tile table."""
    name: str
    num_sms: int
    shared_bytes: int  # opt-in dynamic shared memory per block
    interpreted: bool = False


SM90 = Machine("sm_90", 132, 227 * 1024)  # H100 SXM
SM80 = Machine("sm_80", 108, 163 * 1024)  # A100
# The interpreter runs the same plan at toy sizes: 4 "SMs", 16-row, 32-code tiles.
INTERPRETER = Machine("interpreter", 4, 227 * 1024, interpreted=True)


@functools.lru_cache(maxsize=None)
def _cuda_machine(index: int) -> Machine:
    props = torch.cuda.get_device_properties(index)
    return Machine(f"sm_{props.major}{props.minor}", props.multi_processor_count,
                   props.shared_memory_per_block_optin)


def machine_for(device: torch.device) -> Machine:
    if interpreting():
        return INTERPRETER
    return _cuda_machine(device.index if device.index is not None else torch.cuda.current_device())


class Mode(NamedTuple):
    """How one dtype is scored (see the module docstring)."""
    acc: torch.dtype  # accumulation and score dtype
    code: torch.dtype  # storage dtype of the prepared codes
    precision: str  # tl.dot input_precision
    z_terms: int  # dot operands z is split into
    split_tf32: bool  # codes stored as TF32 head + fp32 tail (3xTF32)
    narrow_centre: bool  # 16-bit: centre only narrow columns, so centred codes stay exact
    flag_inexact: bool  # 16-bit main pass: flag rows whose centred z is not exact


def mode_for(dtype: torch.dtype, *, rescoring: bool = False) -> Mode:
    if dtype == torch.float64:
        return Mode(torch.float64, torch.float64, "ieee", 1, False, False, False)
    if dtype == torch.float32:
        if os.environ.get("VQVAE_FAST_TRITON_FP32_PRECISION", "tf32x3") == "ieee":
            return Mode(torch.float32, torch.float32, "ieee", 1, False, False, False)
        return Mode(torch.float32, torch.float32, "tf32", 2, True, False, False)
    return Mode(torch.float32, dtype, "ieee", 3 if rescoring else 1, False, True, not rescoring)


def _dot_dtype(mode: Mode, machine: Machine):
    # The interpreter's numpy matmul has no bf16: widen to fp32 there (products of bf16
    # values are exact in fp32, so the scores are those of the tensor cores).
    if mode.code == torch.bfloat16 and machine.interpreted:
        return tl.float32
    return _TL_DTYPE[mode.code]


def search_configs(machine: Machine) -> list[triton.Config]:
    """Every tile shape the search may use on `machine`, before pruning for a given problem."""
    if machine.interpreted:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    table = [(128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2),
             (32, 64, 4, 2)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in table]


def code_align(machine: Machine) -> int:
    """K is padded to a multiple of this (the widest BLOCK_K), and splits start on it."""
    return max(c.kwargs["BLOCK_K"] for c in search_configs(machine))


def shared_bytes_estimate(block_n: int, block_k: int, stages: int, d_pad: int, block_d: int, mode: Mode) -> int:
    """Shared memory of the search: `stages` codebook tiles and the z operands (resident:
    once, all of D; split-D: `stages` chunks), plus 8 KB for the epilogue's reductions."""
    size = torch.finfo(mode.code).bits // 8
    z_rows = block_n * mode.z_terms
    code_rows = block_k * (2 if mode.split_tf32 else 1)
    if d_pad == block_d:
        return size * d_pad * (z_rows + stages * code_rows) + 8192
    return size * block_d * stages * (z_rows + code_rows) + 8192


def keep_config(config: triton.Config, machine: Machine, n: int, d_pad: int, block_d: int, mode: Mode) -> bool:
    """Whether a tile shape suits a problem: it fits shared memory and, as measured with
    scripts/inspect_kernels.py on sm_90 and sm_80, does not spill registers. The running best
    holds a score, an index and an accumulator per tile element: 32 elements per thread fit
    (fp64: 32-row tiles, 2 stages); tiles with three dots per chunk of D (3xTF32 and the
    16-bit re-scoring, split-D) fit up to 64 x 32."""
    block_n, block_k = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    if machine.interpreted:
        return True
    if shared_bytes_estimate(block_n, block_k, config.num_stages, d_pad, block_d, mode) > machine.shared_bytes:
        return False
    if block_n * block_k > 32 * 32 * config.num_warps:
        return False
    if mode.acc == torch.float64 and (config.num_stages > 2 or block_n > 32):
        return False
    three_dots = mode.split_tf32 or mode.z_terms == 3
    if three_dots and block_d < d_pad and block_n * block_k > 64 * 32:
        return False
    return block_n <= max(32, triton.next_power_of_2(n))  # no mostly-empty row blocks


def d_tiling(d: int, mode: Mode, machine: Machine) -> tuple[int, int]:
    """(D_PAD, BLOCK_D): one resident z tile when D <= 512 and some tile shape fits, else
    chunks loaded in the loop (split-D): 64 values for 16-bit operands, 32 for wider ones
    (on sm_80 both operands pass through registers). tl.dot needs sides >= 16."""
    d_pad = max(16, triton.next_power_of_2(max(d, 1)))
    if d_pad <= RESIDENT_MAX_D and any(keep_config(c, machine, 1 << 20, d_pad, d_pad, mode)
                                       for c in search_configs(machine)):
        return d_pad, d_pad
    block_d = 64 if mode.code.itemsize == 2 else 32
    return triton.cdiv(d, block_d) * block_d, block_d


def _prune(configs, named_args, **kwargs):
    z = named_args["z_ptr"]
    mode = mode_for(z.dtype)
    machine = machine_for(z.device)
    kept = [c for c in configs
            if keep_config(c, machine, named_args["N"], kwargs["D_PAD"], kwargs["BLOCK_D"], mode)]
    return kept or configs[-1:]


def fp32_pair(x: float) -> tuple[float, float]:
    """x as an fp32 head and the rest: Triton passes a Python float to a kernel as fp32, so an
    fp64 kernel multiplies by both and adds (48 bits of x, not 24)."""
    head = float(np.float32(x))
    return head, x - head


def split_plan(n: int, k_pad: int, machine: Machine) -> tuple[int, int]:
    """(splits, codes_per_split): split the codebook when there are fewer row blocks than SMs
    (k-means init and eval batches), in parts that start on code_align so that a (row, code)
    score is the same whatever the split."""
    align = code_align(machine)
    rows_per_block = min(c.kwargs["BLOCK_N"] for c in search_configs(machine)) * 2
    row_blocks = triton.cdiv(n, rows_per_block)
    chunks = k_pad // align
    if row_blocks >= machine.num_sms or chunks == 1:
        return 1, k_pad
    wanted = min(chunks, triton.cdiv(2 * machine.num_sms, row_blocks))
    codes_per_split = triton.cdiv(chunks, wanted) * align
    return triton.cdiv(k_pad, codes_per_split), codes_per_split


_search_tuned = triton.autotune(
    configs=search_configs(SM90),
    key=["n_bucket", "K_PAD", "D_PAD", "BLOCK_D", "codes_per_split", "Z_TERMS", "WANT_QUANTIZED"],
    prune_configs_by={"early_config_prune": _prune},
)(_search_kernel)


# ----------------------------------------------------------------------------- launchers


class SearchPlan(NamedTuple):
    machine: Machine
    mode: Mode
    d_pad: int  # operand row length
    block_d: int  # == d_pad: resident z tile; < d_pad: split-D chunks
    n_pad: int  # operand rows: a multiple of every BLOCK_N
    k_pad: int  # codes: a multiple of every BLOCK_K
    splits: int
    codes_per_split: int


def plan_search(n: int, k: int, d: int, dtype: torch.dtype, machine: Machine) -> SearchPlan:
    mode = mode_for(dtype)
    d_pad, block_d = d_tiling(d, mode, machine)
    align = code_align(machine)
    row_align = max(c.kwargs["BLOCK_N"] for c in search_configs(machine))
    k_pad = triton.cdiv(k, align) * align
    splits, codes_per_split = split_plan(n, k_pad, machine)
    return SearchPlan(machine, mode, d_pad, block_d, triton.cdiv(n, row_align) * row_align, k_pad, splits,
                      codes_per_split)


class Operands(NamedTuple):
    """Both sides centred on the codebook's centre, padded, in the form `tl.dot` takes."""
    z_op: torch.Tensor  # (N_PAD, D_PAD): z - c (TF32 heads in 3xTF32 mode)
    z_tail: torch.Tensor  # 3xTF32: fp32 tails; 16-bit: first remainder term of flagged rows
    z_tail2: torch.Tensor  # 16-bit: second remainder term of flagged rows
    codes: torch.Tensor  # (K_PAD, D_PAD): e - c (TF32 heads in 3xTF32 mode)
    codes_tail: torch.Tensor  # 3xTF32: fp32 tails
    half_norm: torch.Tensor  # (K_PAD,) 1/2 ||e - c||^2, +inf for non-finite codes and padding
    inexact: torch.Tensor | None  # 16-bit: (N_PAD,) int8, rows whose z - c is not exact


class PrepareLaunch(NamedTuple):
    arange_d: int  # a power of two >= D_PAD
    stats_programs: int
    stats_rows: int
    stats_block_d: int
    code_programs: int
    prepare_meta: dict


def prepare_launch(plan: SearchPlan, k: int = 1) -> PrepareLaunch:
    arange_d = triton.next_power_of_2(plan.d_pad)
    mode = plan.mode
    block_r = max(1, min(64, 8192 // arange_d))  # a (BLOCK_R, arange_d) tile: 8192 values
    meta = dict(BLOCK_R=block_r, D_PAD=arange_d, ACC_DTYPE=_TL_DTYPE[mode.acc], CODE_DTYPE=_TL_DTYPE[mode.code],
                SPLIT_TF32=mode.split_tf32, NARROW_CENTRE=mode.narrow_centre, FLAG_INEXACT=mode.flag_inexact,
                CODE_MAX=_CODE_MAX.get(mode.code, 0.0))
    return PrepareLaunch(arange_d, min(32, triton.cdiv(k, 256)), 32, min(arange_d, 128),
                         triton.cdiv(plan.k_pad, block_r), meta)


def prepare_operands(z: torch.Tensor, codebook: torch.Tensor, plan: SearchPlan) -> Operands:
    """Centre, pad and convert both operands once per call: two launches, O((N + K) D)."""
    N, D = z.shape
    K = codebook.shape[0]
    mode = plan.mode
    launch = prepare_launch(plan, K)

    def empty(*shape, dtype=mode.code):
        return torch.empty(shape, dtype=dtype, device=z.device)

    stats = empty(launch.stats_programs, 4, launch.arange_d, dtype=mode.acc)
    _codebook_stats_kernel[(launch.stats_programs, triton.cdiv(D, launch.stats_block_d))](
        codebook, stats, K, D, triton.cdiv(K, launch.stats_programs), codebook.stride(0), codebook.stride(1),
        BLOCK_R=launch.stats_rows, BLOCK_D=launch.stats_block_d, D_PAD=launch.arange_d,
        ACC_DTYPE=_TL_DTYPE[mode.acc])

    two_terms = mode.split_tf32 or mode.flag_inexact
    z_op = empty(plan.n_pad, plan.d_pad)
    z_tail = empty(plan.n_pad, plan.d_pad) if two_terms else z_op
    z_tail2 = empty(plan.n_pad, plan.d_pad) if mode.flag_inexact else z_op
    codes = empty(plan.k_pad, plan.d_pad)
    codes_tail = empty(plan.k_pad, plan.d_pad) if mode.split_tf32 else codes
    half_norm = empty(plan.k_pad, dtype=mode.acc)
    inexact = empty(plan.n_pad, dtype=torch.int8) if mode.flag_inexact else None
    centre = empty(launch.arange_d, dtype=mode.acc)
    z_programs = triton.cdiv(plan.n_pad, launch.prepare_meta["BLOCK_R"])
    _prepare_kernel[(launch.code_programs + z_programs,)](
        codebook, z, stats, centre, codes, codes_tail, half_norm, z_op, z_tail, z_tail2, inexact,
        K, N, D, plan.k_pad, plan.n_pad, plan.d_pad, launch.stats_programs, launch.code_programs,
        codebook.stride(0), codebook.stride(1), z.stride(0), z.stride(1), **launch.prepare_meta)
    return Operands(z_op, z_tail, z_tail2, codes, codes_tail, half_norm, inexact)


def search_meta(plan: SearchPlan, mode: Mode, *, want_quantized: bool, only_flagged: bool = False) -> dict:
    """The constexpr arguments of `_search_kernel` for a plan (tile sizes excepted)."""
    return dict(
        D_PAD=plan.d_pad, BLOCK_D=plan.block_d, ACC_DTYPE=_TL_DTYPE[mode.acc], DOT_DTYPE=_dot_dtype(mode, plan.machine),
        PRECISION=mode.precision, Z_TERMS=mode.z_terms, SPLIT_TF32=mode.split_tf32, ONLY_FLAGGED=only_flagged,
        SPLIT=plan.splits > 1, WANT_QUANTIZED=want_quantized, GATHER_D=min(plan.block_d, 64))


def rescoring_plan(plan: SearchPlan) -> tuple[SearchPlan, triton.Config]:
    """The rare 16-bit re-scoring pass: z in three terms, so chunks of at most 32 values of D
    (three resident wide tiles would not fit, and on sm_80 every operand passes through
    registers: scripts/inspect_kernels.py), and the first tile shape that fits."""
    rescoring = plan._replace(mode=mode_for(plan.mode.code, rescoring=True), block_d=min(plan.d_pad, 32))
    configs = search_configs(plan.machine)
    fitting = [c for c in configs if keep_config(c, plan.machine, 1 << 20, rescoring.d_pad, rescoring.block_d,
                                                 rescoring.mode)]
    return rescoring, (fitting or configs[-1:])[0]


def _search(z: torch.Tensor, codebook: torch.Tensor, want_quantized: bool):
    """(indices, quantized or None, per-row squared error or None)."""
    N, D = z.shape
    K = codebook.shape[0]
    plan = plan_search(N, K, D, z.dtype, machine_for(z.device))
    mode = plan.mode
    ops = prepare_operands(z, codebook, plan)

    def empty(*shape, dtype):
        return torch.empty(shape, dtype=dtype, device=z.device)

    split = plan.splits > 1
    indices = empty(N, dtype=torch.long)
    quantized = empty(N, D, dtype=codebook.dtype) if want_quantized else None
    row_err = empty(N, dtype=mode.acc) if want_quantized else None
    part_score = empty(plan.splits, N, dtype=mode.acc) if split else None
    part_idx = empty(plan.splits, N, dtype=torch.int32) if split else None
    args = (z, codebook, *ops[:6], part_score, part_idx, ops.inexact, indices, quantized, row_err,
            N, D, plan.k_pad, plan.codes_per_split, min(N.bit_length(), 20),
            z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1))

    meta = search_meta(plan, mode, want_quantized=want_quantized)
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
            **search_meta(rescoring, rescoring.mode, want_quantized=want_quantized, only_flagged=True))
    if split:
        meta = merge_meta(plan, want_quantized)
        _merge_kernel[(triton.cdiv(N, meta["BLOCK_N"]),)](
            part_score, part_idx, z, codebook, indices, quantized, row_err, N, D, plan.splits,
            z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1), **meta)
    return indices, quantized, row_err


def merge_meta(plan: SearchPlan, want_quantized: bool) -> dict:
    return dict(BLOCK_N=16 if plan.machine.interpreted else 64, BLOCK_D=min(plan.block_d, 64),
                ACC_DTYPE=_TL_DTYPE[plan.mode.acc], WANT_QUANTIZED=want_quantized)


LOSS_BLOCK = 1024  # row errors summed per step of the loss kernel
SEGMENT_ROWS = 32  # rows per step of the deterministic codebook-gradient kernel


def backward_meta(d: int, acc: torch.dtype) -> dict:
    return dict(BLOCK_N=32, BLOCK_D=max(16, min(64, triton.next_power_of_2(d))), ACC_DTYPE=_TL_DTYPE[acc])


def grad_z_meta(d: int, acc: torch.dtype, rotation: bool) -> dict:
    """The grad_z kernel's tile: the rotation keeps more per-row state live, and in fp64 a
    32 x 64 tile spills on sm_90 (scripts/inspect_kernels.py), so it takes 32 x 32 there."""
    meta = dict(backward_meta(d, acc), ROTATION=rotation)
    if rotation and acc == torch.float64:
        meta["BLOCK_D"] = min(meta["BLOCK_D"], 32)
    return meta


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """indices (N,) int64 of the nearest codes: no gather, no loss."""
    if z.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    if z.shape[1] == 0:  # every code is at distance 0: the lowest index wins
        return torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    return _search(z, codebook, want_quantized=False)[0]


def quantize_fwd(z: torch.Tensor, codebook: torch.Tensor, beta: float):
    """quantized (N, D) = codebook[indices], indices (N,) int64, loss () in z.dtype."""
    N, D = z.shape
    if N == 0 or D == 0:
        indices = torch.zeros(N, dtype=torch.long, device=z.device)
        quantized = torch.empty((N, D), dtype=codebook.dtype, device=z.device)
        return quantized, indices, torch.full((), float("nan"), dtype=z.dtype, device=z.device)
    indices, quantized, row_err = _search(z, codebook, want_quantized=True)
    loss = torch.empty((), dtype=z.dtype, device=z.device)
    _loss_kernel[(1,)](row_err, loss, N, *fp32_pair((1.0 + beta) / (N * D)), BLOCK=LOSS_BLOCK,
                       ACC_DTYPE=_TL_DTYPE[row_err.dtype])
    return quantized, indices, loss


def quantize_bwd(grad_quantized, grad_loss, z, codebook, indices, beta: float, need_grad_z: bool,
                 need_grad_codebook: bool, rotation: bool = False):
    """(grad_z, grad_codebook) of the straight-through estimator (or the rotation trick's)
    and the VQ losses; a gradient that is not needed comes back as an empty tensor and costs
    nothing."""
    N, D = z.shape
    K = codebook.shape[0]
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    meta = backward_meta(D, acc)
    grad_z = torch.empty((N, D) if need_grad_z else (0,), dtype=z.dtype, device=z.device)
    strides = (z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1))
    grid = (triton.cdiv(N, meta["BLOCK_N"]),)
    if need_grad_z and N and D:
        _grad_z_kernel[grid](grad_quantized, z, codebook, indices, grad_loss, grad_z, N, D,
                             *fp32_pair(2.0 * beta / (N * D)), grad_quantized.stride(0), grad_quantized.stride(1),
                             *strides, **grad_z_meta(D, acc, bool(rotation)))
    if not need_grad_codebook:
        return grad_z, torch.empty(0, dtype=codebook.dtype, device=z.device)
    diff = torch.zeros((K, D), dtype=acc, device=z.device)
    if N and D and torch.are_deterministic_algorithms_enabled():
        order = torch.sort(indices, stable=True).indices
        starts = torch.zeros(K + 1, dtype=torch.long, device=z.device)
        torch.cumsum(torch.bincount(indices, minlength=K), 0, out=starts[1:])
        _codebook_diff_segment_kernel[(K, triton.cdiv(D, meta["BLOCK_D"]))](
            z, codebook, order, starts, diff, D, *strides, BLOCK_R=SEGMENT_ROWS, BLOCK_D=meta["BLOCK_D"],
            ACC_DTYPE=meta["ACC_DTYPE"])
    elif N and D:
        _codebook_diff_atomic_kernel[grid](z, codebook, indices, diff, N, D, *strides, **meta)
    scale = 2.0 / (N * D) if N * D else 0.0
    return grad_z, (diff * (grad_loss.to(acc) * scale)).to(codebook.dtype)
