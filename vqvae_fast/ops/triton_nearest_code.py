"""Triton nearest-code search (the forward of `nearest_code` and `quantize`).

Read top to bottom: the kernels, the search plan (modes, tiles, splits, autotuning), the
launchers (check, allocate, launch). The backward is in `triton_quantize_bwd.py`; the
registration as torch custom ops in `triton_ops.py`.

Forward of z (N, D) against a codebook (K, D), in four to six launches, none of them N x K
(`tests/test_triton_nearest_code.py` counts them):

1. `_stats_kernel`: per column, the sum, count, min and max over the finite codes (a code
   with any NaN/Inf entry takes no part), and the largest |z| entry of the finite rows of z.
   It also zeroes the two scratch words the later launches accumulate into.
2. `_prepare_kernel`: the centre c (the column means, see `_centre_and_scale`) and a power
   of two s, then both operands as s (x - c), computed in float64 and converted once into the
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

Precision. Scores are computed on values centred on the codebook mean, so a large common
offset cannot cancel.
- fp32 is exact, as on the cpu backend: one tensor-core pass (`FP32_PRECISIONS`; default
  "bf16x3": x and y split into two bf16 parts each, x.y ~ xl.yh + xh.yl + xh.yh, three bf16
  products accumulated in fp32, half the tensor-core work of 3xTF32) keeps each row's best
  and second-best score. `settle_bound` is a rigorous bound on a score's error (dropped
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

import functools
import math
import os
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from . import triton_interpreting as interpreting

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _stats_kernel(
    # pointers; code_stats: (code_programs, 4, D_PAD) fp64; z_max: (z_programs,) fp64; scratch: (2,) int64;
    # counts (K,), sums (K, D): the per-code statistics the search accumulates (WANT_STATS)
    codebook_ptr, z_ptr, code_stats_ptr, z_max_ptr, scratch_ptr, counts_ptr, sums_ptr,
    # sizes
    K, N, D, code_programs, codes_per_program, rows_per_program,
    # strides
    stride_ck, stride_cd, stride_zn, stride_zd,
    # meta-parameters
    BLOCK_R: tl.constexpr, D_PAD: tl.constexpr, WANT_STATS: tl.constexpr,
):
    """Programs below code_programs: (sum, count, min, max) per column over their finite codes,
    and zeroes their codes' counts (WANT_STATS >= 1) and sums (2). The others: the largest
    |entry| over their finite rows of z."""
    pid = tl.program_id(0)
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    if pid == 0:
        tl.store(scratch_ptr + tl.arange(0, 2), tl.zeros((2,), tl.int64))  # flag count, max half norm
    if pid < code_programs:
        start = pid * codes_per_program
        end = tl.minimum(start + codes_per_program, K)
        total = tl.zeros((D_PAD,), tl.float64)
        count = tl.zeros((D_PAD,), tl.float64)
        low = tl.full((D_PAD,), float("inf"), tl.float64)
        high = tl.full((D_PAD,), float("-inf"), tl.float64)
        for r0 in range(start, end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mask = (r < end)[:, None] & d_mask[None, :]
            x = tl.load(codebook_ptr + r.to(tl.int64)[:, None] * stride_ck + d[None, :] * stride_cd,
                        mask=mask, other=0.0).to(tl.float64)
            ok = mask & _finite_rows(x, mask)[:, None]
            if WANT_STATS >= 1:
                tl.store(counts_ptr + r, tl.zeros((BLOCK_R,), tl.float32), mask=r < end)
            if WANT_STATS == 2:
                tl.store(sums_ptr + r.to(tl.int64)[:, None] * D + d[None, :],
                         tl.zeros((BLOCK_R, D_PAD), sums_ptr.dtype.element_ty), mask=mask)
            total += tl.sum(tl.where(ok, x, 0.0), axis=0)
            count += tl.sum(ok.to(tl.float64), axis=0)
            low = tl.minimum(low, tl.min(tl.where(ok, x, float("inf")), axis=0))
            high = tl.maximum(high, tl.max(tl.where(ok, x, float("-inf")), axis=0))
        out = code_stats_ptr + pid * 4 * D_PAD + d
        tl.store(out, total)
        tl.store(out + D_PAD, count)
        tl.store(out + 2 * D_PAD, low)
        tl.store(out + 3 * D_PAD, high)
    else:
        start = (pid - code_programs) * rows_per_program
        end = tl.minimum(start + rows_per_program, N)
        largest = tl.zeros((D_PAD,), tl.float64)
        for r0 in range(start, end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            mask = (r < end)[:, None] & d_mask[None, :]
            x = tl.load(z_ptr + r.to(tl.int64)[:, None] * stride_zn + d[None, :] * stride_zd,
                        mask=mask, other=0.0).to(tl.float64)
            ok = mask & _finite_rows(x, mask)[:, None]
            largest = tl.maximum(largest, tl.max(tl.where(ok, tl.abs(x), 0.0), axis=0))
        tl.store(z_max_ptr + pid - code_programs, tl.max(largest, axis=0))


@triton.jit
def _finite_rows(x, mask):
    """Rows of x whose entries under `mask` are all finite (NaN fails the comparison)."""
    return tl.sum((mask & ~(tl.abs(x) < float("inf"))).to(tl.int32), axis=1) == 0


@triton.jit
def _centre_and_scale(code_stats_ptr, z_max_ptr, code_programs, z_programs, d, d_mask,
                      D_PAD: tl.constexpr, CODE_DTYPE: tl.constexpr, NARROW_CENTRE: tl.constexpr,
                      SCALE: tl.constexpr, Z_STAT_PROGRAMS: tl.constexpr):
    """The centre c (fp64, per column) and the power of two s (fp64) from the stats partials.

    c: the mean of each column over the finite codes. NARROW_CENTRE (16-bit codes): c_d = 0
    unless column d's finite entries satisfy max - min <= |mean| / 4, and then c_d = the mean
    rounded to 16 bits. Every centred entry e - c_d is then exact in 16 bits: trivially for
    c_d = 0; otherwise e and c_d lie within [0.74, 1.26] |mean| of each other, so both are
    multiples of the unit u of the lower one's binade (u > 0.37 |mean| 2^(1-p), p = 8 or 11
    significant bits) and |e - c_d| < 0.26 |mean| < 2^p u: e - c_d is a multiple of u with at
    most p significant bits.
    s: 2^(32 - floor(log2 A)), A an upper bound of every |e - c| and |z - c| (finite codes and
    rows), so every scaled value is below 2^33 and the largest is at least 2^32; multiplying
    by s is exact (while the result stays a normal number, which the bound covers).
    """
    total = tl.zeros((D_PAD,), tl.float64)
    count = tl.zeros((D_PAD,), tl.float64)
    low = tl.full((D_PAD,), float("inf"), tl.float64)
    high = tl.full((D_PAD,), float("-inf"), tl.float64)
    for p in range(0, code_programs):  # a fixed order: every program gets the same centre
        part = code_stats_ptr + p * 4 * D_PAD + d
        total += tl.load(part)
        count += tl.load(part + D_PAD)
        low = tl.minimum(low, tl.load(part + 2 * D_PAD))
        high = tl.maximum(high, tl.load(part + 3 * D_PAD))
    mean = total / tl.maximum(count, 1.0)
    centre = mean
    if NARROW_CENTRE:
        narrow = (count > 0) & (high - low <= 0.25 * tl.abs(mean))
        centre = tl.where(narrow, mean.to(tl.float32).to(CODE_DTYPE).to(tl.float64), 0.0)
    centre = tl.where(d_mask, centre, 0.0)
    largest = 0.0 * tl.max(centre, axis=0)  # no scaling: s = 1
    if SCALE:
        p = tl.arange(0, Z_STAT_PROGRAMS)
        z_largest = tl.max(tl.load(z_max_ptr + p, mask=p < z_programs, other=0.0), axis=0)
        spread = tl.where(count > 0, tl.maximum(high - centre, centre - low), 0.0)
        largest = tl.maximum(tl.max(spread, axis=0), z_largest + tl.max(tl.abs(centre), axis=0))
    exponent = ((largest.to(tl.int64, bitcast=True) >> 52) & 0x7FF) - 1023  # floor(log2), normal A
    power = tl.minimum(tl.maximum(32 - exponent, -1000), 1000)
    scale = tl.where(largest > 0, ((power + 1023) << 52).to(tl.float64, bitcast=True), 1.0)
    return centre, scale


@triton.jit
def _tf32_round(x):
    """x (fp32) rounded to the nearest TF32 value (10 stored mantissa bits): exact in a TF32
    product, and x - result is exact in fp32."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _store_operand(x, hi_ptr, lo_ptr, offsets, mask, CODE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                   SPLIT: tl.constexpr):
    """x (fp64) as the search's dot operand(s): SPLIT, a high and a low part (bf16 + bf16 or TF32
    + fp32, of x rounded to fp32); one-pass TF32, x rounded to TF32; otherwise x in CODE_DTYPE."""
    if SPLIT:
        x32 = x.to(tl.float32)
        if CODE_DTYPE == tl.bfloat16:
            hi = x32.to(tl.bfloat16)
        else:
            hi = _tf32_round(x32)
        tl.store(hi_ptr + offsets, hi, mask=mask)
        tl.store(lo_ptr + offsets, (x32 - hi.to(tl.float32)).to(CODE_DTYPE), mask=mask)
    elif PRECISION == "tf32":
        tl.store(hi_ptr + offsets, _tf32_round(x.to(tl.float32)), mask=mask)
    elif CODE_DTYPE == tl.float64:
        tl.store(hi_ptr + offsets, x, mask=mask)
    else:  # via fp32: Triton converts fp64 to 16 bits through it anyway
        tl.store(hi_ptr + offsets, x.to(tl.float32).to(CODE_DTYPE), mask=mask)


@triton.jit
def _prepare_kernel(
    # pointers: inputs and stats; outputs: centre and scale, code operands, half norms, z
    # operands, row norms and (16-bit) the per-row inexact flags; scratch: (flag count, max half norm bits)
    codebook_ptr, z_ptr, code_stats_ptr, z_max_ptr, centre_ptr, codes_ptr, codes_tail_ptr, half_norm_ptr,
    z_op_ptr, z_tail_ptr, z_tail2_ptr, row_norm_ptr, inexact_ptr, scratch_ptr,
    # sizes: code operands are (K_PAD, WIDTH), z operands (N_PAD, WIDTH), zero beyond (K or N, D)
    K, N, D, K_PAD, N_PAD, WIDTH, code_stat_programs, z_stat_programs, code_programs,
    # strides
    stride_ck, stride_cd, stride_zn, stride_zd,
    # meta-parameters; D_PAD: a power of two >= WIDTH
    BLOCK_R: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, CODE_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT: tl.constexpr, NARROW_CENTRE: tl.constexpr, FLAG_INEXACT: tl.constexpr,
    SCALE: tl.constexpr, SETTLE: tl.constexpr, CODE_MAX: tl.constexpr, Z_STAT_PROGRAMS: tl.constexpr,
):
    """Centre and scale both operands once per call, in the form `tl.dot` takes (programs below
    code_programs do BLOCK_R codes each, the others BLOCK_R rows of z).

    Codes: y = s (e - c), 1/2 |y|^2 (+inf for codes with a NaN/Inf entry and for padding, so
    that they are never chosen); SETTLE: the largest finite half norm, as an atomic max of its
    bits (non-negative floats order as their bits). z: x = s (z - c) (0 for a row with a
    NaN/Inf entry) and |x| (NaN for such a row). 16-bit: a row whose x is not exact in 16 bits
    is flagged, and its two 16-bit remainder terms are written (the three terms sum to x
    exactly, up to fp16 underflow) for the re-scoring pass.
    """
    pid = tl.program_id(0)
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    centre, scale = _centre_and_scale(code_stats_ptr, z_max_ptr, code_stat_programs, z_stat_programs, d, d_mask,
                                      D_PAD, CODE_DTYPE, NARROW_CENTRE, SCALE, Z_STAT_PROGRAMS)
    is_code = pid < code_programs
    rows = (pid - tl.where(is_code, 0, code_programs)) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)
    out = rows64[:, None] * WIDTH + d[None, :]
    if is_code:
        if pid == 0:
            tl.store(centre_ptr + d, centre)
            tl.store(centre_ptr + D_PAD, scale)
        mask = (rows < K)[:, None] & d_mask[None, :]
        x = tl.load(codebook_ptr + rows64[:, None] * stride_ck + d[None, :] * stride_cd,
                    mask=mask, other=0.0).to(tl.float64)
        row_ok = (rows < K) & _finite_rows(x, mask)
        y = tl.where(row_ok[:, None] & d_mask[None, :], (x - centre[None, :]) * scale, 0.0)
        half_norm = 0.5 * tl.sum(y * y, axis=1)
        in_buffer = rows < K_PAD
        tl.store(half_norm_ptr + rows64, tl.where(row_ok, half_norm, float("inf")).to(ACC_DTYPE), mask=in_buffer)
        if SETTLE:
            largest = tl.max(tl.where(row_ok, half_norm, 0.0), axis=0)
            tl.atomic_max(scratch_ptr + 1, largest.to(tl.int64, bitcast=True))
        _store_operand(y, codes_ptr, codes_tail_ptr, out, in_buffer[:, None] & (d < WIDTH)[None, :], CODE_DTYPE,
                       PRECISION, SPLIT)
    else:
        mask = (rows < N)[:, None] & d_mask[None, :]
        x = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd,
                    mask=mask, other=0.0).to(tl.float64)
        row_ok = _finite_rows(x, mask)
        x = tl.where(row_ok[:, None] & mask, (x - centre[None, :]) * scale, 0.0)
        in_buffer = rows < N_PAD
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        tl.store(row_norm_ptr + rows64, tl.where(row_ok, norm, float("nan")).to(tl.float32), mask=in_buffer)
        out_mask = in_buffer[:, None] & (d < WIDTH)[None, :]
        if FLAG_INEXACT:
            x32 = x.to(tl.float32)  # exact: 16-bit inputs, a 16-bit centre, a power of two
            term0 = tl.clamp(x32, -CODE_MAX, CODE_MAX).to(CODE_DTYPE)  # fp16 z - c can pass 65504
            rest = x32 - term0.to(tl.float32)
            tl.store(z_op_ptr + out, term0, mask=out_mask)
            inexact = tl.max((rest != 0).to(tl.int8), axis=1)
            tl.store(inexact_ptr + rows64, inexact, mask=in_buffer)
            term1 = rest.to(CODE_DTYPE)
            rest = rest - term1.to(tl.float32)
            flagged = out_mask & (inexact != 0)[:, None]
            tl.store(z_tail_ptr + out, term1, mask=flagged)
            tl.store(z_tail2_ptr + out, rest.to(CODE_DTYPE), mask=flagged)
        else:
            _store_operand(x, z_op_ptr, z_tail_ptr, out, out_mask, CODE_DTYPE, PRECISION, SPLIT)


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
def _write_rows(z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr,
                rows64, store_mask, idx, D, stride_zn, stride_zd, stride_ck, stride_cd,
                BLOCK_D: tl.constexpr, WANT_QUANTIZED: tl.constexpr, WANT_STATS: tl.constexpr):
    """indices[rows] = idx; with WANT_QUANTIZED also quantized[rows] = codebook[idx] and the
    rows' squared error sum((z - e)^2), in float64 (it neither overflows nor underflows).
    WANT_STATS: counts[idx] += 1 (1), and sums[idx] += z (2), with atomics (each row is
    written once, by the search, the merge or the re-scoring)."""
    tl.store(indices_ptr + rows64, idx.to(tl.int64), mask=store_mask)
    if WANT_STATS >= 1:
        tl.atomic_add(counts_ptr + idx, tl.full(idx.shape, 1.0, tl.float32), mask=store_mask)
    if WANT_STATS == 2:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = store_mask[:, None] & (d < D)[None, :]
            z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd, mask=mask, other=0.0)
            tl.atomic_add(sums_ptr + idx.to(tl.int64)[:, None] * D + d[None, :], z.to(sums_ptr.dtype.element_ty),
                          mask=mask)
    if WANT_QUANTIZED:
        idx64 = idx.to(tl.int64)
        sq_err = tl.zeros(idx.shape, tl.float64)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = store_mask[:, None] & (d < D)[None, :]
            z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd, mask=mask, other=0.0)
            e = tl.load(codebook_ptr + idx64[:, None] * stride_ck + d[None, :] * stride_cd, mask=mask, other=0.0)
            tl.store(quantized_ptr + rows64[:, None] * D + d[None, :], e, mask=mask)
            diff = z.to(tl.float64) - e.to(tl.float64)
            sq_err += tl.sum(diff * diff, axis=1)
        tl.store(row_err_ptr + rows64, sq_err, mask=store_mask)


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
    flag_threshold_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr,
    # sizes and the error bound's coefficients (settle_bound); n_bucket only keys the autotuning
    N, D, K_PAD, codes_per_split, n_bucket, bound_rel, bound_norm, bound_abs,
    # strides of the raw inputs (for the gather)
    stride_zn, stride_zd, stride_ck, stride_cd,
    # meta-parameters; D_PAD: the operands' row length
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    Z_TERMS: tl.constexpr, SPLIT: tl.constexpr, SETTLE: tl.constexpr, ONLY_FLAGGED: tl.constexpr,
    SPLIT_K: tl.constexpr, WANT_QUANTIZED: tl.constexpr, WANT_STATS: tl.constexpr, GATHER_D: tl.constexpr,
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
        _write_rows(z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr, rows64,
                    write, row_idx, D, stride_zn, stride_zd, stride_ck, stride_cd, GATHER_D, WANT_QUANTIZED,
                    WANT_STATS)


@triton.jit
def _merge_kernel(
    # pointers
    part_score_ptr, part_second_ptr, part_idx_ptr, row_norm_ptr, scratch_ptr, flag_rows_ptr, flag_threshold_ptr,
    z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr,
    # sizes and the error bound's coefficients
    N, D, splits, bound_rel, bound_norm, bound_abs,
    # strides
    stride_zn, stride_zd, stride_ck, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, SETTLE: tl.constexpr,
    WANT_QUANTIZED: tl.constexpr, WANT_STATS: tl.constexpr,
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
    _write_rows(z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr, rows64, write,
                best_idx, D, stride_zn, stride_zd, stride_ck, stride_cd, BLOCK_D, WANT_QUANTIZED, WANT_STATS)


@triton.jit
def _rescore_kernel(
    # pointers: raw inputs, prepared operands, the rows to settle, outputs
    z_ptr, codebook_ptr, z_op_ptr, z_tail_ptr, codes_ptr, codes_tail_ptr, half_norm_ptr,
    scratch_ptr, flag_rows_ptr, flag_threshold_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr,
    # sizes
    K, D, K_PAD,
    # strides of the raw inputs
    stride_zn, stride_zd, stride_ck, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    EXACT_D: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    Z_TERMS: tl.constexpr, SPLIT: tl.constexpr, WANT_QUANTIZED: tl.constexpr, WANT_STATS: tl.constexpr,
    GATHER_D: tl.constexpr,
):
    """Settles the rows the search flagged (their number is read here, on the device): scores
    every code again, and computes the float64 distance sum((z - e)^2) from the original
    values for the codes whose score is within the row's threshold (every code that can be the
    nearest); the smallest wins, ties to the lowest index. The programs take blocks of the
    flagged rows in turn, so a fixed grid covers any count."""
    count = tl.load(scratch_ptr).to(tl.int32)
    cols = tl.arange(0, BLOCK_K)
    for first in range(tl.program_id(0) * BLOCK_N, count, tl.num_programs(0) * BLOCK_N):
        slots = first + tl.arange(0, BLOCK_N)
        valid = slots < count
        rows64 = tl.load(flag_rows_ptr + slots, mask=valid, other=0).to(tl.int64)
        threshold = tl.load(flag_threshold_ptr + slots, mask=valid, other=float("-inf"))
        best = tl.full((BLOCK_N,), float("inf"), tl.float64)
        best_idx = tl.zeros((BLOCK_N,), tl.int32)
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
                for d0 in range(0, D, EXACT_D):
                    d = d0 + tl.arange(0, EXACT_D)
                    z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd,
                                mask=valid[:, None] & (d < D)[None, :], other=0.0).to(tl.float64)
                    e = tl.load(codebook_ptr + codes.to(tl.int64)[:, None] * stride_ck + d[None, :] * stride_cd,
                                mask=(codes < K)[:, None] & (d < D)[None, :], other=0.0).to(tl.float64)
                    diff = z[:, None, :] - e[None, :, :]
                    dist += tl.sum(diff * diff, axis=2)
                dist = tl.where(candidate, dist, float("inf"))
                tile_best = tl.min(dist, axis=1)
                tile_idx = tl.min(tl.where(dist == tile_best[:, None], codes[None, :], 2147483647), axis=1)
                better = tile_best < best  # strict: an earlier tile keeps its (lower) index on ties
                best_idx = tl.where(better, tile_idx, best_idx)
                best = tl.where(better, tile_best, best)
        _write_rows(z_ptr, codebook_ptr, indices_ptr, quantized_ptr, row_err_ptr, counts_ptr, sums_ptr, rows64,
                    valid, best_idx, D, stride_zn, stride_zd, stride_ck, stride_cd, GATHER_D, WANT_QUANTIZED,
                    WANT_STATS)


@triton.jit
def _loss_kernel(row_err_ptr, loss_ptr, N, scale_head, scale_tail, BLOCK: tl.constexpr):
    """loss = scale * sum(row_err), summed in float64 in a fixed order, stored in loss_ptr's dtype (fp32 or fp64)."""
    total = tl.zeros((BLOCK,), tl.float64)
    for i in range(0, N, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        total += tl.load(row_err_ptr + offs, mask=offs < N, other=0.0)
    total = tl.sum(total, axis=0)
    tl.store(loss_ptr, total * scale_head + total * scale_tail)  # see fp32_pair


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
    code: torch.dtype  # storage dtype of the prepared operands
    precision: str  # tl.dot input_precision
    z_terms: int  # z operand arrays: 1, 2 (a high and a low part) or 3 (16-bit re-scoring)
    split: bool  # both operands as high + low parts, three products (lo.hi + hi.lo + hi.hi)
    narrow_centre: bool  # 16-bit: centre only narrow columns, so centred codes stay exact
    flag_inexact: bool  # 16-bit main pass: flag rows whose centred z is not exact
    settle: bool  # keep the second best; rows within the error bound are re-scored exactly
    scale: bool  # scale the centred operands by a power of two (not fp16: its range is too small)
    name: str  # the fp32 precision's name (FP32_PRECISIONS), else the dtype's


# fp32 scoring, each exact through the same bound and re-scoring; VQVAE_FAST_TRITON_FP32_PRECISION picks one.
# bf16x3: three bf16 products of split operands (1.5x a TF32 pass of tensor-core time); tf32: one
# TF32 product (about 10x more rows re-scored: 5-50% at random and k-means-like data, D 8..256);
# tf32x3: three TF32 products (twice bf16x3's time); ieee: fp32 FMAs (no tensor cores).
FP32_PRECISIONS = ("bf16x3", "tf32", "tf32x3", "ieee")


def fp32_precision() -> str:
    name = os.environ.get("VQVAE_FAST_TRITON_FP32_PRECISION", "bf16x3")
    if name not in FP32_PRECISIONS:
        raise ValueError(f"VQVAE_FAST_TRITON_FP32_PRECISION={name!r}: choose one of {FP32_PRECISIONS}")
    return name


def mode_for(dtype: torch.dtype, *, rescoring: bool = False) -> Mode:
    if dtype == torch.float64:
        return Mode(torch.float64, torch.float64, "ieee", 1, False, False, False, False, True, "fp64")
    if dtype == torch.float32:
        name = fp32_precision()
        code = torch.bfloat16 if name == "bf16x3" else torch.float32
        split = name in ("bf16x3", "tf32x3")
        precision = "tf32" if name.startswith("tf32") else "ieee"
        return Mode(torch.float32, code, precision, 2 if split else 1, split, False, False, True, True, name)
    return Mode(torch.float32, dtype, "ieee", 3 if rescoring else 1, False, True, not rescoring, False,
                dtype == torch.bfloat16, str(dtype).removeprefix("torch."))


def settle_bound(mode: Mode, d_pad: int) -> tuple[float, float, float]:
    """(rel, norm, abs): the error of any fp32 score 1/2 |y|^2 - x.y is at most
    rel |x| Y + norm H + abs, Y and H the largest |y| and 1/2 |y|^2 over the codes.

    rel: the operands' rounding and dropped parts, per |x_i y_i| (summed: <= |x| |y|), plus
    the fp32 accumulation, taken as (terms + 16) * 2^-22 (twice a truncating adder's 2^-23
    per addition; the split modes' small products add 2^-7 of that); norm: the half norm
    rounded from float64 to fp32; abs: denormal operands or products flushed to zero, at most
    2^-126 times a value below 2^33 per product. With 1% of slack for the rounding of these
    coefficients and of the bound's own evaluation in fp32.
    """
    u = 2.0 ** -24
    accumulation = (d_pad + 16) * 2.0 ** -22
    if mode.name == "bf16x3":  # x32 = xh + xl + r, |r| <= 2^-16 |x32|: 3.1 2^-16 (csrc/cpu scan_amx), x32 vs x
        operands, accumulation = 3.1 * 2.0 ** -16 + 2 * u, accumulation * (1 + 2.0 ** -7)
    elif mode.name == "tf32x3":  # tails truncated to TF32 (2^-21 each), tail.tail dropped (2^-22)
        operands, accumulation = 2.0 ** -19 + 2 * u, accumulation * (1 + 2.0 ** -7)
    elif mode.name == "tf32":  # both operands rounded to TF32 after fp32: eps = 2^-11 + 2^-23 each
        eps = 2.0 ** -11 + 2.0 ** -23
        operands = 2 * eps + eps * eps
    else:  # ieee: fp32 operands
        operands = 2 * u + u * u
    slack = 1.01
    return (slack * (operands + accumulation * (1 + operands)), slack * u,
            slack * 3 * (d_pad + 16) * 2.0 ** (33 - 126))


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
    code_rows = block_k * (2 if mode.split else 1)
    if d_pad == block_d:
        return size * d_pad * (z_rows + stages * code_rows) + 8192
    return size * block_d * stages * (z_rows + code_rows) + 8192


def keep_config(config: triton.Config, machine: Machine, n: int, d_pad: int, block_d: int, mode: Mode) -> bool:
    """Whether a tile shape suits a problem: it fits shared memory and, as measured with
    scripts/inspect_kernels.py on sm_90 and sm_80, does not spill registers. The running best
    holds a score, an index and an accumulator per tile element (fp32: also the second best
    and the small products' accumulator): 32 elements per thread fit (fp64: 32-row tiles, 2
    stages); tiles with three dots per chunk of D (split operands and the 16-bit re-scoring,
    split-D) fit up to 64 x 32."""
    block_n, block_k = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    if machine.interpreted:
        return True
    if shared_bytes_estimate(block_n, block_k, config.num_stages, d_pad, block_d, mode) > machine.shared_bytes:
        return False
    if block_n * block_k > 32 * 32 * config.num_warps:
        return False
    if mode.acc == torch.float64 and (config.num_stages > 2 or block_n > 32):
        return False
    three_dots = mode.split or mode.z_terms == 3
    if three_dots and block_d < d_pad and block_n * block_k > 64 * 32:
        return False
    # The resident split z tile lives in registers: bf16x3 with 64 x 64 tiles spills at D = 256
    # on sm_90 (255 registers + 56 bytes) and at D = 128 on sm_80 (8-16 bytes); 64 x 32 does not.
    z_row_bytes = d_pad * mode.z_terms * (torch.finfo(mode.code).bits // 8)
    if mode.settle and block_d == d_pad and z_row_bytes >= 512 and block_n * block_k > 64 * 32:
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
    key=["n_bucket", "K_PAD", "D_PAD", "BLOCK_D", "codes_per_split", "Z_TERMS", "SPLIT", "PRECISION",
         "WANT_QUANTIZED", "WANT_STATS"],
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
    """Both sides centred on the codebook's centre, scaled, padded, in the form `tl.dot` takes."""
    z_op: torch.Tensor  # (N_PAD, D_PAD): x = s (z - c) (its high part when split)
    z_tail: torch.Tensor  # split: the low part; 16-bit: first remainder term of flagged rows
    z_tail2: torch.Tensor  # 16-bit: second remainder term of flagged rows
    codes: torch.Tensor  # (K_PAD, D_PAD): y = s (e - c) (its high part when split)
    codes_tail: torch.Tensor  # split: the low part
    half_norm: torch.Tensor  # (K_PAD,) 1/2 |y|^2, +inf for non-finite codes and padding
    row_norm: torch.Tensor  # (N_PAD,) fp32 |x|, NaN for rows with a NaN/Inf entry
    inexact: torch.Tensor | None  # 16-bit: (N_PAD,) int8, rows whose z - c is not exact
    scratch: torch.Tensor  # (2,) int64: flagged rows so far, bits of the largest half norm (fp64)
    centre: torch.Tensor  # (D_PAD,) fp64 c
    scale: torch.Tensor  # () fp64 s


Z_STAT_PROGRAMS = 64  # most programs reading z for its largest entry


class PrepareLaunch(NamedTuple):
    arange_d: int  # a power of two >= D_PAD
    code_stat_programs: int
    z_stat_programs: int
    stats_rows: int
    stats_warps: int  # the stats' per-column sums are fp64 vectors of all D: more warps for wide rows
    code_programs: int
    prepare_meta: dict


def prepare_launch(plan: SearchPlan, k: int = 1, n: int = 1) -> PrepareLaunch:
    arange_d = triton.next_power_of_2(plan.d_pad)
    mode = plan.mode
    block_r = max(1, min(64, 8192 // arange_d))  # a (BLOCK_R, arange_d) tile: 8192 values
    meta = dict(BLOCK_R=block_r, D_PAD=arange_d, ACC_DTYPE=_TL_DTYPE[mode.acc], CODE_DTYPE=_TL_DTYPE[mode.code],
                PRECISION=mode.precision, SPLIT=mode.split, NARROW_CENTRE=mode.narrow_centre,
                FLAG_INEXACT=mode.flag_inexact, SCALE=mode.scale, SETTLE=mode.settle,
                CODE_MAX=_CODE_MAX.get(mode.code, 0.0), Z_STAT_PROGRAMS=Z_STAT_PROGRAMS)
    stats_rows = max(1, min(16, 1024 // arange_d))  # 32 x 64 spilled 8 bytes (fp16, sm_90)
    stats_warps = max(4, min(16, arange_d // 128))
    return PrepareLaunch(arange_d, min(32, triton.cdiv(k, 256)), min(Z_STAT_PROGRAMS, triton.cdiv(max(n, 1), 1024)),
                         stats_rows, stats_warps,
                         triton.cdiv(plan.k_pad, block_r), meta)


def prepare_operands(z: torch.Tensor, codebook: torch.Tensor, plan: SearchPlan, stats: CodeStats | None = None
                     ) -> Operands:
    """Centre, scale, pad and convert both operands once per call: two launches, O((N + K) D).
    `stats`: per-code buffers for the search to accumulate into, zeroed here."""
    N, D = z.shape
    K = codebook.shape[0]
    mode = plan.mode
    launch = prepare_launch(plan, K, N)

    def empty(*shape, dtype=mode.code):
        return torch.empty(shape, dtype=dtype, device=z.device)

    code_stats = empty(launch.code_stat_programs, 4, launch.arange_d, dtype=torch.float64)
    z_max = empty(launch.z_stat_programs, dtype=torch.float64)
    scratch = empty(2, dtype=torch.int64)
    _stats_kernel[(launch.code_stat_programs + launch.z_stat_programs,)](
        codebook, z, code_stats, z_max, scratch, *(stats[:2] if stats else (None, None)), K, N, D,
        launch.code_stat_programs,
        triton.cdiv(K, launch.code_stat_programs), triton.cdiv(N, launch.z_stat_programs),
        codebook.stride(0), codebook.stride(1), z.stride(0), z.stride(1),
        BLOCK_R=launch.stats_rows, D_PAD=launch.arange_d, WANT_STATS=stats.level if stats else 0,
        num_warps=launch.stats_warps)

    two_terms = mode.z_terms > 1 or mode.flag_inexact
    z_op = empty(plan.n_pad, plan.d_pad)
    z_tail = empty(plan.n_pad, plan.d_pad) if two_terms else z_op
    z_tail2 = empty(plan.n_pad, plan.d_pad) if mode.flag_inexact else z_op
    codes = empty(plan.k_pad, plan.d_pad)
    codes_tail = empty(plan.k_pad, plan.d_pad) if mode.split else codes
    half_norm = empty(plan.k_pad, dtype=mode.acc)
    row_norm = empty(plan.n_pad, dtype=torch.float32)
    inexact = empty(plan.n_pad, dtype=torch.int8) if mode.flag_inexact else None
    centre_and_scale = empty(launch.arange_d + 1, dtype=torch.float64)
    z_programs = triton.cdiv(plan.n_pad, launch.prepare_meta["BLOCK_R"])
    _prepare_kernel[(launch.code_programs + z_programs,)](
        codebook, z, code_stats, z_max, centre_and_scale, codes, codes_tail, half_norm, z_op, z_tail, z_tail2,
        row_norm, inexact, scratch, K, N, D, plan.k_pad, plan.n_pad, plan.d_pad, launch.code_stat_programs,
        launch.z_stat_programs, launch.code_programs, codebook.stride(0), codebook.stride(1), z.stride(0),
        z.stride(1), **launch.prepare_meta)
    return Operands(z_op, z_tail, z_tail2, codes, codes_tail, half_norm, row_norm, inexact, scratch,
                    centre_and_scale[:launch.arange_d], centre_and_scale[launch.arange_d])


def search_meta(plan: SearchPlan, mode: Mode, *, want_quantized: bool, want_stats: int = 0,
                only_flagged: bool = False) -> dict:
    """The constexpr arguments of `_search_kernel` for a plan (tile sizes excepted)."""
    return dict(
        D_PAD=plan.d_pad, BLOCK_D=plan.block_d, ACC_DTYPE=_TL_DTYPE[mode.acc], DOT_DTYPE=_dot_dtype(mode, plan.machine),
        PRECISION=mode.precision, Z_TERMS=mode.z_terms, SPLIT=mode.split, SETTLE=mode.settle,
        ONLY_FLAGGED=only_flagged, SPLIT_K=plan.splits > 1, WANT_QUANTIZED=want_quantized, WANT_STATS=want_stats,
        GATHER_D=min(plan.block_d, 64))


def rescoring_plan(plan: SearchPlan) -> tuple[SearchPlan, triton.Config]:
    """The rare 16-bit re-scoring pass: z in three terms, so chunks of at most 32 values of D
    (three resident wide tiles would not fit, and on sm_80 every operand passes through
    registers: scripts/inspect_kernels.py), and the first tile shape that fits."""
    rescoring = plan._replace(mode=mode_for(plan.mode.code, rescoring=True), block_d=min(plan.d_pad, 32))
    configs = search_configs(plan.machine)
    fitting = [c for c in configs if keep_config(c, plan.machine, 1 << 20, rescoring.d_pad, rescoring.block_d,
                                                 rescoring.mode)]
    return rescoring, (fitting or configs[-1:])[0]


def rescore_meta(plan: SearchPlan, want_quantized: bool, want_stats: int = 0) -> dict:
    """`_rescore_kernel`'s tile: 16 flagged rows (tl.dot's least), 32 codes, chunks of D as the
    split-D search takes them, and (16, 32, 4) float64 differences for the exact distances
    (8 spill 16 bytes on sm_90 at D = 256)."""
    mode = plan.mode
    block_d = min(plan.d_pad, 64 if mode.code.itemsize == 2 else 32)
    return dict(BLOCK_N=16, BLOCK_K=32, D_PAD=plan.d_pad, BLOCK_D=block_d, EXACT_D=4, ACC_DTYPE=_TL_DTYPE[mode.acc],
                DOT_DTYPE=_dot_dtype(mode, plan.machine), PRECISION=mode.precision, Z_TERMS=mode.z_terms,
                SPLIT=mode.split, WANT_QUANTIZED=want_quantized, WANT_STATS=want_stats, GATHER_D=min(block_d, 64))


RESCORE_WARPS = 8  # with 4, its (16, 32) tiles and float64 differences spilled 8-16 bytes


def rescore_programs(n: int, machine: Machine) -> int:
    """A fixed grid (no host sync on the flagged count): enough programs to fill the GPU."""
    return max(1, min(triton.cdiv(n, 16), 4 * machine.num_sms))


class CodeStats(NamedTuple):
    """Per-code statistics of one search, accumulated by the rows' writers (atomics)."""
    counts: torch.Tensor  # (K,) fp32: rows per code (exact integers below 2^24)
    sums: torch.Tensor | None  # (K, D) fp32 (fp64 for fp64 z): the sum of each code's rows of z
    level: int  # 1: counts, 2: counts and sums


def _search(z: torch.Tensor, codebook: torch.Tensor, want_quantized: bool, stats: CodeStats | None = None):
    """(indices, quantized or None, per-row float64 squared error or None); `stats` filled in."""
    N, D = z.shape
    K = codebook.shape[0]
    plan = plan_search(N, K, D, z.dtype, machine_for(z.device))
    mode = plan.mode
    ops = prepare_operands(z, codebook, plan, stats)

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
    outputs = (indices, quantized, row_err, *(stats[:2] if stats else (None, None)))
    level = stats.level if stats else 0
    args = (z, codebook, *ops[:6], part_score, part_second, part_idx, ops.inexact, ops.row_norm, ops.scratch,
            flag_rows, flag_threshold, *outputs,
            N, D, plan.k_pad, plan.codes_per_split, min(N.bit_length(), 20), *bound, *strides)

    meta = search_meta(plan, mode, want_quantized=want_quantized, want_stats=level)
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
        meta = merge_meta(plan, want_quantized, level)
        _merge_kernel[(triton.cdiv(N, meta["BLOCK_N"]),)](
            part_score, part_second, part_idx, ops.row_norm, ops.scratch, flag_rows, flag_threshold,
            z, codebook, *outputs, N, D, plan.splits, *bound, *strides, **meta)
    if mode.settle:
        _rescore_kernel[(rescore_programs(N, plan.machine),)](
            z, codebook, ops.z_op, ops.z_tail, ops.codes, ops.codes_tail, ops.half_norm, ops.scratch, flag_rows,
            flag_threshold, *outputs, K, D, plan.k_pad, *strides,
            **rescore_meta(plan, want_quantized, level), num_warps=RESCORE_WARPS)
    return indices, quantized, row_err


def merge_meta(plan: SearchPlan, want_quantized: bool, want_stats: int = 0) -> dict:
    """64 rows at a time; fp64 in chunks of 32 values of D (64 spilled 48 bytes with the sums, sm_90)."""
    return dict(BLOCK_N=16 if plan.machine.interpreted else 64,
                BLOCK_D=min(plan.block_d, 32 if plan.mode.acc == torch.float64 else 64),
                ACC_DTYPE=_TL_DTYPE[plan.mode.acc], SETTLE=plan.mode.settle, WANT_QUANTIZED=want_quantized,
                WANT_STATS=want_stats)


LOSS_BLOCK = 1024  # row errors summed per step of the loss kernel


def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """indices (N,) int64 of the nearest codes: no gather, no loss."""
    if z.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=z.device)
    if z.shape[1] == 0:  # every code is at distance 0: the lowest index wins
        return torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    return _search(z, codebook, want_quantized=False)[0]


def quantize_fwd(z: torch.Tensor, codebook: torch.Tensor, beta: float, stats: CodeStats | None = None):
    """quantized (N, D) = codebook[indices], indices (N,) int64, loss () in z.dtype; `stats`
    (zeroed and) filled in by the search."""
    N, D = z.shape
    if N == 0 or D == 0:
        indices = torch.zeros(N, dtype=torch.long, device=z.device)
        quantized = torch.empty((N, D), dtype=codebook.dtype, device=z.device)
        if stats is not None:
            stats.counts.zero_()
            if stats.sums is not None:
                stats.sums.zero_()
        return quantized, indices, torch.full((), float("nan"), dtype=z.dtype, device=z.device)
    indices, quantized, row_err = _search(z, codebook, want_quantized=True, stats=stats)
    # 16-bit: stored as fp32 and converted by torch (the interpreter's conversion of values
    # below the 16-bit range is wrong: 7e-45 became 5.9e-39)
    loss = torch.empty((), dtype=z.dtype if z.dtype.itemsize >= 4 else torch.float32, device=z.device)
    _loss_kernel[(1,)](row_err, loss, N, *fp32_pair((1.0 + beta) / (N * D)), BLOCK=LOSS_BLOCK)
    return quantized, indices, loss.to(z.dtype)


def quantize_stats_fwd(z: torch.Tensor, codebook: torch.Tensor, beta: float, with_sums: bool):
    """quantize_fwd and the per-code statistics a VectorQuantizer step needs: counts (K,) fp32
    and, with_sums, the sums of each code's rows of z (K, D) (fp32; fp64 for fp64 z), from the
    search's epilogue. Under torch.use_deterministic_algorithms the sums are fixed-order
    segment sums (triton_quantize_bwd.code_sums) instead of atomics; counts are exact either way.
    16-bit inputs (whose rows may be written twice) count after the search."""
    K, D = codebook.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    counts = torch.empty(K, dtype=torch.float32, device=z.device)
    sums = torch.empty((K, D) if with_sums else (0,), dtype=acc, device=z.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    fused = not mode_for(z.dtype).flag_inexact
    level = 2 if with_sums and not deterministic else 1
    quantized, indices, loss = quantize_fwd(z, codebook, beta, CodeStats(counts, sums, level) if fused else None)
    from .triton_quantize_bwd import code_counts_and_sums, code_sums  # a cycle at import time otherwise

    if not fused:
        code_counts_and_sums(z, indices, counts, sums if level == 2 else None)
    if with_sums and level == 1:
        code_sums(z, indices, sums)
    return quantized, indices, loss, counts, sums
