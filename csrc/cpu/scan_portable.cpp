// Portable body of the fused CPU scan (see scan.h): the AVX2 body's passes written over a vector
// of 4 floats, which is NEON's float32x4_t on aarch64 (every aarch64 CPU has NEON: the default
// path there) and 4 floats with std::fma elsewhere (on x86-64 it runs only when forced,
// VQVAE_FAST_CPU_SCAN=portable, which is how the tests check this file's logic on an x86
// machine). Same layouts and the same scores, bit for bit, as the other bodies: each score is the
// norm, then one fused multiply-add per coordinate in order (NEON's fmla rounds once, as FMA does).
//
// Register arithmetic (aarch64: 32 vector registers of 4 floats): a pass is 16 rows x 6 codes =
// 24 accumulators, 4 row vectors and the codes' coordinates; a panel (32 rows) x group (12 codes)
// runs as 4 passes, folded between passes in memory (L1), as in the AVX2 body.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "scan.h"
#include "scan_rows.h"

#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace vqvae_fast {
namespace {

#if defined(__aarch64__) && defined(__ARM_NEON)

using Floats = float32x4_t;
using Ints = int32x4_t;
inline Floats load(const float* p) { return vld1q_f32(p); }
inline void store(float* p, Floats v) { vst1q_f32(p, v); }
inline Ints load(const int32_t* p) { return vld1q_s32(p); }
inline void store(int32_t* p, Ints v) { vst1q_s32(p, v); }
inline Floats splat(float x) { return vdupq_n_f32(x); }
inline Ints splat(int32_t x) { return vdupq_n_s32(x); }
// acc + a * b[kLane], one rounding.
template <int kLane>
inline Floats fma_lane(Floats acc, Floats a, Floats b) {
  return vfmaq_laneq_f32(acc, a, b, kLane);
}
inline Floats min(Floats a, Floats b) { return vminq_f32(a, b); }
inline Floats max(Floats a, Floats b) { return vmaxq_f32(a, b); }
// Lane by lane: a < b ? yes : no.
inline Ints select_less(Floats a, Floats b, Ints yes, Ints no) { return vbslq_s32(vcltq_f32(a, b), yes, no); }

#else  // 4 floats, one operation per lane (x86-64 forced, or CPUs other than x86-64 and aarch64)

template <typename T>
struct Lanes {
  T v[4];
};
using Floats = Lanes<float>;
using Ints = Lanes<int32_t>;
template <typename T>
inline Lanes<T> load(const T* p) {
  Lanes<T> r;
  std::memcpy(r.v, p, sizeof(r.v));
  return r;
}
template <typename T>
inline void store(T* p, const Lanes<T>& x) {
  std::memcpy(p, x.v, sizeof(x.v));
}
template <typename T>
inline Lanes<T> splat(T x) {
  return {{x, x, x, x}};
}
template <int kLane>
inline Floats fma_lane(Floats acc, Floats a, Floats b) {
  for (int l = 0; l < 4; ++l) acc.v[l] = std::fma(a.v[l], b.v[kLane], acc.v[l]);
  return acc;
}
// As NEON's, for ordered values (a NaN score only arises in rows the settler does not trust).
inline Floats min(Floats a, Floats b) {
  for (int l = 0; l < 4; ++l) a.v[l] = b.v[l] < a.v[l] ? b.v[l] : a.v[l];
  return a;
}
inline Floats max(Floats a, Floats b) {
  for (int l = 0; l < 4; ++l) a.v[l] = b.v[l] > a.v[l] ? b.v[l] : a.v[l];
  return a;
}
inline Ints select_less(Floats a, Floats b, Ints yes, Ints no) {
  for (int l = 0; l < 4; ++l) no.v[l] = a.v[l] < b.v[l] ? yes.v[l] : no.v[l];
  return no;
}

#endif

constexpr int kPassVectors = 4;                     // 16 rows
constexpr int kPassRows = 4 * kPassVectors;
constexpr int kPassCodes = kScanCodes / 2;          // 6 codes: 24 accumulators

// Folds 4 scores s into the running best and second-best of 4 rows (scan_fold.h's fold).
inline void fold(Floats s, Floats& best, Floats& second) {
  second = min(second, max(best, s));
  best = min(best, s);
}

// acc[v] += row[v] * (code j's coordinate), for the pass's code j, which is lane j of `codes`
// (codes 0-3 of the pass) or lane j - 2 (codes 2-5).
template <int J>
inline void accumulate(Floats (&acc)[kPassVectors], const Floats (&row)[kPassVectors], Floats codes) {
  constexpr int kLane = J < 4 ? J : J - 2;
#pragma GCC unroll 4
  for (int v = 0; v < kPassVectors; ++v) acc[v] = fma_lane<kLane>(acc[v], row[v], codes);
}

// One pass: codes [c0, c0 + kPassCodes) of group g against rows [r0, r0 + kPassRows) of the panel.
template <bool kGroupIndex>
inline void pass(const float* zt, const float* group, const float* norm, int64_t D, int64_t g, int c0, int r0,
                 ScanState& state, LinePrefetch& fetch) {
  Floats acc[kPassCodes][kPassVectors];
#pragma GCC unroll 6
  for (int j = 0; j < kPassCodes; ++j) {
#pragma GCC unroll 4
    for (int v = 0; v < kPassVectors; ++v) acc[j][v] = splat(norm[c0 + j]);
  }
  for (int64_t i = 0; i < std::max<int64_t>(1, D / 32); ++i) fetch.step();  // D / 8 lines a group, as the AVX2 scan
  for (int64_t d = 0; d < D; ++d) {
    Floats row[kPassVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kPassVectors; ++v) row[v] = load(zt + d * kScanRows + r0 + 4 * v);
    // The 6 codes' coordinates as two vectors (codes 0-3 and 2-5 of the pass), each code used
    // from its lane: 2 registers, not 6, so that the 24 accumulators stay in registers.
    const float* c = group + d * kScanCodes + c0;
    const Floats low = load(c), high = load(c + 2);
    [&]<int... J>(std::integer_sequence<int, J...>) {
      ((accumulate<J>(acc[J], row, J < 4 ? low : high)), ...);
    }(std::make_integer_sequence<int, kPassCodes>{});
  }
#pragma GCC unroll 4
  for (int v = 0; v < kPassVectors; ++v) {
    const int r = r0 + 4 * v;
    Floats best = load(state.best + r), second = load(state.second + r);
    Ints index = load(state.index + r);
    if constexpr (kGroupIndex) {  // the pass's 6 codes folded as their minimum (scan.h)
      const Floats before = best;
      Floats least = acc[0][v];
#pragma GCC unroll 6
      for (int j = 1; j < kPassCodes; ++j) least = min(least, acc[j][v]);
      fold(least, best, second);
      index = select_less(best, before, splat(static_cast<int32_t>(g)), index);
    } else {
#pragma GCC unroll 6
      for (int j = 0; j < kPassCodes; ++j) {
        index = select_less(acc[j][v], best, splat(static_cast<int32_t>(g * kScanCodes + c0 + j)), index);
        fold(acc[j][v], best, second);
      }
    }
    store(state.best + r, best);
    store(state.second + r, second);
    store(state.index + r, index);
  }
}

// code_in_group's last step, from the group's kScanCodes scores for the row: the first code whose
// score is `best` (-1 if none), and as *second the smallest score of the others.
inline int64_t code_of_best(const float* scores, float best, float* second) {
  const float* found = std::find(scores, scores + kScanCodes, best);
  if (found == scores + kScanCodes) return -1;
  const int64_t j = found - scores;
  *second = std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < kScanCodes; ++k) *second = k == j ? *second : std::min(*second, scores[k]);
  return j;
}

// Each row sees a group's codes in index order (both passes of its rows, in code order), so
// ties keep the lower index as in the other bodies.
template <bool kGroupIndex>
void scan(const float* zt, const float* codes, const float* norms, int64_t D, int64_t g0, int64_t g1,
          ScanState& state, LinePrefetch& fetch) {
  for (int64_t g = g0; g < g1; ++g) {
    const float* group = codes + g * D * kScanCodes;
    const float* norm = norms + g * kScanCodes;
    for (int r0 = 0; r0 < kScanRows; r0 += kPassRows) {
      for (int c0 = 0; c0 < kScanCodes; c0 += kPassCodes) pass<kGroupIndex>(zt, group, norm, D, g, c0, r0, state, fetch);
    }
  }
}

}  // namespace

template <>
void ScanBody<ScanIsa::kPortable>::scan_panel(const float* zt, const float* codes, const float* norms, int64_t D,
                                              int64_t g0, int64_t g1, ScanState& state, bool group_index,
                                              LinePrefetch& fetch) {
  if (group_index) {
    scan<true>(zt, codes, norms, D, g0, g1, state, fetch);
  } else {
    scan<false>(zt, codes, norms, D, g0, g1, state, fetch);
  }
}

// Group g's 12 scores for one row with the scan's operations in the scan's order: bit for bit
// the scan's scores.
template <>
int64_t ScanBody<ScanIsa::kPortable>::code_in_group(const float* zt, int64_t row, const float* codes,
                                                    const float* norms, int64_t D, int64_t g, float best,
                                                    float* second) {
  const float* group = codes + g * D * kScanCodes;
  float scores[kScanCodes];
  std::copy(norms + g * kScanCodes, norms + (g + 1) * kScanCodes, scores);
  for (int64_t d = 0; d < D; ++d) {
    const float x = zt[d * kScanRows + row];
    for (int j = 0; j < kScanCodes; ++j) scores[j] = std::fma(x, group[d * kScanCodes + j], scores[j]);
  }
  return code_of_best(scores, best, second);
}

template <>
void ScanBody<ScanIsa::kPortable>::pack_panel(const void* z, Elem type, int64_t ld, int64_t n, const float* centre,
                                              int64_t D, float* zt, float* norms) {
  with_elem(type, [&](auto t) { pack<decltype(t)::value>(z, ld, n, centre, D, zt, norms); });
}

template <>
double ScanBody<ScanIsa::kPortable>::exact_sq_dist(const void* z, const void* e, Elem type, int64_t D) {
  return with_elem(type, [&](auto t) { return exact<decltype(t)::value>(z, e, D); });
}

}  // namespace vqvae_fast
