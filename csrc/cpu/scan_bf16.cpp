// The fused scan for bf16 inputs on CPUs with AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake on):
// the scan of scan_avx512.cpp with one VDPBF16PS (two bf16 products added to a float lane) where
// that one has an FMA per coordinate, so twice the products an instruction (measured: 507 against
// 268 GFLOP/s for fp32 FMAs, one core of an AMD EPYC Zen 5). It reads uncentred values: bf16 inputs
// and codes (times -2, exact) are its operands as they are, so each product is exact in float and
// the scores' error is float accumulation alone, within RowSettler's float bound. The instruction
// treats subnormal inputs as zero: a row with one is left to the float scan (its norm is +inf
// here), and a codebook with one never takes this path (nearest_code.cpp). Compiled through
// function attributes and called only after bf16_scan_available(); x86-64 only.

#if defined(__x86_64__)

#include "scan.h"
#include "scan_fold.h"
#include "transpose16.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include <c10/util/Exception.h>

namespace vqvae_fast {
namespace {

__attribute__((target("avx512f,avx512bf16"), always_inline)) inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

template <bool kGroupIndex, bool kTop3 = false>
__attribute__((target("avx512f,avx512bf16"))) void scan(const uint32_t* zt, const uint32_t* codes, const float* norms,
                                                        int64_t P, int64_t g0, int64_t g1, ScanState& state,
                                                        LinePrefetch& fetch) {
  static_assert(!(kGroupIndex && kTop3), "the top-3 fold keeps codes, not groups");
  using Fold = std::conditional_t<kTop3, PanelFold3, PanelFold>;
  Fold f;
  if constexpr (kTop3) {
    f = load_fold3(state);
  } else {
    f = load_fold(state);
  }
  for (int64_t g = g0; g < g1; ++g) {
    const uint32_t* group = codes + g * P * kScanCodes;
    const float* norm = norms + g * kScanCodes;
    __m512 acc0[kScanCodes], acc1[kScanCodes];
#pragma GCC unroll 12
    for (int j = 0; j < kScanCodes; ++j) acc0[j] = acc1[j] = _mm512_set1_ps(norm[j]);
    for (int64_t p = 0; p < P; ++p) {
      fetch.step();
      const __m512i row0 = _mm512_loadu_si512(zt + p * kScanRows);
      const __m512i row1 = _mm512_loadu_si512(zt + p * kScanRows + 16);
      const uint32_t* c = group + p * kScanCodes;
#pragma GCC unroll 12
      for (int j = 0; j < kScanCodes; ++j) {
        const __m512i cj = _mm512_set1_epi32(static_cast<int>(c[j]));
        acc0[j] = dot2(acc0[j], row0, cj);
        acc1[j] = dot2(acc1[j], row1, cj);
      }
    }
    if constexpr (kTop3) {
      fold_group3(f, acc0, acc1, g);
    } else {
      fold_group<kGroupIndex>(f, acc0, acc1, g);
    }
  }
  if constexpr (kTop3) {
    store_fold3(f, state);
  } else {
    store_fold(f, state);
  }
}

}  // namespace

bool bf16_scan_available() {
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512bf16");
  return available;
}

namespace {

// Codes of groups [g0, g1) as pairs x kScanCodes words per group, bits(k, d) the bf16 bits of
// coordinate d of code k; codes past K and coordinates past D are zero.
template <typename Bits>
void pack_code_words(int64_t K, int64_t D, int64_t g0, int64_t g1, uint32_t* packed, Bits bits) {
  const int64_t P = bf16_pairs(D);
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t j = 0; j < kScanCodes; ++j) {
        const int64_t k = g * kScanCodes + j;
        uint32_t word = 0;
        for (int64_t half = 0; half < 2; ++half) {
          const int64_t d = 2 * p + half;
          if (k < K && d < D) word |= static_cast<uint32_t>(bits(k, d)) << (16 * half);
        }
        packed[(g * P + p) * kScanCodes + j] = word;
      }
    }
  }
}

}  // namespace

void bf16_pack_codes(const float* ec, int64_t K, int64_t D, int64_t g0, int64_t g1, uint32_t* packed) {
  uint32_t dropped = 0;  // low halves of the floats: zero when every value is a bf16
  pack_code_words(K, D, g0, g1, packed, [&](int64_t k, int64_t d) {
    uint32_t bits;
    std::memcpy(&bits, ec + k * D + d, sizeof(bits));
    dropped |= bits & 0xFFFFu;
    return static_cast<uint16_t>(bits >> 16);
  });
  TORCH_INTERNAL_ASSERT(dropped == 0, "bf16_pack_codes: a code is not exact in bf16 (the codebook must be uncentred)");
}

void bf16_pack_code_rows(const uint16_t* rows, int64_t K, int64_t D, int64_t g0, int64_t g1, uint32_t* packed) {
  pack_code_words(K, D, g0, g1, packed, [&](int64_t k, int64_t d) { return rows[k * D + d]; });
}

// VCVTNE2PS2BF16 rounds to nearest even and flushes subnormal inputs and results to zero, so
// what is rounded off (x minus the bf16 value, exact in float) includes what the flush drops.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void bf16_round_rows(const float* src, int64_t ld, int64_t n,
                                                                            int64_t D, uint16_t* dst,
                                                                            float* dropped_norm2,
                                                                            float* rounded_norm2) {
  for (int64_t r = 0; r < n; ++r) {
    const float* x = src + r * ld;
    uint16_t* out = dst + r * D;
    __m512 dropped = _mm512_setzero_ps(), rounded = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const int64_t elems = std::min<int64_t>(32, D - d);
      const __mmask16 lo = elems >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << elems) - 1);
      const __mmask16 hi = elems >= 32 ? 0xFFFF : elems <= 16 ? 0 : static_cast<__mmask16>((1u << (elems - 16)) - 1);
      const __m512 a = _mm512_maskz_loadu_ps(lo, x + d), b = _mm512_maskz_loadu_ps(hi, x + d + 16);
      __m512i words = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // element e: a's lanes, then b's
      // Whatever this CPU's conversion does with tiny values, no subnormal reaches VDPBF16PS.
      words = _mm512_mask_mov_epi16(words, _mm512_testn_epi16_mask(words, _mm512_set1_epi16(0x7F80)),
                                    _mm512_setzero_si512());
      const __m512 ra = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(words)), 16));
      const __m512 rb =
          _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1)), 16));
      const __m512 da = _mm512_sub_ps(a, ra), db = _mm512_sub_ps(b, rb);
      dropped = _mm512_fmadd_ps(db, db, _mm512_fmadd_ps(da, da, dropped));
      if (rounded_norm2 != nullptr) rounded = _mm512_fmadd_ps(rb, rb, _mm512_fmadd_ps(ra, ra, rounded));
      _mm512_mask_storeu_epi16(out + d, elems == 32 ? ~0u : (1u << elems) - 1, words);
    }
    dropped_norm2[r] = _mm512_reduce_add_ps(dropped);
    if (rounded_norm2 != nullptr) rounded_norm2[r] = _mm512_reduce_add_ps(rounded);
  }
}

// Blocks of 16 rows x 16 words (32 bf16), transposed in registers, as scan_avx512.cpp's pack: a
// scalar loop here (one dependent float add an element) cost 11 % of a call at D = 256.
__attribute__((target("avx512f,avx512bw"))) void bf16_pack_panel(const uint16_t* z, int64_t ld, int64_t n, int64_t D,
                                                                 uint32_t* zt, float* norms) {
  const int64_t P = bf16_pairs(D);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i low_exponent = _mm512_set1_epi32(0x7F80), low_mantissa = _mm512_set1_epi32(0x7F);
  const __m512i high_exponent = _mm512_slli_epi32(low_exponent, 16);
  const __m512i high_mantissa = _mm512_slli_epi32(low_mantissa, 16);
  alignas(64) float all[kScanRows];
  for (int64_t half = 0; half < kScanRows / 16; ++half) {
    const int64_t row0 = half * 16, rows = std::max<int64_t>(0, std::min<int64_t>(16, n - row0));
    __m512 norm = _mm512_setzero_ps();
    __mmask16 subnormal = 0;
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      const int64_t elems = std::min<int64_t>(32, D - 2 * p0);  // nothing past a row's D values is read
      const __mmask32 cols = elems == 32 ? ~0u : (1u << elems) - 1;
      __m512 r[16];
      for (int t = 0; t < 16; ++t) {
        r[t] = t < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(cols, z + (row0 + t) * ld + 2 * p0))
                        : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int64_t j = 0; j < std::min<int64_t>(16, P - p0); ++j) {
        const __m512i w = _mm512_castps_si512(r[j]);
        _mm512_storeu_si512(zt + (p0 + j) * kScanRows + row0, w);
        const __m512 low = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));  // coordinate 2p, a float
        const __m512 high = _mm512_castsi512_ps(_mm512_and_si512(w, high_half));  // coordinate 2p + 1
        norm = _mm512_fmadd_ps(high, high, _mm512_fmadd_ps(low, low, norm));
        subnormal |= (_mm512_testn_epi32_mask(w, low_exponent) & _mm512_test_epi32_mask(w, low_mantissa)) |
                     (_mm512_testn_epi32_mask(w, high_exponent) & _mm512_test_epi32_mask(w, high_mantissa));
      }
    }
    _mm512_store_ps(all + row0,
                    _mm512_mask_blend_ps(subnormal, norm, _mm512_set1_ps(std::numeric_limits<float>::infinity())));
  }
  std::copy(all, all + n, norms);
}

void bf16_scan_panel(const uint32_t* zt, const uint32_t* codes, const float* norms, int64_t P, int64_t g0, int64_t g1,
                     ScanState& state, bool group_index, LinePrefetch& fetch, bool top3) {
  TORCH_INTERNAL_ASSERT(!(top3 && group_index), "bf16_scan_panel: the top-3 fold keeps codes, not groups");
  if (top3) {
    scan<false, true>(zt, codes, norms, P, g0, g1, state, fetch);
  } else if (group_index) {
    scan<true>(zt, codes, norms, P, g0, g1, state, fetch);
  } else {
    scan<false>(zt, codes, norms, P, g0, g1, state, fetch);
  }
}

// The scan's scores of group g for panel row `row`, lane j = code j: the same products added in
// the same order (a VDPBF16PS lane is acc + a1 b1 + a0 b0 whichever operand is the broadcast one).
__attribute__((target("avx512f,avx512bf16"))) int64_t bf16_code_in_group(const uint32_t* zt, int64_t row,
                                                                          const uint32_t* codes, const float* norms,
                                                                          int64_t P, int64_t g, float best,
                                                                          float* second) {
  constexpr __mmask16 lanes = (1u << kScanCodes) - 1;
  const uint32_t* group = codes + g * P * kScanCodes;
  __m512 acc = _mm512_maskz_loadu_ps(lanes, norms + g * kScanCodes);
  for (int64_t p = 0; p < P; ++p) {
    acc = dot2(acc, _mm512_set1_epi32(static_cast<int>(zt[p * kScanRows + row])),
               _mm512_maskz_loadu_epi32(lanes, group + p * kScanCodes));
  }
  const __mmask16 hit = _mm512_mask_cmp_ps_mask(lanes, acc, _mm512_set1_ps(best), _CMP_EQ_OQ);
  if (hit == 0) return -1;
  const int j = __builtin_ctz(hit);
  *second = _mm512_mask_reduce_min_ps(static_cast<__mmask16>(lanes & ~(1u << j)), acc);
  return j;
}

}  // namespace vqvae_fast

#endif  // __x86_64__
