"""Static GPU checks of every shipped kernel, on any machine: no GPU needed.

Compiles each Triton kernel of `vqvae_fast.ops.triton_nearest_code`, with every autotune
config its pruning keeps, for a named GPU architecture (Triton's own compiler and ptxas;
cuobjdump reads each cubin's resource usage). Per kernel and config it reports the matrix
instructions used, registers, spill bytes, shared memory and, for the search kernel, how many
loads of z sit inside the codebook loop (from the TTGIR).

    python scripts/inspect_kernels.py --arch sm_90 --json FILE
    python scripts/inspect_kernels.py --arch sm_80 --json FILE

Exit status 0 only when every check holds:
- every kernel and config compiles;
- no spills (local memory per thread is 0);
- shared memory within the architecture's per-block budget (227 KB sm_90, 163 KB sm_80);
- the searches with 16-bit operands (16-bit inputs, fp32 as bf16x3) use tensor-core MMA (wgmma or mma.sync);
- the resident-z search (D <= 512) loads no z inside its codebook loop (split-D: null).
"""
from __future__ import annotations

import os

if __name__ == "__main__":
    # Compile for real even when run from the interpreted test suite (triton.jit reads this at import).
    os.environ.pop("TRITON_INTERPRET", None)

import argparse
import itertools
import json
import re
import subprocess
import sys
import tempfile
import time  # noqa: E402  (after the environment is set)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vqvae_fast.ops import triton_codebook_update as update
from vqvae_fast.ops import triton_nearest_code as kernels
from vqvae_fast.ops import triton_plan as plans
from vqvae_fast.ops import triton_prepare as prepare
from vqvae_fast.ops import triton_quantize_bwd as backward
from vqvae_fast.ops import triton_residual as residual

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
MACHINES = {"sm_90": plans.SM90, "sm_80": plans.SM80}
PTR_TYPE = {torch.float64: "*fp64", torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
            torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8"}
SHORT = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
Z_ARGS = ("z_ptr", "z_op_ptr", "z_tail_ptr", "z_tail2_ptr")
# (N, K) of the two search problems compiled: a large one (one split, fused epilogue) and a
# small-N one (codebook split across programs, indices only); D: the tiling regimes.
LARGE, SMALL = (262144, 16384), (4096, 16384)
DIMS = (16, 64, 128, 256, 512, 1024)


@dataclass
class Record:
    kernel: str
    config: str
    dtype: str
    arch: str
    mma: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    z_loads_in_loop: int | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Case:
    """One Triton compilation: the kernel, its argument values and launch options."""
    kernel: str
    fn: object
    values: dict  # argument name -> torch.dtype (a pointer), int, float, None or constexpr value
    num_warps: int
    num_stages: int
    dtype: torch.dtype
    config: str
    needs_mma: bool = False
    resident: bool | None = None  # search kernels: z kept resident (None: not a search)


# --------------------------------------------------------------------------- the cases

def _config_text(config: triton.Config) -> str:
    kw = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw} warps={config.num_warps} stages={config.num_stages}"


COSINE_DIMS = (16, 256)  # the cosine search's epilogue: LlamaGen's D = 8 (padded to 16) and VQGAN's 256


def _inverse_norm_ptrs(normalize: bool, z="z_inv_ptr", codes="code_inv_ptr") -> dict:
    """The cosine kernels' (N,) and (K,) fp64 reciprocal norms (None when off)."""
    return {z: torch.float64 if normalize else None, codes: torch.float64 if normalize else None}


def search_cases(machine, dtype: torch.dtype) -> list[Case]:
    cases = []
    for d in DIMS:
        for (n, k), task in ((LARGE, "quantize"), (SMALL, "nearest")):
            main = plans.plan_search(n, k, d, dtype, machine)
            configs = [c for c in plans.search_configs(machine)
                       if plans.keep_config(c, machine, n, main.d_pad, main.block_d, main.mode)]
            variants = [(main, configs, task, False)]
            if main.mode.flag_inexact and task == "quantize":
                rescoring, config = plans.rescoring_plan(main)
                variants.append((rescoring, [config], "quantize re-score", True))
            if task == "quantize" and d in COSINE_DIMS:  # the cosine layer's step: normalised in the epilogue
                variants += [(plan, configs, f"{label} cosine", rescoring, True)
                             for plan, configs, label, rescoring in variants]
            # quantize: as a VectorQuantizer step calls it, with the per-code counts and sums (fp32/fp64)
            stats = 2 if task == "quantize" and not main.mode.flag_inexact else 0
            for plan, configs, label, rescoring, *cosine in variants:
                mode = plan.mode
                normalize = bool(cosine)
                meta = plans.search_meta(plan, mode, want_quantized=task == "quantize", only_flagged=rescoring,
                                         want_stats=0 if rescoring else stats, normalize=normalize)
                acc = mode.acc
                split = plan.splits > 1
                values = dict(
                    z_ptr=dtype, codebook_ptr=dtype, z_op_ptr=mode.code, z_tail_ptr=mode.code, z_tail2_ptr=mode.code,
                    codes_ptr=mode.code, codes_tail_ptr=mode.code, half_norm_ptr=acc,
                    part_score_ptr=acc if split else None, part_second_ptr=acc if split and mode.settle else None,
                    part_idx_ptr=torch.int32 if split else None,
                    inexact_ptr=torch.int8 if main.mode.flag_inexact else None, row_norm_ptr=torch.float32,
                    scratch_ptr=torch.int64, flag_rows_ptr=torch.int32 if mode.settle else None,
                    flag_threshold_ptr=acc if mode.settle else None, indices_ptr=torch.int64,
                    quantized_ptr=dtype if task == "quantize" else None,
                    row_err_ptr=torch.float64 if task == "quantize" else None,
                    counts_ptr=torch.float32 if stats else None, sums_ptr=acc if stats else None,
                    **_inverse_norm_ptrs(normalize), N=n, D=d, K_PAD=plan.k_pad, codes_per_split=plan.codes_per_split, n_bucket=n.bit_length(),
                    bound_rel=1e-3, bound_norm=6e-8, bound_abs=1e-26,
                    stride_zn=d, stride_zd=1, stride_ck=d, stride_cd=1, **meta)
                for config in configs:
                    resident = plan.block_d == plan.d_pad
                    tiling = f"D={d} ({'resident' if resident else f'split-D {plan.block_d}'}), {plan.splits} split(s)"
                    cases.append(Case(f"search[{label}]", kernels._search_kernel, {**values, **config.kwargs},
                                      config.num_warps, config.num_stages, dtype,
                                      f"{_config_text(config)}; {tiling}", needs_mma=mode.code.itemsize == 2,
                                      resident=resident))
            settle_variants = (False, True) if task == "quantize" and d in COSINE_DIMS else (False,)
            for normalize in settle_variants if main.mode.settle else ():
                meta = plans.rescore_meta(main, want_quantized=task == "quantize", want_stats=stats,
                                          normalize=normalize)
                cases.append(Case(f"rescore[{task}{' cosine' if normalize else ''}]", kernels._rescore_kernel, dict(
                    z_ptr=dtype, codebook_ptr=dtype, z_op_ptr=mode.code, z_tail_ptr=mode.code,
                    codes_ptr=mode.code, codes_tail_ptr=mode.code, half_norm_ptr=mode.acc, scratch_ptr=torch.int64,
                    flag_rows_ptr=torch.int32, flag_threshold_ptr=mode.acc, indices_ptr=torch.int64,
                    quantized_ptr=dtype if task == "quantize" else None,
                    row_err_ptr=torch.float64 if task == "quantize" else None,
                    counts_ptr=torch.float32 if stats else None, sums_ptr=mode.acc if stats else None,
                    **_inverse_norm_ptrs(normalize), K=k, D=d, K_PAD=main.k_pad,
                    stride_zn=d, stride_zd=1, stride_ck=d, stride_cd=1, **meta), plans.RESCORE_WARPS, 1, dtype,
                    "BLOCK_N={BLOCK_N} BLOCK_K={BLOCK_K} BLOCK_D={BLOCK_D} EXACT_D={EXACT_D}; D={d}".format(d=d, **meta),
                    needs_mma=mode.code.itemsize == 2))
    return cases


def _merge_case(plan, dtype: torch.dtype, stats: int, normalize: bool) -> Case:
    mode, acc = plan.mode, plan.mode.acc
    merge = plans.merge_meta(plan, want_quantized=True, want_stats=stats, normalize=normalize)
    return Case("merge cosine" if normalize else "merge", kernels._merge_kernel, dict(
        part_score_ptr=acc, part_second_ptr=acc if mode.settle else None, part_idx_ptr=torch.int32,
        row_norm_ptr=torch.float32, scratch_ptr=torch.int64, flag_rows_ptr=torch.int32 if mode.settle else None,
        flag_threshold_ptr=acc if mode.settle else None, z_ptr=dtype, codebook_ptr=dtype, indices_ptr=torch.int64,
        quantized_ptr=dtype, row_err_ptr=torch.float64, counts_ptr=torch.float32 if stats else None,
        sums_ptr=acc if stats else None, **_inverse_norm_ptrs(normalize), N=SMALL[0], D=64, splits=8,
        bound_rel=1e-3, bound_norm=6e-8, bound_abs=1e-26, stride_zn=64, stride_zd=1, stride_ck=64, stride_cd=1,
        **merge), 4, 1, dtype, f"BLOCK_N={merge['BLOCK_N']}")


def support_cases(machine, dtype: torch.dtype) -> list[Case]:
    """The other kernels, with the launch parameters their launchers use."""
    mode = plans.mode_for(dtype)
    acc = mode.acc
    tl_acc = plans._TL_DTYPE[acc]
    cases = []
    for d, normalize in ((64, False), (1024, False), (64, True), (1024, True)):
        plan = plans.plan_search(*LARGE, d, dtype, machine)
        launch = prepare.prepare_launch(plan, *reversed(LARGE), normalize=normalize)
        cosine = " cosine" if normalize else ""
        cases.append(Case(f"stats{cosine}", prepare._stats_kernel, dict(
            codebook_ptr=dtype, z_ptr=dtype, code_stats_ptr=torch.float64, z_max_ptr=torch.float64,
            scratch_ptr=torch.int64, counts_ptr=torch.float32, sums_ptr=acc, **_inverse_norm_ptrs(normalize, "code_inv_ptr", "z_inv_ptr"),
            K=LARGE[1], N=LARGE[0], D=d,
            code_programs=launch.code_stat_programs, codes_per_program=512, rows_per_program=4096, stride_ck=d,
            stride_cd=1, stride_zn=d, stride_zd=1, BLOCK_R=launch.stats_rows, D_PAD=launch.arange_d, WANT_STATS=2,
            NORMALIZE=normalize), launch.stats_warps, 1, dtype,
            f"D={d} BLOCK_R={launch.stats_rows} warps={launch.stats_warps}"))
        cases.append(Case(f"prepare{cosine}", prepare._prepare_kernel, dict(
            codebook_ptr=dtype, z_ptr=dtype, code_stats_ptr=torch.float64, z_max_ptr=torch.float64,
            centre_ptr=torch.float64, codes_ptr=mode.code, codes_tail_ptr=mode.code, half_norm_ptr=acc,
            z_op_ptr=mode.code, z_tail_ptr=mode.code, z_tail2_ptr=mode.code, row_norm_ptr=torch.float32,
            inexact_ptr=torch.int8 if mode.flag_inexact else None, scratch_ptr=torch.int64,
            **_inverse_norm_ptrs(normalize), K=LARGE[1], N=LARGE[0], D=d, K_PAD=plan.k_pad, N_PAD=plan.n_pad, WIDTH=plan.d_pad,
            code_stat_programs=32, z_stat_programs=64, code_programs=512, stride_ck=d, stride_cd=1, stride_zn=d,
            stride_zd=1, **launch.prepare_meta), 4, 1, dtype, f"D={d} BLOCK_R={launch.prepare_meta['BLOCK_R']}"))
    small_plan = plans.plan_search(*SMALL, 64, dtype, machine)
    stats = 0 if mode.flag_inexact else 2
    for normalize in (False, True):
        cases.append(_merge_case(small_plan, dtype, stats, normalize))
    if dtype in (torch.float32, torch.float64):  # the loss is stored as fp32 (16-bit too) or fp64
        cases.append(Case("loss", kernels._loss_kernel, dict(
            row_err_ptr=torch.float64, loss_ptr=acc, N=LARGE[0], scale_head=1e-6, scale_tail=1e-14,
            BLOCK=plans.LOSS_BLOCK), 4, 1, dtype, f"BLOCK={plans.LOSS_BLOCK}"))
    bwd = backward.backward_meta(64, acc)
    strides = dict(stride_zn=64, stride_zd=1, stride_cn=64, stride_cd=1)
    for normalize in (False, True):
        cosine = " cosine" if normalize else ""
        inverse_norms = _inverse_norm_ptrs(normalize)
        for rotation in (False, True):
            meta = dict(backward.grad_z_meta(64, acc, rotation), NORMALIZE=normalize)
            cases.append(Case(f"grad_z[{'rotation' if rotation else 'ste'}{cosine}]", backward._grad_z_kernel, dict(
                grad_q_ptr=dtype, z_ptr=dtype, codebook_ptr=dtype, indices_ptr=torch.int64, grad_loss_ptr=dtype,
                grad_z_ptr=dtype, **inverse_norms, N=LARGE[0], D=64, scale_head=1e-6, scale_tail=1e-14,
                stride_gn=64, stride_gd=1, **strides, **meta), 4, 1, dtype,
                "BLOCK_N={BLOCK_N} BLOCK_D={BLOCK_D}".format(**meta)))
        cases.append(Case(f"codebook_diff_atomic{cosine}", backward._codebook_diff_atomic_kernel, dict(
            z_ptr=dtype, codebook_ptr=dtype, indices_ptr=torch.int64, out_ptr=acc, **inverse_norms, N=LARGE[0],
            D=64, **strides, **bwd, NORMALIZE=normalize), 4, 1, dtype, "BLOCK_N={BLOCK_N} BLOCK_D={BLOCK_D}".format(**bwd)))
        segment = dict(BLOCK_R=backward.SEGMENT_ROWS, BLOCK_D=bwd["BLOCK_D"], ACC_DTYPE=tl_acc, DIFF=True,
                       NORMALIZE=normalize)
        cases.append(Case(f"codebook_diff_segment{cosine}", backward._codebook_diff_segment_kernel, dict(
            z_ptr=dtype, codebook_ptr=dtype, order_ptr=torch.int64, starts_ptr=torch.int64, out_ptr=acc,
            **inverse_norms, D=64, **strides, **segment), 4, 1, dtype,
            "BLOCK_R={BLOCK_R} BLOCK_D={BLOCK_D}".format(**segment)))
        cases.append(Case(f"code_stats{cosine}", backward._code_stats_kernel, dict(
            z_ptr=dtype, indices_ptr=torch.int64, counts_ptr=torch.float32, sums_ptr=torch.float32,
            z_inv_ptr=torch.float64 if normalize else None, N=LARGE[0], D=64, stride_zn=64, stride_zd=1,
            BLOCK_N=bwd["BLOCK_N"], BLOCK_D=bwd["BLOCK_D"], WANT_SUMS=True, NORMALIZE=normalize), 4, 1, dtype,
            "BLOCK_N={BLOCK_N} BLOCK_D={BLOCK_D}".format(**bwd)))
    cases.append(Case("inverse_norms", backward._inverse_norms_kernel, dict(
        z_ptr=dtype, codebook_ptr=dtype, z_inv_ptr=torch.float64, code_inv_ptr=torch.float64, N=LARGE[0],
        K=LARGE[1], D=64, z_programs=LARGE[0] // bwd["BLOCK_N"], stride_zn=64, stride_zd=1, stride_cn=64, stride_cd=1,
        BLOCK_R=bwd["BLOCK_N"], BLOCK_D=bwd["BLOCK_D"]), 4, 1, dtype, "BLOCK_R={BLOCK_N} BLOCK_D={BLOCK_D}".format(**bwd)))
    cases.append(Case("codebook_normalization_grad", backward._codebook_normalization_grad_kernel, dict(
        diff_ptr=acc, codebook_ptr=dtype, code_inv_ptr=torch.float64, grad_loss_ptr=dtype, out_ptr=dtype,
        K=LARGE[1], D=64, scale_head=1e-6, scale_tail=1e-14, stride_cn=64, stride_cd=1,
        BLOCK_K=backward.CODE_BLOCK, BLOCK_D=bwd["BLOCK_D"], ACC_DTYPE=tl_acc), 4, 1, dtype,
        f"BLOCK_K={backward.CODE_BLOCK} BLOCK_D={bwd['BLOCK_D']}"))
    if dtype in (torch.float32, torch.float64):  # the codebook update, in the codebook's dtype
        cases.append(Case("code_state", update._code_state_kernel, dict(
            counts_ptr=torch.float32, usage_ptr=torch.float32, ema_count_ptr=torch.float32, dead_ptr=torch.int8,
            inv_count_ptr=torch.float32, perplexity_ptr=torch.float32, tallies_ptr=torch.int64, K=16384,
            usage_decay=0.9, ema_decay=0.99, dead_threshold=0.1, laplace_eps=1e-5, BLOCK=update.STATE_BLOCK,
            EMA=True, RESTART=True), 4, 1, dtype, f"BLOCK={update.STATE_BLOCK}"))
        for normalize in (False, True):
            cases.append(Case("code_vectors[cosine]" if normalize else "code_vectors", update._code_vectors_kernel,
                              dict(ema_sum_ptr=dtype, codebook_ptr=dtype, sums_ptr=acc, dead_ptr=torch.int8,
                                   inv_count_ptr=torch.float32, cand_ptr=dtype, cand_rows_ptr=torch.int64, K=16384,
                                   D=256, ema_decay=0.99, stride_cn=256, stride_cd=1, **update.VECTOR_BLOCKS,
                                   EMA=True, RESTART=True, GATHER=True, NORMALIZE=normalize), 4, 1, dtype,
                              "BLOCK_K={BLOCK_K} BLOCK_D={BLOCK_D}".format(**update.VECTOR_BLOCKS)))
    for d in (8, 64, residual.RESIDENT_MAX_D):  # the fused residual encoding (DAC's and EnCodec's code sizes)
        for want_loss, normalize in itertools.product((False, True), (False, True)):
            meta = residual.encode_meta(d, dtype, normalize)
            # encode, and the training forward (the sum and row errors too); Euclidean and cosine
            name = ("residual_train_fwd" if want_loss else "residual_encode") + ("[cosine]" if normalize else "")
            cases.append(Case(name, residual._residual_encode_kernel, dict(
                z_ptr=dtype, books_ptr=dtype, absmax_ptr=torch.int32, indices_ptr=torch.int64,
                total_ptr=acc if want_loss else None, row_err_ptr=torch.float64 if want_loss else None,
                N=LARGE[0], K=1024, D=d, S=8, bound_rel=1e-6, bound_abs=1e-36, stride_zn=d, stride_zd=1,
                stride_bs=1024 * d, stride_bk=d, stride_bd=1, **meta, WANT_LOSS=want_loss, NORMALIZE=normalize),
                residual.encode_warps(d), 1, dtype,
                "BLOCK_N={BLOCK_N} BLOCK_K={BLOCK_K} warps={w}; D={d}".format(d=d, w=residual.encode_warps(d),
                                                                              **meta),
                needs_mma=False))
        rows_meta = residual.backward_meta(d, dtype)
        # the loss backward; the module's EMA sums; Euclidean and cosine
        for (use, grads, stats), normalize in itertools.product((("grad", True, 0), ("stats", False, 2)),
                                                                (False, True)):
            cases.append(Case(f"residual_stage_rows[{use}{',cosine' if normalize else ''}]", residual._stage_rows_kernel, dict(
                grad_ptr=torch.float32 if grads else None, z_ptr=dtype, books_ptr=dtype, indices_ptr=torch.int64,
                grad_z_ptr=dtype if grads else None, grad_books_ptr=acc if grads else None,
                counts_ptr=torch.float32 if stats else None, sums_ptr=acc if stats else None, N=LARGE[0], K=1024, D=d,
                S=8, beta=0.25, two_over_count=1e-9, stride_grad=1, **rows_meta, WANT_Z=grads, WANT_BOOKS=grads,
                WANT_STATS=stats, NORMALIZE=normalize), residual.encode_warps(d), 1, dtype,
                "BLOCK_N={BLOCK_N} warps={w}; D={d}".format(d=d, w=residual.encode_warps(d), **rows_meta),
                needs_mma=False))
    absmax_pad = 256
    cases.append(Case("residual_absmax", residual._absmax_kernel, dict(
        z_ptr=dtype, books_ptr=dtype, out_ptr=torch.int32, N=LARGE[0], R=8192, D=200, z_programs=4096,
        BLOCK_R=residual.absmax_rows(absmax_pad), D_PAD=absmax_pad), 4, 1, dtype,
        f"BLOCK_R={residual.absmax_rows(absmax_pad)} D_PAD={absmax_pad}"))
    return cases


# --------------------------------------------------------------------------- compiling and reading

def _signature(case: Case):
    """Signature, constexprs and divisibility attributes as the JIT would specialise them for
    contiguous, 16-byte aligned tensors (ints equal to 1 become constants, multiples of 16 get
    the divisibility hint)."""
    fn = case.fn
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = case.values[name]
        if fn.params[i].is_constexpr or value is None or (type(value) is int and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.dtype):
            signature[name], attrs[(i,)] = PTR_TYPE[value], [["tt.divisibility", 16]]
        elif type(value) is int:
            signature[name] = "i32" if abs(value) < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif type(value) is float:
            signature[name] = "fp32"
        else:
            raise TypeError(f"{case.kernel}: cannot type argument {name}={value!r}")
    return signature, constexprs, attrs


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done.stdout + done.stderr


def resource_usage(cubin: bytes) -> dict:
    """{function: (registers, local bytes, static shared bytes)} from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return _parse_resource_usage(_run(str(TOOLS / "cuobjdump"), "--dump-resource-usage", f.name))


def _parse_resource_usage(text: str) -> dict:
    usage, name = {}, None
    for line in text.splitlines():
        if m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)) and name:
            usage[name] = dict(registers=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)),
                               local=int(m.group(4)))
            name = None
    return usage


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "fma"


_DEF = re.compile(r"^\s*(%[\w.#]+)(?::\d+)?\s*=\s*(.*)$")
_LOAD_OPS = ("tt.load", "ttg.async_copy_global_to_local", "tt.descriptor_load",
             "ttng.async_tma_copy_global_to_local")
_DOT_OPS = ("tt.dot ", "ttng.warp_group_dot ", "tt.dot_scaled")


def z_loads_in_codebook_loop(ttgir: str) -> int:
    """Loads inside the outermost loop that contains a dot whose pointer derives from z.

    A light TTGIR reader: SSA definitions (with scf.for iter_args bound to their initial
    values) give each value's ancestors; a load is a z load when a z argument is among the
    ancestors of its pointer operand.
    """
    lines = ttgir.splitlines()
    parents: dict[str, list[str]] = {}
    for line in lines:
        if m := re.search(r"scf\.for (%[\w.#]+) = .*? iter_args\((.*?)\) ->", line):
            for pair in m.group(2).split(","):
                left, _, right = pair.partition("=")
                parents[left.strip()] = re.findall(r"%[\w.#]+", right)
        if m := _DEF.match(line):
            parents[m.group(1)] = re.findall(r"%[\w.#]+", m.group(2).split(" loc(")[0].split(" : ")[0])

    def from_z(value: str, seen: set) -> bool:
        if value in seen:
            return False
        seen.add(value)
        if value.lstrip("%") in Z_ARGS:
            return True
        return any(from_z(p, seen) for p in parents.get(value, []))

    # The loops, as line ranges by brace depth; the codebook loop: the outermost holding a dot.
    depth, stack, loops = 0, [], []
    for i, line in enumerate(lines):
        if "scf.for" in line:
            stack.append((i, depth))
        depth += line.count("{") - line.count("}")
        while stack and depth <= stack[-1][1]:
            start, _ = stack.pop()
            loops.append((start, i))
    with_dot = [(a, b) for a, b in loops if any(op in line for line in lines[a:b + 1] for op in _DOT_OPS)]
    if not with_dot:
        return 0
    start, end = min(with_dot, key=lambda r: r[0])
    count = 0
    for line in lines[start + 1:end + 1]:
        body = line.split(" loc(")[0]
        op = next((o for o in _LOAD_OPS if f" {o} " in f" {body} "), None)
        if op is None:
            continue
        operands = re.findall(r"%[\w.#]+", body.split(op, 1)[1])
        if operands and from_z(operands[0], set()):
            count += 1
    return count


def compile_case(case: Case, arch: str, machine) -> Record:
    record = Record(case.kernel, case.config, SHORT[case.dtype], arch)
    try:
        signature, constexprs, attrs = _signature(case)
        compiled = triton.compile(ASTSource(case.fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", int(arch[3:]), 32),
                                  options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    except Exception as error:  # a config that does not compile is a finding, not a crash
        # Triton puts the source excerpt first and the reason last: keep both ends.
        text = " ".join(str(error).split())
        text = text if len(text) <= 600 else text[:200] + " ... " + text[-400:]
        record.problems.append(f"does not compile: {type(error).__name__}: {text}")
        return record
    usage = next(iter(resource_usage(compiled.asm["cubin"]).values()), {})
    record.registers = usage.get("registers")
    record.spill_bytes = usage.get("local", 0) + usage.get("stack", 0)
    record.shared_bytes = max(compiled.metadata.shared, usage.get("shared", 0))
    record.mma = mma_kind(compiled.asm["ptx"])
    if case.resident is not None:
        loads = z_loads_in_codebook_loop(compiled.asm["ttgir"])
        record.z_loads_in_loop = loads if case.resident else None
        if case.resident and loads:
            record.problems.append(f"{loads} load(s) of z inside the codebook loop")
    if record.spill_bytes:
        record.problems.append(f"spills {record.spill_bytes} bytes per thread")
    if record.shared_bytes > machine.shared_bytes:
        record.problems.append(f"needs {record.shared_bytes} B of shared memory, {machine.shared_bytes} B allowed")
    if case.needs_mma and record.mma == "fma":
        record.problems.append("16-bit search without tensor-core MMA")
    return record


# --------------------------------------------------------------------------- main

def format_table(records: list[Record]) -> str:
    header = f"{'kernel':<34} {'dtype':<5} {'mma':<6} {'regs':>4} {'spill':>5} {'smem KB':>7} {'z@loop':>6}  config"
    rows = [header, "-" * len(header)]
    for r in records:
        smem = "-" if r.shared_bytes is None else f"{r.shared_bytes / 1024:.1f}"
        z = "-" if r.z_loads_in_loop is None else str(r.z_loads_in_loop)
        line = (f"{r.kernel[:34]:<34} {r.dtype:<5} {r.mma or '-':<6} {r.registers if r.registers is not None else '-':>4} "
                f"{r.spill_bytes if r.spill_bytes is not None else '-':>5} {smem:>7} {z:>6}  {r.config}")
        if r.problems:
            line += "   <-- " + "; ".join(r.problems)
        rows.append(line)
    return "\n".join(rows)


def markdown_summary(records: list[Record], arch: str, machine, seconds: float) -> str:
    """The records grouped by kernel, dtype and tiling, for benchmarks/RESULTS.md."""
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        tiling = r.config.split("; ")[1] if "; " in r.config else "-"
        groups.setdefault((r.kernel, r.dtype, tiling), []).append(r)
    lines = [f"**{arch}** (triton {triton.__version__}; budget {machine.shared_bytes // 1024} KB shared memory per "
             f"block): {len(records)} kernel/config compilations in {seconds:.0f} s, "
             f"{sum(bool(r.problems) for r in records)} failing a check.",
             "",
             "| kernel | dtype | tiling | configs | MMA | registers | spill B | shared KB | z loads in loop |",
             "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for (kernel, dtype, tiling), rs in groups.items():
        regs = sorted(r.registers for r in rs if r.registers is not None)
        shared = [r.shared_bytes for r in rs if r.shared_bytes is not None]
        zl = {r.z_loads_in_loop for r in rs}
        lines.append(
            f"| {kernel} | {dtype} | {tiling} | {len(rs)} | {'/'.join(sorted({r.mma or '-' for r in rs}))} "
            f"| {f'{regs[0]}–{regs[-1]}' if regs and regs[0] != regs[-1] else (regs[0] if regs else '-')} "
            f"| {max((r.spill_bytes or 0) for r in rs)} | {max(shared) / 1024:.0f} "
            f"| {'null' if zl == {None} else '/'.join(str(z) for z in sorted(z for z in zl if z is not None))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(MACHINES), default="sm_90")
    parser.add_argument("--json", help="write the records here (a list of objects)")
    parser.add_argument("--markdown", help="write a summary table (grouped by kernel, dtype and tiling) here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--budget-kb", type=int, help="check against this shared-memory budget per block instead")
    args = parser.parse_args(argv)

    machine = MACHINES[args.arch]
    if args.budget_kb is not None:
        machine = machine._replace(shared_bytes=args.budget_kb * 1024)
    start = time.time()
    cases = [case for dtype in DTYPES for case in search_cases(machine, dtype) + support_cases(machine, dtype)]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # ptxas and cuobjdump run as subprocesses
        records = list(pool.map(lambda case: compile_case(case, args.arch, machine), cases))

    print(f"{args.arch}: {len(records)} kernels/configs, triton {triton.__version__}, "
          f"budget {machine.shared_bytes // 1024} KB shared memory, {time.time() - start:.0f} s")
    print(format_table(records))
    failed = [r for r in records if r.problems]
    print(f"\n{len(failed)} of {len(records)} fail a check" if failed else "\nevery check holds")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([asdict(r) for r in records], indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown_summary(records, args.arch, machine, time.time() - start) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
