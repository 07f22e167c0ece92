// The tile unit's rates on this CPU (AMX-BF16), the floors the CPU scan's AMX path is judged
// against in RESULTS.md: TDPBF16PS into 4 accumulators with no loads, and with the 4 tile loads
// per 4 products the scan does (2 code tiles, 2 row tiles), from a working set that fits L1
// (8 steps) or spills to L2 (24 steps, a D=256 panel and group).
//
//   g++ -O2 -o /tmp/amx_peak benchmarks/amx_peak.cpp && /tmp/amx_peak
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr long kRowLength = 768;  // bf16 elements of a packed D=256 row: [hi, lo, hi]

// Seconds for `iters` rounds of 4 products; steps == 0: no loads inside the loop.
__attribute__((target("amx-tile,amx-bf16"))) double run(long iters, long steps, const uint16_t* codes,
                                                        const uint16_t* rows) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, codes, kRowLength * 2);
  _tile_loadd(5, codes + 16 * kRowLength, kRowLength * 2);
  _tile_loadd(6, rows, 64);
  _tile_loadd(7, rows + 512, 64);
  const auto start = std::chrono::steady_clock::now();
  for (long i = 0; i < iters; ++i) {
    if (steps > 0) {
      const long s = i % steps;
      _tile_loadd(4, codes + s * 32, kRowLength * 2);
      _tile_loadd(5, codes + 16 * kRowLength + s * 32, kRowLength * 2);
      _tile_loadd(6, rows + s * 1024, 64);
      _tile_loadd(7, rows + s * 1024 + 512, 64);
    }
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float out[256];
  _tile_stored(0, out, 64);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  _tile_release();
  return seconds + 0.0 * out[0];
}

int main() {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
    std::printf("the kernel refused the AMX tiles (or this CPU has none)\n");
    return 1;
  }
  std::vector<uint16_t> codes(32 * kRowLength, 0x3f80), rows(24 * 1024, 0x3f80);  // bf16 1.0
  const long iters = 2000000;
  const double flops = iters * 4 * 2.0 * 16 * 16 * 32;
  for (long steps : {0L, 8L, 24L}) {
    const double seconds = run(iters, steps, codes.data(), rows.data());
    std::printf("%-34s %.2f TFLOP/s\n",
                steps == 0 ? "products only" : steps == 8 ? "with tile loads, working set in L1" : "with tile loads, working set in L2",
                flops / seconds / 1e12);
  }
}
