"""Triton backward of `quantize`: the straight-through (or rotation-trick) gradient to z and
the codebook-loss gradient, fused with the commitment term.

grad_z is element-wise; grad_codebook is a scatter-add by index, done with float atomics, or
(under torch.use_deterministic_algorithms) as fixed-order segment sums over the indices
sorted once. Each is skipped when its input does not need a gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_plan import _TL_DTYPE, fp32_pair

# ----------------------------------------------------------------------------- kernels


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
        if z_raw.dtype != tl.float64:
            out = out.to(tl.float32)  # fp64 to 16 bits through fp32, as on a GPU (the interpreter's direct one is wrong)
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
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, DIFF: tl.constexpr,
):
    """out[k] = count_k * e_k - sum of the z rows assigned to k (DIFF), or that sum alone,
    summed in a fixed order."""
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
    if DIFF:
        e = tl.load(codebook_ptr + code * stride_cn + d * stride_cd, mask=d_mask, other=0.0)
        count = (end - start).to(ACC_DTYPE)
        total = count * e.to(ACC_DTYPE) - total
    tl.store(out_ptr + code * D + d, total, mask=d_mask)


@triton.jit
def _code_stats_kernel(
    # pointers; counts (K,) fp32 and sums (K, D), zero-filled
    z_ptr, indices_ptr, counts_ptr, sums_ptr,
    # sizes
    N, D,
    # strides
    stride_zn, stride_zd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WANT_SUMS: tl.constexpr,
):
    """counts[idx_i] += 1 and (WANT_SUMS) sums[idx_i] += z_i, with atomics."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    idx = tl.load(indices_ptr + rows64, mask=row_mask, other=0)
    tl.atomic_add(counts_ptr + idx, tl.full((BLOCK_N,), 1.0, tl.float32), mask=row_mask)
    if WANT_SUMS:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (d < D)[None, :]
            z = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd, mask=mask, other=0.0)
            tl.atomic_add(sums_ptr + idx[:, None] * D + d[None, :], z.to(sums_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

SEGMENT_ROWS = 32  # rows per step of the deterministic codebook-gradient kernel


def backward_meta(d: int, acc: torch.dtype) -> dict:
    return dict(BLOCK_N=32, BLOCK_D=max(16, min(64, triton.next_power_of_2(d))), ACC_DTYPE=_TL_DTYPE[acc])


def grad_z_meta(d: int, acc: torch.dtype, rotation: bool) -> dict:
    """The grad_z kernel's tile. The rotation works in float64 whatever the dtype: its per-row
    sums of squares overflow fp32 from |z| ~ 1e18 and underflow below ~1e-19, and leaving the
    straight-through gradient there would be a silent change of estimator. It keeps more
    per-row state live, and in fp64 a 32 x 64 tile spills on sm_90 (scripts/inspect_kernels.py),
    so it takes 32 x 32."""
    if rotation:
        acc = torch.float64
    meta = dict(backward_meta(d, acc), ROTATION=rotation)
    if rotation:
        meta["BLOCK_D"] = min(meta["BLOCK_D"], 32)
    return meta


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
        _segment_sums(z, codebook, indices, diff, meta, diff=True)
    elif N and D:
        _codebook_diff_atomic_kernel[grid](z, codebook, indices, diff, N, D, *strides, **meta)
    scale = 2.0 / (N * D) if N * D else 0.0
    return grad_z, (diff * (grad_loss.to(acc) * scale)).to(codebook.dtype)


def _segment_sums(z, codebook, indices, out, meta, diff: bool):
    """out[k] = (count_k e_k -) the sum of the rows of z assigned to code k, in a fixed order:
    the rows sorted by code once (stable), then one program per code and chunk of D."""
    K, D = out.shape
    order = torch.sort(indices, stable=True).indices
    starts = torch.zeros(K + 1, dtype=torch.long, device=z.device)
    torch.cumsum(torch.bincount(indices, minlength=K), 0, out=starts[1:])
    _codebook_diff_segment_kernel[(K, triton.cdiv(D, meta["BLOCK_D"]))](
        z, codebook, order, starts, out, D, z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
        BLOCK_R=SEGMENT_ROWS, BLOCK_D=meta["BLOCK_D"], ACC_DTYPE=meta["ACC_DTYPE"], DIFF=diff)


def code_sums(z: torch.Tensor, indices: torch.Tensor, sums: torch.Tensor) -> None:
    """sums (K, D) = the sum of each code's rows of z, deterministic (fixed order)."""
    if z.shape[0] == 0 or z.shape[1] == 0:
        sums.zero_()
        return
    _segment_sums(z, z, indices, sums, backward_meta(z.shape[1], sums.dtype), diff=False)


def code_counts_and_sums(z: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                         sums: torch.Tensor | None) -> None:
    """counts (K,) and sums (K, D) (None: counts only) of the rows of z per code, with atomics."""
    counts.zero_()
    if sums is not None:
        sums.zero_()
    N, D = z.shape
    if N == 0:
        return
    meta = backward_meta(D, torch.float32)
    _code_stats_kernel[(triton.cdiv(N, meta["BLOCK_N"]),)](
        z, indices, counts, sums, N, D, z.stride(0), z.stride(1), BLOCK_N=meta["BLOCK_N"],
        BLOCK_D=meta["BLOCK_D"], WANT_SUMS=sums is not None)
