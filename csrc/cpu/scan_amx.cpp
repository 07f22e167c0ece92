// AMX body of the CPU scan (see scan.h): bf16 tile products of split operands, each code's
// scores for a panel folded into the rows' best / second-best score as the AVX-512 scan folds
// them. Compiled through function attributes and called only after amx_scan_available(), so
// the library loads everywhere; x86-64 only (scan.cpp has the other CPUs' stubs).

#if defined(__x86_64__)

#include "scan.h"
#include "scan_fold.h"

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

// Tiles: 0-3 the 2 x 2 score tiles (16 codes x 16 rows, fp32), 4-5 two code tiles (16 codes x
// 32 bf16), 6-7 two panel tiles (16 element pairs x 16 rows); every tile is 16 rows of 64 bytes.
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

int64_t amx_row_length(int64_t D) { return (3 * D + 31) / 32 * 32; }

void amx_pack_codes(const float* ec, int64_t K, int64_t D, int64_t g0, int64_t g1, uint16_t* packed) {
  const int64_t length = amx_row_length(D);
  for (int64_t k = g0 * kAmxCodes; k < g1 * kAmxCodes; ++k) {
    uint16_t* row = packed + k * length;
    std::fill(row, row + length, uint16_t{0});
    for (int64_t d = 0; k < K && d < D; ++d) {  // [hi, lo, hi] against the panel's [hi, hi, lo]
      split(ec[k * D + d], row[d], row[D + d]);
      row[2 * D + d] = row[d];
    }
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void amx_pack_panel(const float* rows, int64_t D,
                                                                                  uint16_t* b) {
  const int64_t length = amx_row_length(D);
  thread_local std::vector<uint16_t> split_rows;  // the panel's rows as [hi, hi, lo], zero past 3D
  split_rows.assign(kAmxRows * length, uint16_t{0});
  for (int64_t r = 0; r < kAmxRows; ++r) {
    uint16_t* row = split_rows.data() + r * length;
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const int64_t width = std::min<int64_t>(16, D - d0);
      const __mmask16 cols = width == 16 ? 0xFFFF : static_cast<__mmask16>((1u << width) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(cols, rows + r * D + d0);
      // Round to nearest even (denormals flushed: covered by the bound's 2^-126 term).
      const __m256i hi = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
      const __m512 hi_f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      const __m256i lo = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_sub_ps(x, hi_f)));
      _mm256_mask_storeu_epi16(row + d0, cols, hi);
      _mm256_mask_storeu_epi16(row + D + d0, cols, hi);
      _mm256_mask_storeu_epi16(row + 2 * D + d0, cols, lo);
    }
  }
  // The tile unit's pair order: tile (s, half) row p holds elements 2p and 2p + 1 of step s of
  // its 16 rows, i.e. the 16 x 16 transpose of the rows' 32-bit pairs.
  for (int64_t s = 0; s < length / 32; ++s) {
    for (int64_t half = 0; half < 2; ++half) {
      transpose_words16(reinterpret_cast<const uint32_t*>(split_rows.data() + half * 16 * length + s * 32),
                        length / 2, reinterpret_cast<uint32_t*>(b + (s * 2 + half) * 512));
    }
  }
}

namespace {

// Folds a group's stored score tiles ([code tile * 2 + row tile][code][row]); a code's scores
// for the panel's 32 rows are two vectors.
__attribute__((target("avx512f"))) inline void fold_group(const float (*tiles)[16][16], const float* norms,
                                                        int32_t first_code, PanelFold& f) {
  for (int c = 0; c < kAmxCodes; ++c) {
    const __m512 norm = _mm512_set1_ps(norms[c]);
    const __m512 s0 = _mm512_add_ps(_mm512_load_ps(tiles[(c / 16) * 2][c % 16]), norm);
    const __m512 s1 = _mm512_add_ps(_mm512_load_ps(tiles[(c / 16) * 2 + 1][c % 16]), norm);
    fold_code(f, s0, s1, first_code + c);
  }
}

}  // namespace

__attribute__((target("amx-tile,amx-bf16,avx512f"))) void amx_scan_panel(const uint16_t* b, const uint16_t* codes,
                                                                         const float* norms, int64_t D, int64_t g0,
                                                                         int64_t g1, ScanState& state) {
  const int64_t length = amx_row_length(D), steps = length / 32;
  const int64_t code_stride = length * 2;  // bytes per packed code
  // [group parity][code tile * 2 + row tile][code][row]: group g's tiles are stored while group
  // g - 1's scores are folded, so the tile unit and the vector units work at the same time.
  alignas(64) float scores[2][4][16][16];
  configure_tiles();
  PanelFold f = load_fold(state);
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* group = codes + g * kAmxCodes * length;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t s = 0; s < steps; ++s) {
      _tile_loadd(4, group + s * 32, code_stride);
      _tile_loadd(5, group + 16 * length + s * 32, code_stride);
      _tile_loadd(6, b + (s * 2) * 512, 64);
      _tile_loadd(7, b + (s * 2 + 1) * 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    if (g > g0) fold_group(scores[(g - 1) & 1], norms + (g - 1) * kAmxCodes, static_cast<int32_t>((g - 1) * kAmxCodes), f);
    _tile_stored(0, scores[g & 1][0], 64);
    _tile_stored(1, scores[g & 1][1], 64);
    _tile_stored(2, scores[g & 1][2], 64);
    _tile_stored(3, scores[g & 1][3], 64);
  }
  if (g1 > g0) fold_group(scores[(g1 - 1) & 1], norms + (g1 - 1) * kAmxCodes, static_cast<int32_t>((g1 - 1) * kAmxCodes), f);
  _tile_release();
  store_fold(f, state);
}

}  // namespace vqvae_fast

#endif  // __x86_64__
