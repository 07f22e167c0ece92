"""The Triton search's plan: how each dtype is scored (Mode, the fp32 precisions and their error
bound), the machines' tile tables and which tiles fit, codebook splits, and the launch
parameters of every forward kernel. Plain Python: nothing here launches anything.

Where the numbers beside the constants come from: "static" is `python scripts/inspect_kernels.py
--arch sm_90` (and sm_80), triton 3.8.0, run on 2026-12-07 at the shipped values: every kernel
and kept tile compiles with 0 spill bytes. "Moved" is the same script with only that value
changed (the kernels it shapes recompiled), which is how a spill that justifies a limit was
re-checked on 2026-12-07. No GPU timing compares tile shapes or launch sizes: where a value
says "not measured", it is a reasoned choice, not a tuned one."""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from . import triton_interpreting as interpreting

_TL_DTYPE = {torch.float64: tl.float64, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
             torch.float16: tl.float16}
_CODE_MAX = {torch.float16: 65504.0, torch.bfloat16: 3.3895313892515355e38}
# Widest z tile kept resident (loaded once, before the codebook loop; static: no z load inside
# the loop); wider rows take the split-D path. Not a measured optimum: on the GPUs the limit that
# binds is shared memory (keep_config). At D_PAD = 1024 no tile of search_configs fits in any mode
# (shared_bytes_estimate: the smallest, 32 x 64 with 2 stages, needs 328 KB in 16 bits against
# 227 KB on sm_90 and 163 KB on sm_80), so 512 decides alone only in the interpreter, whose
# keep_config keeps every tile. Resident against split-D time at one D: not measured.
RESIDENT_MAX_D = 512


class Machine(NamedTuple):
    """What the plan depends on: SMs to fill, shared memory per block, the tile table."""
    name: str
    num_sms: int
    shared_bytes: int  # opt-in dynamic shared memory per block
    interpreted: bool = False


# Hardware, not tuning: SMs and opt-in shared memory per block from the datasheets (what
# torch.cuda.get_device_properties reports; _cuda_machine reads them on a GPU). These two serve
# the static checks and plans made without a GPU.
SM90 = Machine("sm_90", 132, 227 * 1024)  # H100 SXM
SM80 = Machine("sm_80", 108, 163 * 1024)  # A100
# The interpreter runs the same plan at toy sizes: 4 "SMs", 16-row, 32-code tiles. Not measured:
# small so that interpreted tests reach codebook splits and merges at small N.
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
# Why bf16x3 is the default: rows left to re-scoring, measured on the CPU with the kernel's own
# rounding and bound (benchmarks/settle_rate.py, N = 4096, D 8-256, K 512-16384): bf16x3 0.39-6.79%,
# tf32 6.88-51.22%, tf32x3 0.07-4.27% (benchmarks/RESULTS.md, "Issue 18 ... fp32 on Triton");
# the time ratios above are datasheet arithmetic (bf16 at twice the TF32 rate), not GPU timings.
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
    if machine.interpreted:  # not measured: tl.dot's least rows (16), cheap to interpret
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    # (BLOCK_N, BLOCK_K, warps, stages): the autotuner's candidates, not a measured ranking. Triton
    # times every candidate keep_config keeps, per autotune key, at first use on the GPU at hand
    # (which one won is not recorded). Static: each kept entry compiles without spills within
    # shared memory for D 16-1024 on sm_90 and sm_80. No entry has been timed against another
    # (no GPU sweep of tiles was affordable); they are common Triton GEMM tiles.
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
    # 32 tile elements per thread: no entry of today's table exceeds it (each is at most 32 per
    # thread), so it only guards additions; not measured beyond that.
    if block_n * block_k > 32 * 32 * config.num_warps:
        return False
    # fp64: 32-row tiles, 2 stages. Moved (this rule dropped): 64- and 128-row tiles spill 24-80 bytes
    # on sm_90 and 8-88 on sm_80 (fp64, D 64-1024).
    if mode.acc == torch.float64 and (config.num_stages > 2 or block_n > 32):
        return False
    # Three dots per chunk of D (split operands, 16-bit re-scoring) on the split-D path. Moved (this
    # rule dropped): bf16x3 tiles above 64 x 32 spill 96-456 bytes on sm_90 and 16-232 on sm_80 (D 512,
    # 1024); the 16-bit re-scoring then takes 128 x 64, 32 bytes on sm_80.
    three_dots = mode.split or mode.z_terms == 3
    if three_dots and block_d < d_pad and block_n * block_k > 64 * 32:
        return False
    # The resident split z tile lives in registers: bf16x3 with 64 x 64 tiles spills at D = 256
    # on sm_90 (255 registers + 56 bytes) and at D = 128 on sm_80 (8-16 bytes); 64 x 32 does not.
    # First seen in commit ff65eca; moved (this rule dropped): sm_90 D = 256, 64 x 64: 56 bytes
    # (quantize), 64 (cosine), 72 (nearest); sm_80 D = 128, 64 x 64: 8-16 bytes (nearest).
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
    # The 32 (fp64; fp32 in the tf32, tf32x3 and ieee precisions): from commit 091b6e3's reading of
    # sm_80. Moved to 64, fp64 compiles without a spill on sm_90 and sm_80 (236-248 registers); the
    # fp32-operand precisions are not compiled by the script; time not measured either way.
    block_d = 64 if mode.code.itemsize == 2 else 32
    return triton.cdiv(d, block_d) * block_d, block_d


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
    # Not measured: split below one row block per SM (row blocks counted at twice the smallest
    # BLOCK_N), aiming at two programs per SM.
    rows_per_block = min(c.kwargs["BLOCK_N"] for c in search_configs(machine)) * 2
    row_blocks = triton.cdiv(n, rows_per_block)
    chunks = k_pad // align
    if row_blocks >= machine.num_sms or chunks == 1:
        return 1, k_pad
    wanted = min(chunks, triton.cdiv(2 * machine.num_sms, row_blocks))
    codes_per_split = triton.cdiv(chunks, wanted) * align
    return triton.cdiv(k_pad, codes_per_split), codes_per_split


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


def search_meta(plan: SearchPlan, mode: Mode, *, want_quantized: bool, want_stats: int = 0,
                only_flagged: bool = False, normalize: bool = False) -> dict:
    """The constexpr arguments of `_search_kernel` for a plan (tile sizes excepted)."""
    return dict(
        D_PAD=plan.d_pad, BLOCK_D=plan.block_d, ACC_DTYPE=_TL_DTYPE[mode.acc], DOT_DTYPE=_dot_dtype(mode, plan.machine),
        PRECISION=mode.precision, Z_TERMS=mode.z_terms, SPLIT=mode.split, SETTLE=mode.settle,
        ONLY_FLAGGED=only_flagged, SPLIT_K=plan.splits > 1, WANT_QUANTIZED=want_quantized, WANT_STATS=want_stats,
        GATHER_D=min(plan.block_d, gather_chunk(normalize)), NORMALIZE=normalize)


def gather_chunk(normalize: bool) -> int:
    """Values of D per step of a search's epilogue (the gather, the row errors and sums): 32 for
    the cosine search, whose normalised rows spilled at 64 (bf16, 32 x 64 tiles, sm_90).
    Moved to 64 for cosine: 8 bytes in the bf16 search (32 x 64, D = 256, sm_90) and in the fp16
    merge (sm_90, sm_80). 64 for the Euclidean epilogue: static; wider not tried."""
    return 32 if normalize else 64


def rescoring_plan(plan: SearchPlan) -> tuple[SearchPlan, triton.Config]:
    """The rare 16-bit re-scoring pass: z in three terms, so chunks of at most 32 values of D
    (three resident wide tiles would not fit, and on sm_80 every operand passes through
    registers: scripts/inspect_kernels.py), and the first tile shape that fits. The 32: from
    commit 091b6e3, which gives no numbers; static at 32 on both machines; 64 not re-checked."""
    rescoring = plan._replace(mode=mode_for(plan.mode.code, rescoring=True), block_d=min(plan.d_pad, 32))
    configs = search_configs(plan.machine)
    fitting = [c for c in configs if keep_config(c, plan.machine, 1 << 20, rescoring.d_pad, rescoring.block_d,
                                                 rescoring.mode)]
    return rescoring, (fitting or configs[-1:])[0]


def rescore_meta(plan: SearchPlan, want_quantized: bool, want_stats: int = 0, normalize: bool = False) -> dict:
    """`_rescore_kernel`'s tile: 16 flagged rows (tl.dot's least), 32 codes, chunks of D as the
    split-D search takes them, and (16, 32, 4) float64 differences for the exact distances
    (8 spill 16 bytes on sm_90 at D = 256). Moved to 8: sm_80 spills 8-32 bytes (D 16-128);
    sm_90 now compiles it at 252-254 registers without a spill (the 16 bytes were an earlier
    Triton's). Cosine moved to 4: 8 bytes at D = 16 (sm_90, sm_80). BLOCK_K = 32: not measured
    (few rows come here: 0.4-7% of N, RESULTS.md "Issue 18 ... fp32 on Triton")."""
    mode = plan.mode
    block_d = min(plan.d_pad, 64 if mode.code.itemsize == 2 else 32)
    exact_d = 2 if normalize else 4  # the cosine distances' normalised chunks: 4 spilled 8 bytes (fp32, sm_90)
    return dict(BLOCK_N=16, BLOCK_K=32, D_PAD=plan.d_pad, BLOCK_D=block_d, EXACT_D=exact_d,
                ACC_DTYPE=_TL_DTYPE[mode.acc], DOT_DTYPE=_dot_dtype(mode, plan.machine), PRECISION=mode.precision,
                Z_TERMS=mode.z_terms, SPLIT=mode.split, WANT_QUANTIZED=want_quantized, WANT_STATS=want_stats,
                GATHER_D=min(block_d, gather_chunk(normalize)), NORMALIZE=normalize)


# With 4, its (16, 32) tiles and float64 differences spilled 8-16 bytes. Moved to 4: sm_90 8-24
# bytes (D 16, 256, 1024; the cosine form the most), sm_80 8-16 bytes (D 16-1024).
RESCORE_WARPS = 8


def rescore_programs(n: int, machine: Machine) -> int:
    """A fixed grid (no host sync on the flagged count): enough programs to fill the GPU (4 per
    SM: not measured)."""
    return max(1, min(triton.cdiv(n, 16), 4 * machine.num_sms))


def merge_meta(plan: SearchPlan, want_quantized: bool, want_stats: int = 0, normalize: bool = False) -> dict:
    """64 rows at a time; fp64 in chunks of 32 values of D (64 spilled 48 bytes with the sums, sm_90).
    Moved to 64: 48 bytes (cosine 168) on sm_90 and sm_80. The 64 rows: not measured."""
    return dict(BLOCK_N=16 if plan.machine.interpreted else 64,
                BLOCK_D=min(plan.block_d, 32 if plan.mode.acc == torch.float64 else gather_chunk(normalize)),
                ACC_DTYPE=_TL_DTYPE[plan.mode.acc], SETTLE=plan.mode.settle, WANT_QUANTIZED=want_quantized,
                WANT_STATS=want_stats, NORMALIZE=normalize)


LOSS_BLOCK = 1024  # row errors summed per step of the one-program loss kernel; not measured (static: 44 registers)


class CodeStats(NamedTuple):
    """Per-code statistics of one search, accumulated by the rows' writers (atomics)."""
    counts: torch.Tensor  # (K,) fp32: rows per code (exact integers below 2^24)
    sums: torch.Tensor | None  # (K, D) fp32 (fp64 for fp64 z): the sum of each code's rows of z
    level: int  # 1: counts, 2: counts and sums
