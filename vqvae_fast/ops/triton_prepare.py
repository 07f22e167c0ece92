"""The Triton search's first two launches: statistics of both operands, then both operands
centred, scaled by a power of two and converted once into the form `tl.dot` takes (see
`triton_nearest_code.py` for the whole forward)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .triton_plan import _CODE_MAX, _TL_DTYPE, CodeStats, SearchPlan

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _stats_kernel(
    # pointers; code_stats: (code_programs, 4, D_PAD) fp64; z_max: (z_programs,) fp64; scratch: (2,) int64;
    # counts (K,), sums (K, D): the per-code statistics the search accumulates (WANT_STATS)
    codebook_ptr, z_ptr, code_stats_ptr, z_max_ptr, scratch_ptr, counts_ptr, sums_ptr,
    # NORMALIZE: (K,) and (N,) fp64 1 / max(|row|, eps), written here for the later launches
    code_inv_ptr, z_inv_ptr,
    # sizes
    K, N, D, code_programs, codes_per_program, rows_per_program,
    # strides
    stride_ck, stride_cd, stride_zn, stride_zd,
    # meta-parameters
    BLOCK_R: tl.constexpr, D_PAD: tl.constexpr, WANT_STATS: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """Programs below code_programs: (sum, count, min, max) per column over their finite codes,
    and zeroes their codes' counts (WANT_STATS >= 1) and sums (2). The others: the largest
    |entry| over their finite rows of z. NORMALIZE: of the l2-normalised rows (`unit_rows`),
    whose reciprocal norms are stored."""
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
                        mask=mask, other=0.0)
            ok = mask & _finite_rows(x, mask)[:, None]
            x = _unit_tile(x, code_inv_ptr, r, r < end, NORMALIZE)
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
                        mask=mask, other=0.0)
            ok = mask & _finite_rows(x, mask)[:, None]
            x = _unit_tile(x, z_inv_ptr, r, r < end, NORMALIZE)
            largest = tl.maximum(largest, tl.max(tl.where(ok, tl.abs(x), 0.0), axis=0))
        tl.store(z_max_ptr + pid - code_programs, tl.max(largest, axis=0))


NORMALIZE_EPS = tl.constexpr(1e-12)  # functional.NORMALIZE_EPS, torch.nn.functional.normalize's eps


@triton.jit
def normalize_eps():
    """The eps as an fp64 value: a bare float constant in a kernel is rounded to fp32 first."""
    return tl.full((), NORMALIZE_EPS, tl.float64)


@triton.jit
def unit_rows(x, inv, NORMALIZE: tl.constexpr):
    """x (rows, cols) in its own dtype, or (NORMALIZE) x * inv[:, None] (inv = 1 / max(|row|, eps)
    in fp64) rounded to x's dtype: the l2-normalised rows, as torch.nn.functional.normalize in
    that dtype would give them. Every kernel that reads z or the codebook of a cosine search
    reads it through here, so all of them see the same vectors."""
    if NORMALIZE:
        y = x.to(tl.float64) * inv[:, None]
        if x.dtype == tl.bfloat16:
            y = _bf16_nearest(y.to(tl.float32))
        elif x.dtype != tl.float64:
            y = y.to(tl.float32).to(x.dtype)  # via fp32: the interpreter's fp64 -> 16-bit is wrong
        return y
    return x


@triton.jit
def _bf16_nearest(y):
    """fp32 y rounded to the nearest bf16 (ties to even), as a GPU converts: the interpreter's
    conversion truncates, so the rounding is done on the bits and the conversion is exact."""
    bits = y.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _unit_tile(x, inv_ptr, rows, row_mask, NORMALIZE: tl.constexpr):
    """A whole-row tile of x as float64, normalised (NORMALIZE: and its rows' 1 / max(|row|, eps)
    stored at inv_ptr + rows)."""
    if NORMALIZE:
        x64 = x.to(tl.float64)
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x64 * x64, axis=1)), normalize_eps())
        tl.store(inv_ptr + rows, inv, mask=row_mask)
        x = unit_rows(x, inv, NORMALIZE)
    return x.to(tl.float64)


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
def _load_unit(x, inv_ptr, rows64, row_mask, NORMALIZE: tl.constexpr):
    """x as float64, normalised with the stored reciprocal norms of its rows (NORMALIZE)."""
    inv = rows64.to(tl.float64)  # unused unless NORMALIZE
    if NORMALIZE:
        inv = tl.load(inv_ptr + rows64, mask=row_mask, other=1.0)
    return unit_rows(x, inv, NORMALIZE).to(tl.float64)


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
    # NORMALIZE: the stats kernel's reciprocal norms of the codes and rows
    code_inv_ptr, z_inv_ptr,
    # sizes: code operands are (K_PAD, WIDTH), z operands (N_PAD, WIDTH), zero beyond (K or N, D)
    K, N, D, K_PAD, N_PAD, WIDTH, code_stat_programs, z_stat_programs, code_programs,
    # strides
    stride_ck, stride_cd, stride_zn, stride_zd,
    # meta-parameters; D_PAD: a power of two >= WIDTH
    BLOCK_R: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, CODE_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT: tl.constexpr, NARROW_CENTRE: tl.constexpr, FLAG_INEXACT: tl.constexpr,
    SCALE: tl.constexpr, SETTLE: tl.constexpr, CODE_MAX: tl.constexpr, Z_STAT_PROGRAMS: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    """Centre and scale both operands once per call, in the form `tl.dot` takes (programs below
    code_programs do BLOCK_R codes each, the others BLOCK_R rows of z).

    Codes: y = s (e - c), 1/2 |y|^2 (+inf for codes with a NaN/Inf entry and for padding, so
    that they are never chosen); SETTLE: the largest finite half norm, as an atomic max of its
    bits (non-negative floats order as their bits). z: x = s (z - c) (0 for a row with a
    NaN/Inf entry) and |x| (NaN for such a row). 16-bit: a row whose x is not exact in 16 bits
    is flagged, and its two 16-bit remainder terms are written (the three terms sum to x
    exactly, up to fp16 underflow) for the re-scoring pass. NORMALIZE: of the l2-normalised
    codes and rows (`unit_rows`).
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
        x = tl.load(codebook_ptr + rows64[:, None] * stride_ck + d[None, :] * stride_cd, mask=mask, other=0.0)
        row_ok = (rows < K) & _finite_rows(x, mask)
        x = _load_unit(x, code_inv_ptr, rows64, rows < K, NORMALIZE)
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
        x = tl.load(z_ptr + rows64[:, None] * stride_zn + d[None, :] * stride_zd, mask=mask, other=0.0)
        row_ok = _finite_rows(x, mask)
        x = _load_unit(x, z_inv_ptr, rows64, rows < N, NORMALIZE)
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


# ----------------------------------------------------------------------------- launchers


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
    code_inv: torch.Tensor | None  # normalize: (K,) fp64 1 / max(|e|, eps), the codes' normalisation
    z_inv: torch.Tensor | None  # normalize: (N,) fp64 1 / max(|z|, eps)


Z_STAT_PROGRAMS = 64  # most programs reading z for its largest entry; not measured (one per 1024 rows up to it)


class PrepareLaunch(NamedTuple):
    arange_d: int  # a power of two >= D_PAD
    code_stat_programs: int
    z_stat_programs: int
    stats_rows: int
    stats_warps: int  # the stats' per-column sums are fp64 vectors of all D: more warps for wide rows
    code_programs: int
    prepare_meta: dict


def prepare_launch(plan: SearchPlan, k: int = 1, n: int = 1, normalize: bool = False) -> PrepareLaunch:
    arange_d = triton.next_power_of_2(plan.d_pad)
    mode = plan.mode
    # a (BLOCK_R, arange_d) tile: 8192 values. Not measured for time; static: no spill at D 64 and
    # 1024 (116-242 registers, sm_90 and sm_80) (static and moved: scripts/inspect_kernels.py, triton 3.8.0, 2026-12-07; see triton_plan's docstring)
    block_r = max(1, min(64, 8192 // arange_d))
    meta = dict(BLOCK_R=block_r, D_PAD=arange_d, ACC_DTYPE=_TL_DTYPE[mode.acc], CODE_DTYPE=_TL_DTYPE[mode.code],
                PRECISION=mode.precision, SPLIT=mode.split, NARROW_CENTRE=mode.narrow_centre,
                FLAG_INEXACT=mode.flag_inexact, SCALE=mode.scale, SETTLE=mode.settle,
                CODE_MAX=_CODE_MAX.get(mode.code, 0.0), Z_STAT_PROGRAMS=Z_STAT_PROGRAMS, NORMALIZE=normalize)
    # 32 x 64 spilled 8 bytes (fp16, sm_90); 16 x 64 with the cosine's norms, 16 bytes. Re-checked
    # by moving the cosine's 8 to 16: 16 bytes (fp16, D = 64, sm_90). The 32 x 64 case: not
    # re-checked (at D >= 64 the 1024 // D cap already gives 16 or fewer rows).
    stats_rows = max(1, min(8 if normalize else 16, 1024 // arange_d))
    # RESULTS.md "Issue 18 ... fp32 on Triton" recorded 4 warps spilling 176 bytes at D >= 1024;
    # moved to 4 on 2026-12-07, D = 1024 no longer spills (94-124 registers, sm_90): kept for the
    # fp64 vectors' sake, its time not measured.
    stats_warps = max(4, min(16, arange_d // 128))
    # code statistics: one program per 256 codes, at most 32; z: per 1024 rows. Not measured.
    return PrepareLaunch(arange_d, min(32, triton.cdiv(k, 256)), min(Z_STAT_PROGRAMS, triton.cdiv(max(n, 1), 1024)),
                         stats_rows, stats_warps,
                         triton.cdiv(plan.k_pad, block_r), meta)


def prepare_operands(z: torch.Tensor, codebook: torch.Tensor, plan: SearchPlan, stats: CodeStats | None = None,
                     normalize: bool = False) -> Operands:
    """Centre, scale, pad and convert both operands once per call: two launches, O((N + K) D).
    `stats`: per-code buffers for the search to accumulate into, zeroed here. `normalize`: of
    the l2-normalised codes and rows (the cosine search)."""
    N, D = z.shape
    K = codebook.shape[0]
    mode = plan.mode
    launch = prepare_launch(plan, K, N, normalize)

    def empty(*shape, dtype=mode.code):
        return torch.empty(shape, dtype=dtype, device=z.device)

    code_stats = empty(launch.code_stat_programs, 4, launch.arange_d, dtype=torch.float64)
    z_max = empty(launch.z_stat_programs, dtype=torch.float64)
    scratch = empty(2, dtype=torch.int64)
    code_inv = empty(K, dtype=torch.float64) if normalize else None
    z_inv = empty(N, dtype=torch.float64) if normalize else None
    _stats_kernel[(launch.code_stat_programs + launch.z_stat_programs,)](
        codebook, z, code_stats, z_max, scratch, *(stats[:2] if stats else (None, None)), code_inv, z_inv, K, N, D,
        launch.code_stat_programs,
        triton.cdiv(K, launch.code_stat_programs), triton.cdiv(N, launch.z_stat_programs),
        codebook.stride(0), codebook.stride(1), z.stride(0), z.stride(1),
        BLOCK_R=launch.stats_rows, D_PAD=launch.arange_d, WANT_STATS=stats.level if stats else 0,
        NORMALIZE=normalize, num_warps=launch.stats_warps)

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
        row_norm, inexact, scratch, code_inv, z_inv, K, N, D, plan.k_pad, plan.n_pad, plan.d_pad, launch.code_stat_programs,
        launch.z_stat_programs, launch.code_programs, codebook.stride(0), codebook.stride(1), z.stride(0),
        z.stride(1), **launch.prepare_meta)
    return Operands(z_op, z_tail, z_tail2, codes, codes_tail, half_norm, row_norm, inexact, scratch,
                    centre_and_scale[:launch.arange_d], centre_and_scale[launch.arange_d], code_inv, z_inv)
