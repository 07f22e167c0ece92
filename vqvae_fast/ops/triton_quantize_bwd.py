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
from .triton_prepare import normalize_eps, unit_rows

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _inverse_norms_kernel(
    # pointers: z (N, D), codebook (K, D) in; (N,) and (K,) fp64 1 / max(|row|, eps) out
    z_ptr, codebook_ptr, z_inv_ptr, code_inv_ptr,
    # sizes
    N, K, D, z_programs,
    # strides
    stride_zn, stride_zd, stride_cn, stride_cd,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The reciprocal norms the cosine backward normalises with: programs below z_programs
    take BLOCK_R rows of z, the others BLOCK_R codes; sums of squares in float64."""
    pid = tl.program_id(0)
    if pid < z_programs:
        _store_inverse_norms(z_ptr, z_inv_ptr, pid * BLOCK_R + tl.arange(0, BLOCK_R), N, D, stride_zn, stride_zd,
                             BLOCK_R, BLOCK_D)
    else:
        _store_inverse_norms(codebook_ptr, code_inv_ptr, (pid - z_programs) * BLOCK_R + tl.arange(0, BLOCK_R), K, D,
                             stride_cn, stride_cd, BLOCK_R, BLOCK_D)


@triton.jit
def _store_inverse_norms(x_ptr, inv_ptr, rows, count, D, stride_r, stride_d, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    rows64 = rows.to(tl.int64)
    squares = tl.zeros((BLOCK_R,), tl.float64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows64[:, None] * stride_r + d[None, :] * stride_d,
                    mask=(rows < count)[:, None] & (d < D)[None, :], other=0.0).to(tl.float64)
        squares += tl.sum(x * x, axis=1)
    tl.store(inv_ptr + rows64, 1.0 / tl.maximum(tl.sqrt(squares), normalize_eps()), mask=rows < count)


@triton.jit
def _unit_chunk(ptr, rows64, stride_r, stride_d, d, mask, inv, ACC_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr):
    """A chunk of rows of z or of codes in ACC_DTYPE, l2-normalised as the forward saw them (NORMALIZE)."""
    x = tl.load(ptr + rows64[:, None] * stride_r + d[None, :] * stride_d, mask=mask, other=0.0)
    return unit_rows(x, inv, NORMALIZE).to(ACC_DTYPE)


@triton.jit
def _normalization_grad(grad, unit, dot, inv):
    """The gradient through x -> x / max(|x|, eps) (torch.nn.functional.normalize): the part of
    `grad` orthogonal to the unit vector, over |x| (grad / eps where the norm is clamped);
    dot = unit . grad per row, inv = 1 / max(|x|, eps)."""
    clamped = inv >= 1.0 / normalize_eps()
    projected = grad - unit * tl.where(clamped, 0.0, dot)[:, None]
    return projected * inv[:, None].to(grad.dtype)


@triton.jit
def _grad_z_kernel(
    # pointers; NORMALIZE: z_inv (N,), code_inv (K,) fp64 1 / max(|row|, eps)
    grad_q_ptr, z_ptr, codebook_ptr, indices_ptr, grad_loss_ptr, grad_z_ptr, z_inv_ptr, code_inv_ptr,
    # sizes and the loss scale 2 * beta / (N * D) as an fp32 pair (fp32_pair)
    N, D, scale_head, scale_tail,
    # strides
    stride_gn, stride_gd, stride_zn, stride_zd, stride_cn, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, ROTATION: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    """grad_z = grad_quantized (straight through, or rotated: ROTATION) + grad_loss * scale * (z - e_idx).

    The rotation trick: rot(g) = lam (g - 2 w (w . g) + 2 u (q . g)), u = z / |z|, q = e / |e|,
    lam = |e| / |z|, w = (u + q) / |u + q|, from per-row sums over D taken in two first passes;
    guards as in vqvae_fast/reference.py (g unchanged when lam is outside [1e-6, 1e6], w = 0 when
    |u + q| <= 1e-6).
    NORMALIZE (cosine): z and e above are the l2-normalised vectors, and the result is taken
    back through z's normalisation (`_normalization_grad`, from one more pass over D)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    idx = tl.load(indices_ptr + rows64, mask=row_mask, other=0)
    grad_loss = tl.load(grad_loss_ptr).to(ACC_DTYPE)
    coef = grad_loss * scale_head + grad_loss * scale_tail  # in ACC_DTYPE: see fp32_pair
    g_rows = grad_q_ptr + rows64[:, None] * stride_gn
    z_inv = rows64.to(tl.float64)  # placeholders unless NORMALIZE
    e_inv = z_inv
    if NORMALIZE:
        z_inv = tl.load(z_inv_ptr + rows64, mask=row_mask, other=1.0)
        e_inv = tl.load(code_inv_ptr + idx, mask=row_mask, other=1.0)
    one = tl.full((BLOCK_N,), 1.0, ACC_DTYPE)
    nz, ne, ns, wg, qg, lam, scale = one, one, one, one, one, one, one
    regular = rows < 0
    reflect = regular
    if ROTATION:
        # Each row pair scaled by a power of two, its largest finite entry to [0.5, 1) (exact), as
        # in reference.rotation_gradient: float64 sums of squares underflow below ~1e-162 and
        # overflow beyond ~1e154. The rotation does not depend on the scale. Cosine: unit vectors
        # need none.
        if not NORMALIZE:
            peak = tl.zeros((BLOCK_N,), ACC_DTYPE)
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                mask = row_mask[:, None] & (d < D)[None, :]
                _, z, e = _grad_chunk(g_rows, z_ptr, codebook_ptr, rows64, idx, d, mask, stride_gd, stride_zn,
                                      stride_zd, stride_cn, stride_cd, z_inv, e_inv, ACC_DTYPE, NORMALIZE)
                peak = tl.maximum(peak, tl.maximum(_finite_abs_max(z), _finite_abs_max(e)))
            scale = _inverse_power_of_two(peak)
        zz = tl.zeros((BLOCK_N,), ACC_DTYPE)
        ee = tl.zeros((BLOCK_N,), ACC_DTYPE)
        gz = tl.zeros((BLOCK_N,), ACC_DTYPE)
        ge = tl.zeros((BLOCK_N,), ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (d < D)[None, :]
            g, z, e = _grad_chunk(g_rows, z_ptr, codebook_ptr, rows64, idx, d, mask, stride_gd, stride_zn, stride_zd,
                                  stride_cn, stride_cd, z_inv, e_inv, ACC_DTYPE, NORMALIZE)
            z = z * scale[:, None]
            e = e * scale[:, None]
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
            _, z, e = _grad_chunk(g_rows, z_ptr, codebook_ptr, rows64, idx, d, mask, stride_gd, stride_zn, stride_zd,
                                  stride_cn, stride_cd, z_inv, e_inv, ACC_DTYPE, NORMALIZE)
            s = z * scale[:, None] / nz[:, None] + e * scale[:, None] / ne[:, None]
            ss += tl.sum(s * s, axis=1)
        ns = tl.sqrt(ss)
        reflect = ns <= 1e-6
        ns = tl.where(reflect, 1.0, ns)
        wg = tl.where(reflect, 0.0, (gz / nz + ge / ne) / ns)  # w . g
        qg = ge / ne
        lam = ne / nz
    dot = tl.zeros((BLOCK_N,), ACC_DTYPE)  # NORMALIZE: unit z . the gradient to it
    if NORMALIZE:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (d < D)[None, :]
            g, z, e = _grad_chunk(g_rows, z_ptr, codebook_ptr, rows64, idx, d, mask, stride_gd, stride_zn, stride_zd,
                                  stride_cn, stride_cd, z_inv, e_inv, ACC_DTYPE, NORMALIZE)
            out = _grad_to_unit(g, z, e, coef, scale, nz, ne, ns, reflect, regular, wg, qg, lam, ROTATION)
            dot += tl.sum(z * out, axis=1)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        g, z, e = _grad_chunk(g_rows, z_ptr, codebook_ptr, rows64, idx, d, mask, stride_gd, stride_zn, stride_zd,
                              stride_cn, stride_cd, z_inv, e_inv, ACC_DTYPE, NORMALIZE)
        out = _grad_to_unit(g, z, e, coef, scale, nz, ne, ns, reflect, regular, wg, qg, lam, ROTATION)
        if NORMALIZE:
            out = _normalization_grad(out, z, dot, z_inv)
        out_dtype = grad_z_ptr.dtype.element_ty
        if out_dtype != tl.float64:
            out = out.to(tl.float32)  # fp64 to 16 bits through fp32, as on a GPU (the interpreter's direct one is wrong)
        tl.store(grad_z_ptr + rows64[:, None] * D + d[None, :], out.to(out_dtype), mask=mask)


@triton.jit
def _grad_chunk(g_rows, z_ptr, codebook_ptr, rows64, idx, d, mask, stride_gd, stride_zn, stride_zd, stride_cn, stride_cd,
                z_inv, e_inv, ACC_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr):
    """Columns d of the rows' incoming gradient, z and chosen code (normalised for cosine), in ACC_DTYPE."""
    g = tl.load(g_rows + d[None, :] * stride_gd, mask=mask, other=0.0).to(ACC_DTYPE)
    z = _unit_chunk(z_ptr, rows64, stride_zn, stride_zd, d, mask, z_inv, ACC_DTYPE, NORMALIZE)
    e = _unit_chunk(codebook_ptr, idx, stride_cn, stride_cd, d, mask, e_inv, ACC_DTYPE, NORMALIZE)
    return g, z, e


@triton.jit
def _grad_to_unit(g, z, e, coef, scale, nz, ne, ns, reflect, regular, wg, qg, lam, ROTATION: tl.constexpr):
    """A chunk of the gradient to z (to the normalised z, for cosine): g, straight through or
    rotated (ROTATION, with the per-row sums and scales of the first passes), plus the commitment
    term (none when the loss has no gradient: not 0 * NaN for a code with a NaN entry)."""
    if ROTATION:
        u = z * scale[:, None] / nz[:, None]
        w = tl.where(reflect[:, None], 0.0, (u + e * scale[:, None] / ne[:, None]) / ns[:, None])
        rotated = lam[:, None] * (g - 2.0 * w * wg[:, None] + 2.0 * u * qg[:, None])
        g = tl.where(regular[:, None], rotated, g)
    if coef != 0.0:  # one branch for the whole launch
        g = g + coef * (z - e)
    return g


@triton.jit
def _finite_abs_max(x):
    """Per row, the largest |entry| of x that is finite (0 if none): x - x is 0 only for those."""
    return tl.max(tl.where(x - x == 0.0, tl.abs(x), 0.0), axis=1)


@triton.jit
def _inverse_power_of_two(peak):
    """2^-e (float64) with peak = m 2^e, m in [0.5, 1) (frexp), e clamped to [-1000, 1000]: read
    from the exponent bits (0 and subnormal peaks take 2^1000)."""
    biased = (peak.to(tl.int64, bitcast=True) >> 52) & 0x7FF
    power = tl.minimum(tl.maximum(1022 - biased, -1000), 1000)
    return ((power + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _codebook_diff_atomic_kernel(
    # pointers; out: (K, D) ACC_DTYPE, zero-filled
    z_ptr, codebook_ptr, indices_ptr, out_ptr, z_inv_ptr, code_inv_ptr,
    # sizes
    N, D,
    # strides
    stride_zn, stride_zd, stride_cn, stride_cd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """out[idx_i] += e_idx_i - z_i (NORMALIZE: of the normalised vectors), with float atomics
    (fast, order not fixed)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    idx = tl.load(indices_ptr + rows64, mask=row_mask, other=0)
    z_inv = rows64.to(tl.float64)  # placeholders unless NORMALIZE
    e_inv = z_inv
    if NORMALIZE:
        z_inv = tl.load(z_inv_ptr + rows64, mask=row_mask, other=1.0)
        e_inv = tl.load(code_inv_ptr + idx, mask=row_mask, other=1.0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (d < D)[None, :]
        z = _unit_chunk(z_ptr, rows64, stride_zn, stride_zd, d, mask, z_inv, ACC_DTYPE, NORMALIZE)
        e = _unit_chunk(codebook_ptr, idx, stride_cn, stride_cd, d, mask, e_inv, ACC_DTYPE, NORMALIZE)
        tl.atomic_add(out_ptr + idx[:, None] * D + d[None, :], e - z, mask=mask)


@triton.jit
def _codebook_diff_segment_kernel(
    # pointers; order: row ids sorted by code; starts: (K + 1,) segment bounds; out: (K, D)
    z_ptr, codebook_ptr, order_ptr, starts_ptr, out_ptr, z_inv_ptr, code_inv_ptr,
    # sizes
    D,
    # strides
    stride_zn, stride_zd, stride_cn, stride_cd,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, DIFF: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    """out[k] = count_k * e_k - sum of the z rows assigned to k (DIFF), or that sum alone,
    summed in a fixed order (NORMALIZE: of the normalised vectors)."""
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
        z_inv = rows.to(tl.float64)
        if NORMALIZE:
            z_inv = tl.load(z_inv_ptr + rows, mask=r_mask, other=1.0)
        z = _unit_chunk(z_ptr, rows, stride_zn, stride_zd, d, r_mask[:, None] & d_mask[None, :], z_inv, ACC_DTYPE,
                        NORMALIZE)
        total += tl.sum(z, axis=0)
    if DIFF:
        e = tl.load(codebook_ptr + code * stride_cn + d * stride_cd, mask=d_mask, other=0.0)
        if NORMALIZE:
            e = unit_rows(e[None, :], tl.load(code_inv_ptr + code + tl.arange(0, 1)), NORMALIZE).reshape(BLOCK_D)
        count = (end - start).to(ACC_DTYPE)
        total = count * e.to(ACC_DTYPE) - total
    tl.store(out_ptr + code * D + d, total, mask=d_mask)


@triton.jit
def _code_stats_kernel(
    # pointers; counts (K,) fp32 and sums (K, D), zero-filled
    z_ptr, indices_ptr, counts_ptr, sums_ptr, z_inv_ptr,
    # sizes
    N, D,
    # strides
    stride_zn, stride_zd,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WANT_SUMS: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """counts[idx_i] += 1 and (WANT_SUMS) sums[idx_i] += z_i (NORMALIZE: normalised), with atomics."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    idx = tl.load(indices_ptr + rows64, mask=row_mask, other=0)
    tl.atomic_add(counts_ptr + idx, tl.full((BLOCK_N,), 1.0, tl.float32), mask=row_mask)
    if WANT_SUMS:
        z_inv = rows64.to(tl.float64)
        if NORMALIZE:
            z_inv = tl.load(z_inv_ptr + rows64, mask=row_mask, other=1.0)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (d < D)[None, :]
            z = _unit_chunk(z_ptr, rows64, stride_zn, stride_zd, d, mask, z_inv, sums_ptr.dtype.element_ty, NORMALIZE)
            tl.atomic_add(sums_ptr + idx[:, None] * D + d[None, :], z.to(sums_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _codebook_normalization_grad_kernel(
    # pointers: diff (K, D) ACC_DTYPE = count_k e_k - sum of z (normalised); code_inv (K,) fp64;
    # grad_loss (); out (K, D) in the codebook's dtype
    diff_ptr, codebook_ptr, code_inv_ptr, grad_loss_ptr, out_ptr,
    # sizes and the loss scale 2 / (N * D) as an fp32 pair (fp32_pair)
    K, D, scale_head, scale_tail,
    # strides of the codebook
    stride_cn, stride_cd,
    # meta-parameters
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """The cosine codebook gradient: grad_loss * scale * diff is the gradient to the normalised
    codes, taken back through their normalisation (`_normalization_grad`; two passes over D)."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    k64 = k.to(tl.int64)
    grad_loss = tl.load(grad_loss_ptr).to(ACC_DTYPE)
    coef = grad_loss * scale_head + grad_loss * scale_tail
    inv = tl.load(code_inv_ptr + k64, mask=k_mask, other=1.0)
    dot = tl.zeros((BLOCK_K,), ACC_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = k_mask[:, None] & (d < D)[None, :]
        unit = _unit_chunk(codebook_ptr, k64, stride_cn, stride_cd, d, mask, inv, ACC_DTYPE, True)
        dot += tl.sum(unit * tl.load(diff_ptr + k64[:, None] * D + d[None, :], mask=mask, other=0.0) * coef, axis=1)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = k_mask[:, None] & (d < D)[None, :]
        unit = _unit_chunk(codebook_ptr, k64, stride_cn, stride_cd, d, mask, inv, ACC_DTYPE, True)
        grad = tl.load(diff_ptr + k64[:, None] * D + d[None, :], mask=mask, other=0.0) * coef
        out = _normalization_grad(grad, unit, dot, inv)
        if out_ptr.dtype.element_ty != tl.float64:
            out = out.to(tl.float32)  # to 16 bits through fp32 (the interpreter's direct conversion is wrong)
        tl.store(out_ptr + k64[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

SEGMENT_ROWS = 32  # rows per step of the deterministic codebook-gradient kernel; not measured (static: 40-56 registers)


def backward_meta(d: int, acc: torch.dtype) -> dict:
    """32 rows x up to 64 values of D: not measured for time; static: no spill in any backward
    kernel, 40-222 registers, sm_90 and sm_80 (static and moved: scripts/inspect_kernels.py, triton 3.8.0, 2026-12-07; see triton_plan's docstring)."""
    return dict(BLOCK_N=32, BLOCK_D=max(16, min(64, triton.next_power_of_2(d))), ACC_DTYPE=_TL_DTYPE[acc])


def grad_z_meta(d: int, acc: torch.dtype, rotation: bool) -> dict:
    """The grad_z kernel's tile. The rotation works in float64 whatever the dtype: its per-row
    sums of squares overflow fp32 from |z| ~ 1e18 and underflow below ~1e-19, and leaving the
    straight-through gradient there would be a silent change of estimator. It keeps more
    per-row state live, and in fp64 a 32 x 64 tile spills on sm_90 (scripts/inspect_kernels.py),
    so it takes 32 x 32. Moved to 32 x 64 (2026-12-07): fp64 384-408 bytes (cosine 632), fp32
    56-72 (cosine 168-184), sm_80 and sm_90."""
    if rotation:
        acc = torch.float64
    meta = dict(backward_meta(d, acc), ROTATION=rotation)
    if rotation:
        meta["BLOCK_D"] = min(meta["BLOCK_D"], 32)
    return meta


def quantize_bwd(grad_quantized, grad_loss, z, codebook, indices, beta: float, need_grad_z: bool,
                 need_grad_codebook: bool, rotation: bool = False, normalize: bool = False):
    """(grad_z, grad_codebook) of the straight-through estimator (or the rotation trick's)
    and the VQ losses; a gradient that is not needed comes back as an empty tensor and costs
    nothing. `normalize` (cosine): the forward worked on the l2-normalised rows and codes, and
    both gradients go back through the normalisation."""
    N, D = z.shape
    K = codebook.shape[0]
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    meta = dict(backward_meta(D, acc), NORMALIZE=normalize)
    grad_z = torch.empty((N, D) if need_grad_z else (0,), dtype=z.dtype, device=z.device)
    strides = (z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1))
    grid = (triton.cdiv(N, meta["BLOCK_N"]),)
    inverse_norms = _inverse_norms(z, codebook, meta) if normalize and N and D else (None, None)
    if need_grad_z and N and D:
        _grad_z_kernel[grid](grad_quantized, z, codebook, indices, grad_loss, grad_z, *inverse_norms, N, D,
                             *fp32_pair(2.0 * beta / (N * D)), grad_quantized.stride(0), grad_quantized.stride(1),
                             *strides, **grad_z_meta(D, acc, bool(rotation)), NORMALIZE=normalize)
    if not need_grad_codebook:
        return grad_z, torch.empty(0, dtype=codebook.dtype, device=z.device)
    diff = torch.zeros((K, D), dtype=acc, device=z.device)
    if N and D and torch.are_deterministic_algorithms_enabled():
        _segment_sums(z, codebook, indices, diff, meta, diff=True, inverse_norms=inverse_norms)
    elif N and D:
        _codebook_diff_atomic_kernel[grid](z, codebook, indices, diff, *inverse_norms, N, D, *strides, **meta)
    scale = 2.0 / (N * D) if N * D else 0.0
    if not (normalize and N and D):
        return grad_z, (diff * (grad_loss.to(acc) * scale)).to(codebook.dtype)
    grad_codebook = torch.empty_like(codebook)
    _codebook_normalization_grad_kernel[(triton.cdiv(K, CODE_BLOCK),)](
        diff, codebook, inverse_norms[1], grad_loss, grad_codebook, K, D, *fp32_pair(scale), codebook.stride(0),
        codebook.stride(1), BLOCK_K=CODE_BLOCK, BLOCK_D=meta["BLOCK_D"], ACC_DTYPE=meta["ACC_DTYPE"])
    return grad_z, grad_codebook


CODE_BLOCK = 32  # codes per program of the cosine codebook gradient; not measured (static: 56 registers)


def _inverse_norms(z, codebook, meta):
    """(N,) and (K,) fp64 1 / max(|row|, eps) of z and the codebook, in one launch."""
    N, D = z.shape
    K = codebook.shape[0]
    z_inv = torch.empty(N, dtype=torch.float64, device=z.device)
    code_inv = torch.empty(K, dtype=torch.float64, device=z.device)
    block_r = meta["BLOCK_N"]
    z_programs = triton.cdiv(N, block_r)
    _inverse_norms_kernel[(z_programs + triton.cdiv(K, block_r),)](
        z, codebook, z_inv, code_inv, N, K, D, z_programs, z.stride(0), z.stride(1), codebook.stride(0),
        codebook.stride(1), BLOCK_R=block_r, BLOCK_D=meta["BLOCK_D"])
    return z_inv, code_inv


def _segment_sums(z, codebook, indices, out, meta, diff: bool, inverse_norms=(None, None)):
    """out[k] = (count_k e_k -) the sum of the rows of z assigned to code k, in a fixed order:
    the rows sorted by code once (stable), then one program per code and chunk of D.
    inverse_norms: (z's, the codes'), to sum normalised vectors (the cosine quantizer)."""
    K, D = out.shape
    order = torch.sort(indices, stable=True).indices
    starts = torch.zeros(K + 1, dtype=torch.long, device=z.device)
    torch.cumsum(torch.bincount(indices, minlength=K), 0, out=starts[1:])
    _codebook_diff_segment_kernel[(K, triton.cdiv(D, meta["BLOCK_D"]))](
        z, codebook, order, starts, out, *inverse_norms, D, z.stride(0), z.stride(1), codebook.stride(0),
        codebook.stride(1), BLOCK_R=SEGMENT_ROWS, BLOCK_D=meta["BLOCK_D"], ACC_DTYPE=meta["ACC_DTYPE"], DIFF=diff,
        NORMALIZE=inverse_norms[0] is not None)


def code_sums(z: torch.Tensor, indices: torch.Tensor, sums: torch.Tensor, z_inv: torch.Tensor | None = None) -> None:
    """sums (K, D) = the sum of each code's rows of z (z_inv given: of its rows times z_inv,
    normalised), deterministic (fixed order)."""
    if z.shape[0] == 0 or z.shape[1] == 0:
        sums.zero_()
        return
    _segment_sums(z, z, indices, sums, backward_meta(z.shape[1], sums.dtype), diff=False,
                  inverse_norms=(z_inv, None))


def code_counts_and_sums(z: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor,
                         sums: torch.Tensor | None, z_inv: torch.Tensor | None = None) -> None:
    """counts (K,) and sums (K, D) (None: counts only) of the rows of z per code (z_inv given:
    of its rows normalised), with atomics."""
    counts.zero_()
    if sums is not None:
        sums.zero_()
    N, D = z.shape
    if N == 0:
        return
    meta = backward_meta(D, torch.float32)
    _code_stats_kernel[(triton.cdiv(N, meta["BLOCK_N"]),)](
        z, indices, counts, sums, z_inv, N, D, z.stride(0), z.stride(1), BLOCK_N=meta["BLOCK_N"],
        BLOCK_D=meta["BLOCK_D"], WANT_SUMS=sums is not None, NORMALIZE=z_inv is not None)
