// The fold both CPU scans share (AVX-512): a panel's running best / second-best score and index
// per row, two vectors of 16 rows each, kept in registers while codes stream past.
#pragma once

#include <immintrin.h>

#include "scan.h"

namespace vqvae_fast {

struct PanelFold {
  __m512 best0, best1, second0, second1;
  __m512i index0, index1;
};

__attribute__((target("avx512f"), always_inline)) inline PanelFold load_fold(const ScanState& state) {
  return {_mm512_load_ps(state.best),   _mm512_load_ps(state.best + 16),       _mm512_load_ps(state.second),
          _mm512_load_ps(state.second + 16), _mm512_load_si512(state.index), _mm512_load_si512(state.index + 16)};
}

__attribute__((target("avx512f"), always_inline)) inline void store_fold(const PanelFold& f, ScanState& state) {
  _mm512_store_ps(state.best, f.best0);
  _mm512_store_ps(state.best + 16, f.best1);
  _mm512_store_ps(state.second, f.second0);
  _mm512_store_ps(state.second + 16, f.second1);
  _mm512_store_si512(state.index, f.index0);
  _mm512_store_si512(state.index + 16, f.index1);
}

// Folds 16 scores s into the running best and second-best scores of 16 rows. `second` takes
// max(best, s) before best moves, so it is the smallest score of every code but the current
// best; equal scores of two codes leave second == best.
__attribute__((target("avx512f"), always_inline)) inline void fold(__m512 s, __m512& best, __m512& second) {
  second = _mm512_min_ps(second, _mm512_max_ps(best, s));
  best = _mm512_min_ps(best, s);
}

// Folds one code's scores for rows 0-15 (s0) and 16-31 (s1), recording the code where it is
// strictly better than the best so far (ties keep the lower index).
__attribute__((target("avx512f"), always_inline)) inline void fold_code(PanelFold& f, __m512 s0, __m512 s1,
                                                                          int32_t code) {
  const __m512i k = _mm512_set1_epi32(code);
  f.index0 = _mm512_mask_mov_epi32(f.index0, _mm512_cmp_ps_mask(s0, f.best0, _CMP_LT_OQ), k);
  f.index1 = _mm512_mask_mov_epi32(f.index1, _mm512_cmp_ps_mask(s1, f.best1, _CMP_LT_OQ), k);
  fold(s0, f.best0, f.second0);
  fold(s1, f.best1, f.second1);
}

// The smallest of a group's scores, lane by lane: a tree, 11 operations of depth 4 (written
// out: an array updated in place made GCC keep the accumulators on the stack).
__attribute__((target("avx512f"), always_inline)) inline __m512 min_of(const __m512 (&a)[kScanCodes]) {
  static_assert(kScanCodes == 12, "the tree below takes 12 scores");
  const __m512 b0 = _mm512_min_ps(a[0], a[1]), b1 = _mm512_min_ps(a[2], a[3]), b2 = _mm512_min_ps(a[4], a[5]);
  const __m512 b3 = _mm512_min_ps(a[6], a[7]), b4 = _mm512_min_ps(a[8], a[9]), b5 = _mm512_min_ps(a[10], a[11]);
  return _mm512_min_ps(_mm512_min_ps(_mm512_min_ps(b0, b1), _mm512_min_ps(b2, b3)), _mm512_min_ps(b4, b5));
}

// Folds a group of kScanCodes codes' scores (a0: rows 0-15, a1: rows 16-31) into f: with a group
// index as the group's minimum, recording group g where it is strictly better; else code by code.
template <bool kGroupIndex>
__attribute__((target("avx512f"), always_inline)) inline void fold_group(PanelFold& f, const __m512 (&a0)[kScanCodes],
                                                                           const __m512 (&a1)[kScanCodes], int64_t g) {
  if constexpr (kGroupIndex) {
    const __m512 before0 = f.best0, before1 = f.best1;
    fold(min_of(a0), f.best0, f.second0);
    fold(min_of(a1), f.best1, f.second1);
    const __m512i here = _mm512_set1_epi32(static_cast<int>(g));
    f.index0 = _mm512_mask_mov_epi32(f.index0, _mm512_cmp_ps_mask(f.best0, before0, _CMP_LT_OQ), here);
    f.index1 = _mm512_mask_mov_epi32(f.index1, _mm512_cmp_ps_mask(f.best1, before1, _CMP_LT_OQ), here);
  } else {
#pragma GCC unroll 12
    for (int j = 0; j < kScanCodes; ++j) fold_code(f, a0[j], a1[j], static_cast<int32_t>(g * kScanCodes + j));
  }
}

// The fold of the rounded bf16 scan (scan_bf16.cpp): besides the best and second-best score it
// keeps the third-best and the second's code, so a row with two codes inside its (wide) bound can
// still be settled from their exact distances instead of being scanned again.
struct PanelFold3 {
  PanelFold f;
  __m512 third0, third1;
  __m512i index2_0, index2_1;
};

__attribute__((target("avx512f"), always_inline)) inline PanelFold3 load_fold3(const ScanState& state) {
  return {load_fold(state), _mm512_load_ps(state.third), _mm512_load_ps(state.third + 16),
          _mm512_load_si512(state.index2), _mm512_load_si512(state.index2 + 16)};
}

__attribute__((target("avx512f"), always_inline)) inline void store_fold3(const PanelFold3& f, ScanState& state) {
  store_fold(f.f, state);
  _mm512_store_ps(state.third, f.third0);
  _mm512_store_ps(state.third + 16, f.third1);
  _mm512_store_si512(state.index2, f.index2_0);
  _mm512_store_si512(state.index2 + 16, f.index2_1);
}

// One code's 16 scores s into best / second / third and the codes of the first two: a score
// below the best moves the best's code to second; a score below the second takes its place (a
// score equal to the best becomes the second: ties are settled from exact distances).
__attribute__((target("avx512f"), always_inline)) inline void fold3(__m512 s, __m512i k, __m512& best, __m512& second,
                                                                     __m512& third, __m512i& index, __m512i& index2) {
  const __mmask16 below_best = _mm512_cmp_ps_mask(s, best, _CMP_LT_OQ);
  const __mmask16 below_second = _mm512_cmp_ps_mask(s, second, _CMP_LT_OQ);
  index2 = _mm512_mask_mov_epi32(_mm512_mask_mov_epi32(index2, below_second, k), below_best, index);
  index = _mm512_mask_mov_epi32(index, below_best, k);
  third = _mm512_min_ps(third, _mm512_max_ps(second, s));
  second = _mm512_min_ps(second, _mm512_max_ps(best, s));
  best = _mm512_min_ps(best, s);
}

// A score changes a row's three only if it is below the row's third: from group kFoldEveryGroup
// on, a group whose minimum is not, for any of the 16 rows, is skipped (11 operations instead of
// 60). For a row's k-th code the chance of entering its three is about 3/k, so for 16 rows and 12
// codes the skip pays only once k is several hundred: measured (Zen 4, 1 thread) 1.10-1.20x at
// D = 32 with K >= 4096, 1.05x at D = 64, K = 4096, and 0.97-0.99x at K = 1024 when every group
// was tested. Only NaN scores would be folded differently, from rows whose scores are never trusted.
constexpr int64_t kFoldEveryGroup = 48;  // 576 codes

__attribute__((target("avx512f"), always_inline)) inline void fold_group3(PanelFold3& f, const __m512 (&a0)[kScanCodes],
                                                                            const __m512 (&a1)[kScanCodes], int64_t g) {
  const bool test = g >= kFoldEveryGroup;
  if (!test || _mm512_cmp_ps_mask(min_of(a0), f.third0, _CMP_LT_OQ) != 0) {
#pragma GCC unroll 12
    for (int j = 0; j < kScanCodes; ++j) {
      const __m512i k = _mm512_set1_epi32(static_cast<int32_t>(g * kScanCodes + j));
      fold3(a0[j], k, f.f.best0, f.f.second0, f.third0, f.f.index0, f.index2_0);
    }
  }
  if (!test || _mm512_cmp_ps_mask(min_of(a1), f.third1, _CMP_LT_OQ) != 0) {
#pragma GCC unroll 12
    for (int j = 0; j < kScanCodes; ++j) {
      const __m512i k = _mm512_set1_epi32(static_cast<int32_t>(g * kScanCodes + j));
      fold3(a1[j], k, f.f.best1, f.f.second1, f.third1, f.f.index1, f.index2_1);
    }
  }
}

}  // namespace vqvae_fast
