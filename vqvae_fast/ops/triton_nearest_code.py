"""Triton nearest-code search and its fused straight-through backward.

Read top to bottom: the kernels, the launchers (check, allocate, launch), then the
registration as torch custom ops (see `registration.py` for fake and autograd).

Forward, one program per BLOCK_N rows of z: loop over codebook tiles of BLOCK_K codes,
score every (row, code) pair with ||e - c||^2 - 2 (z - c).(e - c) on tensor cores with
fp32 accumulation (c: the codebook mean, so a large shared offset cannot cancel), keep
the running min/argmin in registers, then gather the winning rows and their squared
error. Nothing N x K ever reaches memory. ||z - c||^2 is constant per row and skipped.

Backward: grad_z is element-wise; grad_codebook is a scatter-add by index, done with
float atomics, or (under torch.use_deterministic_algorithms) as fixed-order segment sums
over the indices sorted once.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import triton_interpreting as interpreting


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _nearest_code_fwd_kernel(
    # pointers
    z_ptr, codebook_ptr, centre_ptr, code_norm_ptr,
    indices_ptr, quantized_ptr, row_sq_err_ptr,
    # sizes
    N, K, D,
    # strides
    stride_zn, stride_zd, stride_cn, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)

    best = tl.full((BLOCK_N,), float("inf"), ACC_DTYPE)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_mask = codes < K
        codes64 = codes.to(tl.int64)
        dot = tl.zeros((BLOCK_N, BLOCK_K), ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            d_mask = d < D
            z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd,
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            e = tl.load(codebook_ptr + codes64[:, None] * stride_cn + d[None, :] * stride_cd,
                        mask=code_mask[:, None] & d_mask[None, :], other=0.0)
            centre = tl.load(centre_ptr + d, mask=d_mask, other=0.0)[None, :]
            # The centre is all zeros for 16-bit inputs: their products are exact in fp32.
            zc = (z.to(ACC_DTYPE) - centre).to(DOT_DTYPE)
            ec = (e.to(ACC_DTYPE) - centre).to(DOT_DTYPE)
            dot = tl.dot(zc, tl.trans(ec), dot, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        norms = tl.load(code_norm_ptr + codes, mask=code_mask, other=float("inf"))
        scores = norms[None, :] - 2.0 * dot
        # NaN never wins: such rows keep index 0 (in range) instead of an arbitrary one.
        scores = tl.where(scores == scores, scores, float("inf"))
        tile_best = tl.min(scores, axis=1)
        tile_idx = tl.argmin(scores, axis=1) + k0
        # Strict < keeps the lowest index on ties across tiles (argmin does within a tile).
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    tl.store(indices_ptr + rows64, best_idx.to(tl.int64), mask=row_mask)

    # Gather the winners and their exact squared error (for the loss).
    best64 = best_idx.to(tl.int64)
    sq_err = tl.zeros((BLOCK_N,), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        mask = row_mask[:, None] & (d < D)[None, :]
        z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd, mask=mask, other=0.0)
        e = tl.load(codebook_ptr + best64[:, None] * stride_cn + d[None, :] * stride_cd, mask=mask, other=0.0)
        tl.store(quantized_ptr + rows64[:, None] * D + d[None, :], e, mask=mask)
        diff = z.to(ACC_DTYPE) - e.to(ACC_DTYPE)
        sq_err += tl.sum(diff * diff, axis=1)
    tl.store(row_sq_err_ptr + rows64, sq_err, mask=row_mask)


@triton.jit
def _grad_z_kernel(
    # pointers
    grad_q_ptr, z_ptr, codebook_ptr, indices_ptr, grad_loss_ptr, grad_z_ptr,
    # sizes and the loss scale 2 * beta / (N * D)
    N, D, scale,
    # strides
    stride_gn, stride_gd, stride_zn, stride_zd, stride_cn, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """grad_z = grad_quantized (straight through) + grad_loss * scale * (z - e_idx)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    idx = tl.load(indices_ptr + rows64, mask=row_mask, other=0)
    coef = tl.load(grad_loss_ptr).to(ACC_DTYPE) * scale
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        g = tl.load(grad_q_ptr + rows64[:, None] * stride_gn + d[None, :] * stride_gd, mask=mask, other=0.0)
        z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd, mask=mask, other=0.0)
        e = tl.load(codebook_ptr + idx[:, None] * stride_cn + d[None, :] * stride_cd, mask=mask, other=0.0)
        out = g.to(ACC_DTYPE) + coef * (z.to(ACC_DTYPE) - e.to(ACC_DTYPE))
        tl.store(grad_z_ptr + rows64[:, None] * D + d[None, :], out.to(z.dtype), mask=mask)


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


# ----------------------------------------------------------------------------- launchers

_TL_DTYPE = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_d(D: int, cap: int) -> int:
    # tl.dot needs every tile side >= 16.
    return max(16, min(cap, triton.next_power_of_2(max(D, 1))))


def _fwd_configs():
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2), (32, 64, 4, 2)]
    ]


# Autotuned on GPUs, keyed on the sizes that change the best tiling; the interpreter
# would spend minutes timing configs on numpy, so it gets one small fixed config.
_nearest_code_fwd_tuned = triton.autotune(configs=_fwd_configs(), key=["K", "D"])(
    _nearest_code_fwd_kernel)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 on tensor cores as 3xTF32 is near-fp32 accurate; plain TF32 flips neighbours.
    if dtype == torch.float32 and not interpreting():
        return os.environ.get("VQVAE_FAST_TRITON_FP32_PRECISION", "tf32x3")
    return "ieee"


def _dot_dtype(dtype: torch.dtype):
    # The interpreter's numpy matmul has no bf16: widen to fp32 there (products of bf16
    # values are exact in fp32, so the scores are the same as on tensor cores).
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPE[dtype]


def nearest_code_fwd(z: torch.Tensor, codebook: torch.Tensor, beta: float):
    """quantized (N, D) = codebook[indices], indices (N,) int64, loss () in z.dtype."""
    N, D = z.shape
    K = codebook.shape[0]
    acc = _acc_dtype(z.dtype)
    indices = torch.empty(N, dtype=torch.long, device=z.device)
    quantized = torch.empty((N, D), dtype=codebook.dtype, device=z.device)
    row_sq_err = torch.empty(N, dtype=acc, device=z.device)
    if N == 0:
        return quantized, indices, torch.full((), float("nan"), dtype=z.dtype, device=z.device)
    # Centre on the codebook mean (fp32/fp64 only: 16-bit products are exact, and the
    # centred values would be rounded back to 16 bits). Norms are computed once per call.
    if z.dtype in (torch.float32, torch.float64):
        centre = codebook.to(acc).mean(0)
    else:
        centre = torch.zeros(D, dtype=acc, device=z.device)
    code_norm = (codebook.to(acc) - centre).pow(2).sum(1)
    args = (z, codebook, centre, code_norm, indices, quantized, row_sq_err, N, K, D,
            z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1))
    meta = dict(BLOCK_D=_block_d(D, 64 if z.dtype == torch.float64 else 128),
                ACC_DTYPE=_TL_DTYPE[acc], DOT_DTYPE=_dot_dtype(z.dtype), DOT_PRECISION=_dot_precision(z.dtype))
    if interpreting():
        _nearest_code_fwd_kernel[(triton.cdiv(N, 16),)](*args, BLOCK_N=16, BLOCK_K=16, **meta)
    else:
        grid = lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]),)  # noqa: E731
        _nearest_code_fwd_tuned[grid](*args, **meta)
    loss = row_sq_err.sum() * ((1.0 + beta) / (N * D)) if D else row_sq_err.sum() * float("nan")
    return quantized, indices, loss.to(z.dtype)


def quantize_bwd(grad_quantized, grad_loss, z, codebook, indices, beta: float):
    """(grad_z, grad_codebook) of the straight-through estimator and the VQ losses."""
    N, D = z.shape
    K = codebook.shape[0]
    acc = _acc_dtype(z.dtype)
    tl_acc = _TL_DTYPE[acc]
    grad_z = torch.empty((N, D), dtype=z.dtype, device=z.device)
    diff = torch.zeros((K, D), dtype=acc, device=z.device)
    if N == 0 or D == 0:
        return grad_z, diff.to(codebook.dtype)
    block_n, block_d = 32, _block_d(D, 64)
    strides = (z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1))
    grid = (triton.cdiv(N, block_n),)
    _grad_z_kernel[grid](grad_quantized, z, codebook, indices, grad_loss, grad_z, N, D, 2.0 * beta / (N * D),
                         grad_quantized.stride(0), grad_quantized.stride(1), *strides,
                         BLOCK_N=block_n, BLOCK_D=block_d, ACC_DTYPE=tl_acc)
    if torch.are_deterministic_algorithms_enabled():
        order = torch.sort(indices, stable=True).indices
        starts = torch.zeros(K + 1, dtype=torch.long, device=z.device)
        torch.cumsum(torch.bincount(indices, minlength=K), 0, out=starts[1:])
        _codebook_diff_segment_kernel[(K, triton.cdiv(D, block_d))](
            z, codebook, order, starts, diff, D, *strides, BLOCK_R=32, BLOCK_D=block_d, ACC_DTYPE=tl_acc)
    else:
        _codebook_diff_atomic_kernel[grid](z, codebook, indices, diff, N, D, *strides,
                                           BLOCK_N=block_n, BLOCK_D=block_d, ACC_DTYPE=tl_acc)
    grad_codebook = diff * (grad_loss.to(acc) * (2.0 / (N * D)))
    return grad_z, grad_codebook.to(codebook.dtype)
