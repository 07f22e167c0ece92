// AVX-512 body of the fused CPU scan (see scan.h). Compiled for AVX-512F through function
// attributes and called only after scan_available(ScanIsa::kAvx512), so the library still loads
// everywhere; x86-64 only (other CPUs compile none of it).

#if defined(__x86_64__)

#include "scan.h"
#include "scan_fold.h"
#include "transpose16.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace vqvae_fast {
namespace {

// kGroupIndex: record the group of the best code (two operations per group instead of two per
// code; the caller finds the code inside the group), else the code itself.
template <bool kGroupIndex>
__attribute__((target("avx512f"))) void scan(const float* zt, const float* codes, const float* norms, int64_t D,
                                             int64_t g0, int64_t g1, ScanState& state, LinePrefetch& fetch) {
  PanelFold f = load_fold(state);
  for (int64_t g = g0; g < g1; ++g) {
    const float* group = codes + g * D * kScanCodes;
    const float* norm = norms + g * kScanCodes;
    __m512 acc0[kScanCodes], acc1[kScanCodes];
#pragma GCC unroll 12
    for (int j = 0; j < kScanCodes; ++j) acc0[j] = acc1[j] = _mm512_set1_ps(norm[j]);
    for (int64_t d = 0; d < D; ++d) {
      fetch.step();
      const __m512 row0 = _mm512_loadu_ps(zt + d * kScanRows);
      const __m512 row1 = _mm512_loadu_ps(zt + d * kScanRows + 16);
      const float* c = group + d * kScanCodes;
      // Each FMA takes its code coordinate as a broadcast memory operand ({1to16}, done by the load):
      // with `c` alone GCC broadcasts each coordinate once into a register for both FMAs, and those
      // 12 broadcast instructions a step held the D = 8 scan at 80 % of the FMA peak on AMD Zen 4
      // (88 % this way: 10 % faster at D = 8, the same at D >= 128; benchmarks/RESULTS.md). The empty
      // asm makes c_again not provably `c`, so the two loads stay.
      const float* c_again = c;
      asm("" : "+r"(c_again));
#pragma GCC unroll 12
      for (int j = 0; j < kScanCodes; ++j) {
        acc0[j] = _mm512_fmadd_ps(row0, _mm512_set1_ps(c[j]), acc0[j]);
        acc1[j] = _mm512_fmadd_ps(row1, _mm512_set1_ps(c_again[j]), acc1[j]);
      }
    }
    fold_group<kGroupIndex>(f, acc0, acc1, g);
  }

  store_fold(f, state);
}

}  // namespace

// The scores of group g's codes for one row, lane j = code j, with the scan's operations in the
// scan's order (norm, then one FMA per coordinate): bit for bit the scan's scores.
template <>
__attribute__((target("avx512f"))) int64_t ScanBody<ScanIsa::kAvx512>::code_in_group(
    const float* zt, int64_t row, const float* codes, const float* norms, int64_t D, int64_t g, float best,
    float* second) {
  constexpr __mmask16 lanes = (1u << kScanCodes) - 1;
  const float* group = codes + g * D * kScanCodes;
  __m512 acc = _mm512_maskz_loadu_ps(lanes, norms + g * kScanCodes);
  for (int64_t d = 0; d < D; ++d) {
    acc = _mm512_fmadd_ps(_mm512_set1_ps(zt[d * kScanRows + row]), _mm512_maskz_loadu_ps(lanes, group + d * kScanCodes),
                          acc);
  }
  const __mmask16 hit = _mm512_mask_cmp_ps_mask(lanes, acc, _mm512_set1_ps(best), _CMP_EQ_OQ);
  if (hit == 0) return -1;
  const int j = __builtin_ctz(hit);
  *second = _mm512_mask_reduce_min_ps(static_cast<__mmask16>(lanes & ~(1u << j)), acc);
  return j;
}

template <>
void ScanBody<ScanIsa::kAvx512>::scan_panel(const float* zt, const float* codes, const float* norms,
    int64_t D, int64_t g0, int64_t g1, ScanState& state, bool group_index, LinePrefetch& fetch) {
  if (group_index) {
    scan<true>(zt, codes, norms, D, g0, g1, state, fetch);
  } else {
    scan<false>(zt, codes, norms, D, g0, g1, state, fetch);
  }
}

namespace {

// `count` <= 16 values at p as floats (exactly: 16-bit floats widen exactly), zeros after them;
// nothing past them is read.
template <Elem T>
__attribute__((target("avx512f"), always_inline)) inline __m512 load16(const void* p, int64_t count) {
  if constexpr (T == Elem::kFloat) {
    return _mm512_maskz_loadu_ps(count >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << count) - 1), p);
  } else {
    __m256i raw;
    if (count >= 16) {
      raw = _mm256_loadu_si256(static_cast<const __m256i*>(p));
    } else {
      alignas(32) uint16_t part[16] = {};
      std::memcpy(part, p, count * sizeof(uint16_t));
      raw = _mm256_load_si256(reinterpret_cast<const __m256i*>(part));
    }
    if constexpr (T == Elem::kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));  // bf16: a float's top half
    } else {
      return _mm512_cvtph_ps(raw);
    }
  }
}

template <Elem T>
__attribute__((target("avx512f"))) void pack(const void* z, int64_t ld, int64_t n, const float* centre, int64_t D,
                                             float* zt, float* norms) {
  // Blocks of 16 rows x 16 coordinates: centred as rows, transposed in registers, stored as
  // 16 coordinates of 16 row lanes. Rows past n and coordinates past D are zero.
  const char* base = static_cast<const char*>(z);
  alignas(64) float all[kScanRows];
  for (int64_t half = 0; half < kScanRows / 16; ++half) {
    const int64_t row0 = half * 16, rows = std::max<int64_t>(0, std::min<int64_t>(16, n - row0));
    __m512 norm = _mm512_setzero_ps();
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t width = std::min<int64_t>(16, D - d0);
      const __mmask16 cols = width == 16 ? 0xFFFF : static_cast<__mmask16>((1u << width) - 1);
      const __m512 c = _mm512_maskz_loadu_ps(cols, centre + d0);
      __m512 r[16];
      for (int t = 0; t < 16; ++t) {
        r[t] = t < rows ? _mm512_maskz_sub_ps(cols, load16<T>(base + ((row0 + t) * ld + d0) * elem_size<T>(), width), c)
                        : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int j = 0; j < width; ++j) {
        _mm512_storeu_ps(zt + (d0 + j) * kScanRows + row0, r[j]);
        norm = _mm512_fmadd_ps(r[j], r[j], norm);
      }
    }
    _mm512_store_ps(all + row0, norm);
  }
  for (int64_t t = 0; t < n; ++t) norms[t] = all[t];
}

// Rows as rows: out[t * D + d] = z[t][d] - centre[d] for t < kScanRows (zero rows past n),
// norms as pack's (the squares summed in float).
template <Elem T>
__attribute__((target("avx512f"))) void centre_rows(const void* z, int64_t ld, int64_t n, const float* centre,
                                                    int64_t D, float* out, float* norms) {
  const char* base = static_cast<const char*>(z);
  for (int64_t t = 0; t < kScanRows; ++t) {
    __m512 norm = _mm512_setzero_ps();
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t width = std::min<int64_t>(16, D - d0);
      const __mmask16 cols = width == 16 ? 0xFFFF : static_cast<__mmask16>((1u << width) - 1);
      const __m512 r = t < n ? _mm512_maskz_sub_ps(cols, load16<T>(base + (t * ld + d0) * elem_size<T>(), width),
                                                   _mm512_maskz_loadu_ps(cols, centre + d0))
                             : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(out + t * D + d0, cols, r);
      norm = _mm512_fmadd_ps(r, r, norm);
    }
    if (t < n) norms[t] = _mm512_reduce_add_ps(norm);
  }
}

// The 8 low and the 8 high floats of v, widened to double (exactly).
__attribute__((target("avx512f"), always_inline)) inline __m512d low8(__m512 v) {
  return _mm512_cvtps_pd(_mm512_castps512_ps256(v));
}
__attribute__((target("avx512f"), always_inline)) inline __m512d high8(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

template <Elem T>
__attribute__((target("avx512f"))) double exact(const void* z, const void* e, int64_t D) {
  const char* zb = static_cast<const char*>(z);
  const char* eb = static_cast<const char*>(e);
  __m512d sum = _mm512_setzero_pd();
  for (int64_t d = 0; d < D; d += 16) {
    const int64_t width = std::min<int64_t>(16, D - d);
    const __m512 zv = load16<T>(zb + d * elem_size<T>(), width);  // zeros past D in both
    const __m512 ev = load16<T>(eb + d * elem_size<T>(), width);
    const __m512d lo = _mm512_sub_pd(low8(zv), low8(ev));
    const __m512d hi = _mm512_sub_pd(high8(zv), high8(ev));
    sum = _mm512_fmadd_pd(lo, lo, sum);
    sum = _mm512_fmadd_pd(hi, hi, sum);
  }
  return _mm512_reduce_add_pd(sum);
}

}  // namespace

__attribute__((target("avx512f"))) void transpose_words16(const uint32_t* src, int64_t stride, uint32_t* dst) {
  __m512 r[16];
  for (int n = 0; n < 16; ++n) r[n] = _mm512_castsi512_ps(_mm512_loadu_si512(src + n * stride));
  transpose16(r);
  for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst + p * 16, _mm512_castps_si512(r[p]));
}

template <>
void ScanBody<ScanIsa::kAvx512>::pack_panel(const void* z, Elem type, int64_t ld, int64_t n, const float* centre,
    int64_t D, float* zt, float* norms) {
  with_elem(type, [&](auto t) { pack<decltype(t)::value>(z, ld, n, centre, D, zt, norms); });
}

template <>
double ScanBody<ScanIsa::kAvx512>::exact_sq_dist(const void* z, const void* e, Elem type, int64_t D) {
  return with_elem(type, [&](auto t) { return exact<decltype(t)::value>(z, e, D); });
}

void centre_panel_rows(const void* z, Elem type, int64_t ld, int64_t n, const float* centre, int64_t D, float* out,
                       float* norms) {
  with_elem(type, [&](auto t) { centre_rows<decltype(t)::value>(z, ld, n, centre, D, out, norms); });
}

}  // namespace vqvae_fast

#endif  // __x86_64__
