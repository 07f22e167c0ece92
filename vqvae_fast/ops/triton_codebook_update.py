"""Triton kernels of VectorQuantizer's per-step codebook update, in two launches, no host sync.

`vqvae_fast.vector_quantizer.update_codebook_state` is the plain-PyTorch version (CPU), and
states the semantics; tests check that both agree.

1. `_code_state_kernel` (one program, K scalars): running usage, EMA counts, the dead codes
   (usage below the threshold) and their reset, the smoothed EMA count's reciprocal per code,
   and the batch's perplexity, codes used and dead codes.
2. `_code_vectors_kernel` (blocks of codes): EMA sums, restarts (dead codes take a recent
   encoder output), and the codebook = EMA sum / smoothed count (l2-normalised for cosine).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

@triton.jit
def _code_state_kernel(
    # pointers: counts (K,) fp32 in; usage, ema_count (K,) updated; dead (K,) int8, inv_count (K,) fp32,
    # perplexity () fp32 and tallies (2,) int64 (codes used, dead codes) out
    counts_ptr, usage_ptr, ema_count_ptr, dead_ptr, inv_count_ptr, perplexity_ptr, tallies_ptr,
    # sizes and rates
    K, usage_decay, ema_decay, dead_threshold, laplace_eps,
    # meta-parameters
    BLOCK: tl.constexpr, EMA: tl.constexpr, RESTART: tl.constexpr,
):
    """usage = decay usage + (1 - decay) K counts / rows; dead = usage < threshold (RESTART:
    usage and the EMA count reset to 1); ema_count = decay ema_count + (1 - decay) counts;
    inv_count = 1 / smoothed count; the batch's perplexity, codes used and dead codes."""
    offs = tl.arange(0, BLOCK)
    rows = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, K, BLOCK):
        rows += tl.load(counts_ptr + k0 + offs, mask=k0 + offs < K, other=0.0)
    rows = tl.maximum(tl.sum(rows, axis=0), 1.0)  # every row has one code: rows = sum of counts
    entropy = tl.zeros((BLOCK,), tl.float32)
    used = tl.zeros((BLOCK,), tl.int64)
    dead_codes = tl.zeros((BLOCK,), tl.int64)
    total = tl.zeros((BLOCK,), tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + offs
        mask = k < K
        count = tl.load(counts_ptr + k, mask=mask, other=0.0)
        usage = tl.load(usage_ptr + k, mask=mask, other=1.0)
        usage = usage * usage_decay + (count * (K / rows)) * (1.0 - usage_decay)
        dead = mask & (usage < dead_threshold)
        dead_codes += dead.to(tl.int64)
        if RESTART:
            usage = tl.where(dead, 1.0, usage)
            tl.store(dead_ptr + k, dead.to(tl.int8), mask=mask)
        tl.store(usage_ptr + k, usage, mask=mask)
        if EMA:
            ema = tl.load(ema_count_ptr + k, mask=mask, other=0.0) * ema_decay + count * (1.0 - ema_decay)
            if RESTART:
                ema = tl.where(dead, 1.0, ema)
            tl.store(ema_count_ptr + k, ema, mask=mask)
            total += tl.where(mask, ema, 0.0)
        p = count / rows
        entropy += tl.where(count > 0, p * tl.log(tl.where(count > 0, p, 1.0)), 0.0)
        used += (count > 0).to(tl.int64)
    if EMA:  # Laplace smoothing: a code unused for long keeps a finite, sensible value
        total_sum = tl.sum(total, axis=0)
        for k0 in range(0, K, BLOCK):
            k = k0 + offs
            mask = k < K
            ema = tl.load(ema_count_ptr + k, mask=mask, other=0.0)
            smoothed = (ema + laplace_eps) / (total_sum + K * laplace_eps) * total_sum
            tl.store(inv_count_ptr + k, 1.0 / smoothed, mask=mask)
    tl.store(perplexity_ptr, tl.exp(-tl.sum(entropy, axis=0)))
    tl.store(tallies_ptr + offs, tl.where(offs == 0, tl.sum(used, axis=0), tl.sum(dead_codes, axis=0)), mask=offs < 2)


@triton.jit
def _code_vectors_kernel(
    # pointers: ema_sum, codebook (K, D) updated; sums (K, D) in; dead (K,) int8, inv_count (K,) fp32;
    # restart candidates: rows of cand_ptr (K, D), or (GATHER) rows cand_rows of cand_ptr (N, D)
    ema_sum_ptr, codebook_ptr, sums_ptr, dead_ptr, inv_count_ptr, cand_ptr, cand_rows_ptr,
    # sizes and rates
    K, D, ema_decay,
    # strides of the candidates
    stride_cn, stride_cd,
    # meta-parameters
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, EMA: tl.constexpr, RESTART: tl.constexpr,
    GATHER: tl.constexpr, NORMALIZE: tl.constexpr,
):
    """EMA: ema_sum = decay ema_sum + (1 - decay) sums (a dead code: its candidate), codebook =
    ema_sum * inv_count (NORMALIZE: l2-normalised, from a second pass over D). Without EMA only
    the dead codes change: to their candidates. NORMALIZE: candidates are l2-normalised (their
    norms from a first pass over D)."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    k64 = k.to(tl.int64)
    dead = k < 0
    if RESTART:
        dead = k_mask & (tl.load(dead_ptr + k64, mask=k_mask, other=0) != 0)
    source = k64
    if GATHER:
        source = tl.load(cand_rows_ptr + k64, mask=dead, other=0).to(tl.int64)
    inv = tl.full((BLOCK_K,), 1.0, tl.float32)
    if EMA:
        inv = tl.load(inv_count_ptr + k64, mask=k_mask, other=1.0)
    cand_scale = tl.full((BLOCK_K,), 1.0, tl.float32)
    if NORMALIZE and RESTART:
        cand2 = tl.zeros((BLOCK_K,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            candidate = tl.load(cand_ptr + source[:, None] * stride_cn + d[None, :] * stride_cd,
                                mask=(k_mask[:, None] & (d < D)[None, :]) & dead[:, None], other=0.0).to(tl.float32)
            cand2 += tl.sum(candidate * candidate, axis=1)
        cand_scale = 1.0 / tl.maximum(tl.sqrt(cand2), 1e-12)
    norm2 = tl.zeros((BLOCK_K,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        mask = k_mask[:, None] & (d < D)[None, :]
        at = k64[:, None] * D + d[None, :]
        candidate = tl.load(cand_ptr + source[:, None] * stride_cn + d[None, :] * stride_cd,
                            mask=mask & dead[:, None], other=0.0)
        if NORMALIZE:
            candidate = (candidate * cand_scale[:, None]).to(candidate.dtype)
        if EMA:
            value = tl.load(ema_sum_ptr + at, mask=mask, other=0.0)
            value = value * ema_decay + tl.load(sums_ptr + at, mask=mask, other=0.0).to(value.dtype) * (1.0 - ema_decay)
            value = tl.where(dead[:, None], candidate.to(value.dtype), value)
            tl.store(ema_sum_ptr + at, value, mask=mask)
            if NORMALIZE:
                norm2 += tl.sum((value * inv[:, None]).to(tl.float32) * (value * inv[:, None]).to(tl.float32), axis=1)
            else:
                tl.store(codebook_ptr + at, value * inv[:, None], mask=mask)
        else:
            tl.store(codebook_ptr + at, candidate, mask=mask & dead[:, None])
    if EMA and NORMALIZE:  # the codebook: the normalised EMA mean
        scale = inv / tl.maximum(tl.sqrt(norm2), 1e-12)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            mask = k_mask[:, None] & (d < D)[None, :]
            at = k64[:, None] * D + d[None, :]
            tl.store(codebook_ptr + at, tl.load(ema_sum_ptr + at, mask=mask, other=0.0) * scale[:, None], mask=mask)


# Not measured for time (the update is O(K D), next to the search's O(N K D)); static: no spill,
# state 110 registers, vectors 72-183 (static and moved: scripts/inspect_kernels.py, triton 3.8.0, 2026-12-07; see triton_plan's docstring).
STATE_BLOCK = 1024  # codes per step of the one-program state kernel
VECTOR_BLOCKS = dict(BLOCK_K=32, BLOCK_D=64)  # codes and values of D per step of the vectors kernel


def update_codebook_state(usage, ema_count, ema_sum, codebook, counts, sums, candidates, candidate_rows, *,
                          usage_decay: float, ema_decay: float | None, dead_threshold: float, restart: bool,
                          normalize: bool, laplace_eps: float):
    """The Triton form of vector_quantizer.update_codebook_state (same arguments and result)."""
    K = usage.shape[0]
    ema = ema_decay is not None
    device = usage.device
    dead = torch.empty(K, dtype=torch.int8, device=device)
    inv_count = torch.empty(K, dtype=torch.float32, device=device)
    perplexity = torch.empty((), dtype=torch.float32, device=device)
    tallies = torch.empty(2, dtype=torch.int64, device=device)
    _code_state_kernel[(1,)](counts, usage, ema_count, dead, inv_count, perplexity, tallies, K, usage_decay,
                             ema_decay if ema else 0.0, dead_threshold, laplace_eps, BLOCK=STATE_BLOCK, EMA=ema,
                             RESTART=restart)
    if ema or restart:
        D = codebook.shape[1]
        blocks = dict(VECTOR_BLOCKS, BLOCK_D=min(VECTOR_BLOCKS["BLOCK_D"], triton.next_power_of_2(D)))
        _code_vectors_kernel[(triton.cdiv(K, blocks["BLOCK_K"]),)](
            ema_sum, codebook, sums, dead, inv_count, candidates, candidate_rows, K, D, ema_decay if ema else 0.0,
            candidates.stride(0), candidates.stride(1), **blocks, EMA=ema, RESTART=restart,
            GATHER=candidate_rows is not None, NORMALIZE=normalize)
    return perplexity, tallies
