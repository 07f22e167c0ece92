// AVX2 + FMA (and F16C) body of the fused CPU scan (see scan.h), for x86-64 CPUs without AVX-512
// (laptops, older servers). Compiled through function attributes and called only after
// scan_available(ScanIsa::kAvx2); x86-64 only. Same layouts and the same scores, bit for bit, as
// the AVX-512 body: each score is the norm, then one FMA per coordinate in order.
//
// Register arithmetic: 16 ymm registers hold 2 vectors of 8 rows x 6 codes = 12 accumulators, 2
// row vectors and a broadcast code coordinate, so a panel (32 rows) x group (12 codes) runs as 4
// passes of 16 rows x 6 codes; between passes the running best / second / index of the pass's 16
// rows are folded in memory (L1).

#if defined(__x86_64__)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "scan.h"

namespace vqvae_fast {
namespace {

constexpr int kPassRows = 16;              // two vectors of 8 rows
constexpr int kPassCodes = kScanCodes / 2;  // 6 codes: 12 accumulators

#define VQVAE_FAST_AVX2 __attribute__((target("avx2,fma,f16c")))
// The pass helpers inlined into the scan loop (GCC kept code_pass out of line, a call per pass).
#define VQVAE_FAST_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

// Folds 8 scores s into the running best and second-best of 8 rows (scan_fold.h's fold).
VQVAE_FAST_AVX2 inline void fold(__m256 s, __m256& best, __m256& second) {
  second = _mm256_min_ps(second, _mm256_max_ps(best, s));
  best = _mm256_min_ps(best, s);
}

// The scores of codes [c0, c0 + kPassCodes) of a group for rows [r0, r0 + kPassRows) of the panel:
// the norm, then one FMA per coordinate in order.
VQVAE_FAST_AVX2_INLINE void scores(const float* zt, const float* group, const float* norm, int64_t D, int c0, int r0,
                                   __m256 (&acc0)[kPassCodes], __m256 (&acc1)[kPassCodes]) {
#pragma GCC unroll 6
  for (int j = 0; j < kPassCodes; ++j) acc0[j] = acc1[j] = _mm256_broadcast_ss(norm + c0 + j);
  for (int64_t d = 0; d < D; ++d) {
    const __m256 row0 = _mm256_loadu_ps(zt + d * kScanRows + r0);
    const __m256 row1 = _mm256_loadu_ps(zt + d * kScanRows + r0 + 8);
    const float* c = group + d * kScanCodes + c0;
#pragma GCC unroll 6
    for (int j = 0; j < kPassCodes; ++j) {
      const __m256 cj = _mm256_broadcast_ss(c + j);
      acc0[j] = _mm256_fmadd_ps(row0, cj, acc0[j]);
      acc1[j] = _mm256_fmadd_ps(row1, cj, acc1[j]);
    }
  }
}

struct PassState {  // the running best / second / index of a pass's 16 rows, in registers
  __m256 best0, best1, second0, second1, index0, index1;
};

VQVAE_FAST_AVX2_INLINE PassState load_state(const ScanState& state, int r0) {
  return {_mm256_load_ps(state.best + r0), _mm256_load_ps(state.best + r0 + 8),
          _mm256_load_ps(state.second + r0), _mm256_load_ps(state.second + r0 + 8),
          _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(state.index + r0))),
          _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(state.index + r0 + 8)))};
}

VQVAE_FAST_AVX2_INLINE void store_state(const PassState& p, ScanState& state, int r0) {
  _mm256_store_ps(state.best + r0, p.best0);
  _mm256_store_ps(state.best + r0 + 8, p.best1);
  _mm256_store_ps(state.second + r0, p.second0);
  _mm256_store_ps(state.second + r0 + 8, p.second1);
  _mm256_store_si256(reinterpret_cast<__m256i*>(state.index + r0), _mm256_castps_si256(p.index0));
  _mm256_store_si256(reinterpret_cast<__m256i*>(state.index + r0 + 8), _mm256_castps_si256(p.index1));
}

// Codes [c0, c0 + kPassCodes) of group g against rows [r0, r0 + kPassRows), each score folded.
VQVAE_FAST_AVX2_INLINE void code_pass(const float* zt, const float* group, const float* norm, int64_t D, int64_t g,
                                      int c0, int r0, ScanState& state) {
  __m256 acc0[kPassCodes], acc1[kPassCodes];
  scores(zt, group, norm, D, c0, r0, acc0, acc1);
  PassState p = load_state(state, r0);
#pragma GCC unroll 6
  for (int j = 0; j < kPassCodes; ++j) {
    const __m256 k = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(g * kScanCodes + c0 + j)));
    p.index0 = _mm256_blendv_ps(p.index0, k, _mm256_cmp_ps(acc0[j], p.best0, _CMP_LT_OQ));
    p.index1 = _mm256_blendv_ps(p.index1, k, _mm256_cmp_ps(acc1[j], p.best1, _CMP_LT_OQ));
    fold(acc0[j], p.best0, p.second0);
    fold(acc1[j], p.best1, p.second1);
  }
  store_state(p, state, r0);
}

// The whole group g (both halves of its codes) against rows [r0, r0 + kPassRows), folded once as
// its minimum (scan.h's group_index): one fold, compare and blend a group instead of two.
VQVAE_FAST_AVX2_INLINE void group_pass(const float* zt, const float* group, const float* norm, int64_t D, int64_t g,
                                       int r0, ScanState& state) {
  __m256 acc0[kPassCodes], acc1[kPassCodes];
  scores(zt, group, norm, D, 0, r0, acc0, acc1);
  __m256 min0 = acc0[0], min1 = acc1[0];
#pragma GCC unroll 6
  for (int j = 1; j < kPassCodes; ++j) {
    min0 = _mm256_min_ps(min0, acc0[j]);
    min1 = _mm256_min_ps(min1, acc1[j]);
  }
  scores(zt, group, norm, D, kPassCodes, r0, acc0, acc1);
#pragma GCC unroll 6
  for (int j = 0; j < kPassCodes; ++j) {
    min0 = _mm256_min_ps(min0, acc0[j]);
    min1 = _mm256_min_ps(min1, acc1[j]);
  }
  PassState p = load_state(state, r0);
  const __m256 before0 = p.best0, before1 = p.best1;
  fold(min0, p.best0, p.second0);
  fold(min1, p.best1, p.second1);
  const __m256 here = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(g)));
  p.index0 = _mm256_blendv_ps(p.index0, here, _mm256_cmp_ps(p.best0, before0, _CMP_LT_OQ));
  p.index1 = _mm256_blendv_ps(p.index1, here, _mm256_cmp_ps(p.best1, before1, _CMP_LT_OQ));
  store_state(p, state, r0);
}

// Packing and the exact distance, vectorised: scalar loops (a dependent FMA an element, a
// scattered store) cost up to 12 % of a call at D = 128 (AMD Zen 4, where the scan itself runs at
// the AVX-512 scan's rate).

// kLanes values at p as floats (16-bit floats widen exactly).
template <Elem T, int kLanes>
VQVAE_FAST_AVX2_INLINE __m256 load_all(const void* p) {
  static_assert(kLanes == 4 || kLanes == 8, "a __m128 or a __m256 of values");
  if constexpr (T == Elem::kFloat) {
    return kLanes == 8 ? _mm256_loadu_ps(static_cast<const float*>(p))
                       : _mm256_castps128_ps256(_mm_loadu_ps(static_cast<const float*>(p)));
  } else {
    const __m128i raw = kLanes == 8 ? _mm_loadu_si128(static_cast<const __m128i*>(p))
                                    : _mm_loadl_epi64(static_cast<const __m128i*>(p));
    if constexpr (T == Elem::kBFloat16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));  // bf16: a float's top half
    } else {
      return _mm256_cvtph_ps(raw);
    }
  }
}

// `count` <= kLanes values at p as floats, zeros after them; nothing past them is read.
template <Elem T, int kLanes>
VQVAE_FAST_AVX2_INLINE __m256 load_floats(const void* p, int64_t count) {
  if (count >= kLanes) return load_all<T, kLanes>(p);
  alignas(32) uint8_t part[32] = {};
  std::memcpy(part, p, count * elem_size<T>());
  return load_all<T, kLanes>(part);
}

// In-register transpose of an 8 x 8 block: r[i][j] -> r[j][i].
VQVAE_FAST_AVX2_INLINE void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
  }
}

// Blocks of 8 rows x 8 coordinates, centred as rows, transposed in registers; each row's norm is
// one FMA chain over its coordinates in order (a lane a row), as the AVX-512 body forms it.
template <Elem T>
VQVAE_FAST_AVX2 void pack(const void* z, int64_t ld, int64_t n, const float* centre, int64_t D, float* zt,
                          float* norms) {
  const char* base = static_cast<const char*>(z);
  alignas(32) float all[kScanRows];
  for (int64_t row0 = 0; row0 < kScanRows; row0 += 8) {
    const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(8, n - row0));
    __m256 norm = _mm256_setzero_ps();
    for (int64_t d0 = 0; d0 < D; d0 += 8) {
      const int64_t width = std::min<int64_t>(8, D - d0);
      const __m256 c = load_floats<Elem::kFloat, 8>(centre + d0, width);
      __m256 r[8];
      for (int t = 0; t < 8; ++t) {
        r[t] = t < rows ? _mm256_sub_ps(load_floats<T, 8>(base + ((row0 + t) * ld + d0) * elem_size<T>(), width), c)
                        : _mm256_setzero_ps();
      }
      transpose8(r);
      for (int64_t j = 0; j < width; ++j) {
        _mm256_storeu_ps(zt + (d0 + j) * kScanRows + row0, r[j]);
        norm = _mm256_fmadd_ps(r[j], r[j], norm);
      }
    }
    _mm256_store_ps(all + row0, norm);
  }
  std::copy(all, all + n, norms);
}

// Four float64 chains (lane j: coordinates d = j mod 4), added pairwise at the end.
template <Elem T>
VQVAE_FAST_AVX2 double exact(const void* z, const void* e, int64_t D) {
  const char* zb = static_cast<const char*>(z);
  const char* eb = static_cast<const char*>(e);
  __m256d sum = _mm256_setzero_pd();
  for (int64_t d = 0; d < D; d += 4) {
    const int64_t width = std::min<int64_t>(4, D - d);  // zeros past D in both
    const __m128 zv = _mm256_castps256_ps128(load_floats<T, 4>(zb + d * elem_size<T>(), width));
    const __m128 ev = _mm256_castps256_ps128(load_floats<T, 4>(eb + d * elem_size<T>(), width));
    const __m256d t = _mm256_sub_pd(_mm256_cvtps_pd(zv), _mm256_cvtps_pd(ev));
    sum = _mm256_fmadd_pd(t, t, sum);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, sum);
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

// Each row sees a group's codes in index order (both passes of its rows, in code order), so
// ties keep the lower index as in the AVX-512 scan.
template <bool kGroupIndex>
VQVAE_FAST_AVX2 void scan(const float* zt, const float* codes, const float* norms, int64_t D, int64_t g0, int64_t g1,
                          ScanState& state, LinePrefetch& fetch) {
  // A line of `fetch` every 384 FMAs or so, asked for between passes. Below D = 16 the next
  // panel's rows are at most 30 lines, asked for at once: two steps a pass there (of 192 FMAs)
  // made the scan 1.5 % slower at D = 8 (AMD Zen 4, AVX2 forced, 1 thread).
  const int64_t steps_per_pass = D / 16;
  if (steps_per_pass == 0) fetch.all();
  for (int64_t g = g0; g < g1; ++g) {
    const float* group = codes + g * D * kScanCodes;
    const float* norm = norms + g * kScanCodes;
    for (int r0 = 0; r0 < kScanRows; r0 += kPassRows) {
      for (int64_t i = 0; i < steps_per_pass; ++i) fetch.step();
      if constexpr (kGroupIndex) {
        group_pass(zt, group, norm, D, g, r0, state);
      } else {
        for (int c0 = 0; c0 < kScanCodes; c0 += kPassCodes) code_pass(zt, group, norm, D, g, c0, r0, state);
      }
    }
  }
}

}  // namespace

template <>
void ScanBody<ScanIsa::kAvx2>::scan_panel(const float* zt, const float* codes, const float* norms,
    int64_t D, int64_t g0, int64_t g1, ScanState& state, bool group_index, LinePrefetch& fetch) {
  if (group_index) {
    scan<true>(zt, codes, norms, D, g0, g1, state, fetch);
  } else {
    scan<false>(zt, codes, norms, D, g0, g1, state, fetch);
  }
}

// Group g's 12 scores for one row, lanes 0-7 and 8-11 (12-15 masked off), with the scan's
// operations in the scan's order: bit for bit the scan's scores.
template <>
VQVAE_FAST_AVX2 int64_t ScanBody<ScanIsa::kAvx2>::code_in_group(
    const float* zt, int64_t row, const float* codes, const float* norms, int64_t D, int64_t g, float best,
    float* second) {
  const __m256i high_lanes = _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0);  // codes 8-11
  const float* group = codes + g * D * kScanCodes;
  __m256 acc_low = _mm256_loadu_ps(norms + g * kScanCodes);
  __m256 acc_high = _mm256_maskload_ps(norms + g * kScanCodes + 8, high_lanes);
  for (int64_t d = 0; d < D; ++d) {
    const __m256 x = _mm256_broadcast_ss(zt + d * kScanRows + row);
    acc_low = _mm256_fmadd_ps(x, _mm256_loadu_ps(group + d * kScanCodes), acc_low);
    acc_high = _mm256_fmadd_ps(x, _mm256_maskload_ps(group + d * kScanCodes + 8, high_lanes), acc_high);
  }
  // The first code scoring `best` and the smallest score of the others, in registers (a scalar
  // search here cost 60% of the scan's own time at D = 8).
  const __m256 target = _mm256_set1_ps(best);
  const int low = _mm256_movemask_ps(_mm256_cmp_ps(acc_low, target, _CMP_EQ_OQ));
  const int high = _mm256_movemask_ps(_mm256_cmp_ps(acc_high, target, _CMP_EQ_OQ)) & 0xF;
  const int hit = low | (high << 8);  // bit j: code j (codes 8-11 are acc_high's lanes 0-3)
  if (hit == 0) return -1;
  const int j = __builtin_ctz(hit);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 not_low = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, _mm256_set1_epi32(j)));
  const __m256 not_high = _mm256_or_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(lane, _mm256_set1_epi32(j - 8))),
                                       _mm256_castsi256_ps(_mm256_cmpgt_epi32(lane, _mm256_set1_epi32(3))));
  __m256 others = _mm256_min_ps(_mm256_blendv_ps(acc_low, inf, not_low), _mm256_blendv_ps(acc_high, inf, not_high));
  others = _mm256_min_ps(others, _mm256_permute2f128_ps(others, others, 1));
  others = _mm256_min_ps(others, _mm256_shuffle_ps(others, others, _MM_SHUFFLE(1, 0, 3, 2)));
  others = _mm256_min_ps(others, _mm256_shuffle_ps(others, others, _MM_SHUFFLE(2, 3, 0, 1)));
  *second = _mm256_cvtss_f32(others);
  return j;
}

template <>
void ScanBody<ScanIsa::kAvx2>::pack_panel(const void* z, Elem type, int64_t ld, int64_t n, const float* centre,
    int64_t D, float* zt, float* norms) {
  with_elem(type, [&](auto t) { pack<decltype(t)::value>(z, ld, n, centre, D, zt, norms); });
}

template <>
double ScanBody<ScanIsa::kAvx2>::exact_sq_dist(const void* z, const void* e, Elem type, int64_t D) {
  return with_elem(type, [&](auto t) { return exact<decltype(t)::value>(z, e, D); });
}

#undef VQVAE_FAST_AVX2
#undef VQVAE_FAST_AVX2_INLINE

}  // namespace vqvae_fast

#endif  // __x86_64__
