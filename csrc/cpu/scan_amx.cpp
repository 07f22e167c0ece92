// AMX body of the CPU scan for large D (see scan.h): bf16 tile products of split operands,
// folded per lane into each row's best / second-best score. Compiled through function
// attributes and called only after amx_scan_available(), so the library loads everywhere.

#include "scan.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

namespace vqvae_fast {

namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask the kernel for an XSAVE feature
constexpr long kXfeatureXtiledata = 18;     // the AMX tile data

bool cpu_has_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;
  return tile && bf16 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

// fp32 -> bf16, round to nearest even (finite values; the inputs here are finite).
inline uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
// x = hi + lo + r with |r| <= 2^-16 |x| (each part rounded to nearest; x - hi is exact in float).
inline void split(float x, uint16_t& hi, uint16_t& lo) {
  hi = to_bf16(x);
  lo = to_bf16(x - from_bf16(hi));
}

// Tiles: 0-3 the 2 x 2 score tiles (16 rows x 16 codes, fp32), 4-5 two row tiles of the panel,
// 6-7 two code tiles; every tile is 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

__attribute__((target("amx-tile"))) void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

}  // namespace

bool amx_scan_available() {
  static const bool available = cpu_has_amx_bf16() &&
                                syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return available;
}

int64_t amx_row_length(int64_t D) { return 3 * ((D + 31) / 32) * 32; }

void amx_pack_codes(const float* ec, int64_t K, int64_t D, int64_t g0, int64_t g1, uint16_t* packed) {
  const int64_t dp = (D + 31) / 32 * 32, steps = amx_row_length(D) / 32;
  std::vector<uint16_t> row(3 * dp);
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t n = 0; n < kAmxCodes; ++n) {
      const int64_t k = g * kAmxCodes + n;
      std::fill(row.begin(), row.end(), uint16_t{0});
      for (int64_t d = 0; k < K && d < D; ++d) {  // [hi, lo, hi] against the panel's [hi, hi, lo]
        split(ec[k * D + d], row[d], row[dp + d]);
        row[2 * dp + d] = row[d];
      }
      // VNNI order: tile (g, s, half), row p holds coordinates 2p and 2p + 1 of its 16 codes.
      uint16_t* group = packed + g * steps * 2 * 512;
      const int64_t half = n / 16, col = n % 16;
      for (int64_t s = 0; s < steps; ++s) {
        uint16_t* tile = group + (s * 2 + half) * 512;
        for (int64_t p = 0; p < 16; ++p) {
          tile[p * 32 + col * 2] = row[s * 32 + 2 * p];
          tile[p * 32 + col * 2 + 1] = row[s * 32 + 2 * p + 1];
        }
      }
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void amx_pack_panel(const float* rows, int64_t D, uint16_t* a) {
  const int64_t dp = (D + 31) / 32 * 32, length = 3 * dp;
  std::fill(a, a + kAmxRows * length, uint16_t{0});
  for (int64_t r = 0; r < kAmxRows; ++r) {
    uint16_t* row = a + r * length;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t width = std::min<int64_t>(16, D - d0);
      const __mmask16 cols = width == 16 ? 0xFFFF : static_cast<__mmask16>((1u << width) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(cols, rows + r * D + d0);
      // Round to nearest even (denormals flushed: covered by the bound's 2^-126 term).
      const __m256i hi = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
      const __m512 hi_f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      const __m256i lo = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_sub_ps(x, hi_f)));
      _mm256_mask_storeu_epi16(row + d0, cols, hi);
      _mm256_mask_storeu_epi16(row + dp + d0, cols, hi);
      _mm256_mask_storeu_epi16(row + 2 * dp + d0, cols, lo);
    }
  }
}

void amx_reset(AmxState& state) {
  std::fill(&state.best[0][0], &state.best[0][0] + kAmxRows * 16, std::numeric_limits<float>::infinity());
  std::fill(&state.second[0][0], &state.second[0][0] + kAmxRows * 16, std::numeric_limits<float>::infinity());
  std::fill(&state.index[0][0], &state.index[0][0] + kAmxRows * 16, 0);
}

__attribute__((target("amx-tile,amx-bf16,avx512f"))) void amx_scan_panel(const uint16_t* a, const uint16_t* codes,
                                                                         const float* norms, int64_t D, int64_t g0,
                                                                         int64_t g1, AmxState& state) {
  const int64_t length = amx_row_length(D), steps = length / 32;
  const int64_t a_stride = length * 2;  // bytes per panel row
  alignas(64) float scores[4][16][16];
  configure_tiles();
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* group = codes + g * steps * 2 * 512;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < steps; ++s) {
      _tile_loadd(4, a + s * 32, a_stride);
      _tile_loadd(5, a + 16 * length + s * 32, a_stride);
      _tile_loadd(6, group + (s * 2) * 512, 64);
      _tile_loadd(7, group + (s * 2 + 1) * 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, scores[0], 64);
    _tile_stored(1, scores[1], 64);
    _tile_stored(2, scores[2], 64);
    _tile_stored(3, scores[3], 64);
    // Per row and lane: score = dot + norm; second takes max(best, s) before best moves, so it
    // is the smallest score of every code of that lane but the lane's best.
    const __m512 norm0 = _mm512_loadu_ps(norms + g * kAmxCodes), norm1 = _mm512_loadu_ps(norms + g * kAmxCodes + 16);
    const __m512i code0 = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(g * kAmxCodes)));
    const __m512i code1 = _mm512_add_epi32(code0, _mm512_set1_epi32(16));
    for (int64_t r = 0; r < kAmxRows; ++r) {
      const int rt = static_cast<int>(r / 16), rr = static_cast<int>(r % 16);
      __m512 best = _mm512_load_ps(state.best[r]), second = _mm512_load_ps(state.second[r]);
      __m512i index = _mm512_load_si512(state.index[r]);
      const __m512 s0 = _mm512_add_ps(_mm512_load_ps(scores[rt * 2][rr]), norm0);
      const __m512 s1 = _mm512_add_ps(_mm512_load_ps(scores[rt * 2 + 1][rr]), norm1);
      second = _mm512_min_ps(second, _mm512_max_ps(best, s0));
      index = _mm512_mask_mov_epi32(index, _mm512_cmp_ps_mask(s0, best, _CMP_LT_OQ), code0);
      best = _mm512_min_ps(best, s0);
      second = _mm512_min_ps(second, _mm512_max_ps(best, s1));
      index = _mm512_mask_mov_epi32(index, _mm512_cmp_ps_mask(s1, best, _CMP_LT_OQ), code1);
      best = _mm512_min_ps(best, s1);
      _mm512_store_ps(state.best[r], best);
      _mm512_store_ps(state.second[r], second);
      _mm512_store_si512(state.index[r], index);
    }
  }
  _tile_release();
}

__attribute__((target("avx512f"))) void amx_finish(const AmxState& state, ScanState& out) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < kAmxRows; ++r) {
    const __m512 best = _mm512_load_ps(state.best[r]);
    const float m = _mm512_reduce_min_ps(best);
    const __mmask16 at_min = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
    out.best[r] = m;
    if (at_min == 0 || __builtin_popcount(at_min) > 1) {  // two lanes tie, or no number at all
      out.second[r] = m;
      out.index[r] = 0;
      continue;
    }
    const int l = __builtin_ctz(at_min);
    out.index[r] = state.index[r][l];
    const float other_best = _mm512_reduce_min_ps(_mm512_mask_mov_ps(best, at_min, _mm512_set1_ps(inf)));
    out.second[r] = std::min(other_best, _mm512_reduce_min_ps(_mm512_load_ps(state.second[r])));
  }
}

}  // namespace vqvae_fast
