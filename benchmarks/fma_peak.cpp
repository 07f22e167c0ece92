// One core's multiply-add peaks, the floors the CPU scans are judged against in RESULTS.md on
// CPUs without AMX: independent chains (no loads) of 512-bit FMAs, 256-bit FMAs and 512-bit
// VDPBF16PS (two bf16 products a lane), one second each, reported in GFLOP/s (an FMA lane is 2
// flops, a VDPBF16PS lane 4); and 512-bit FMAs with a min every 8, the D = 8 scan's mix. Pin it
// to one core: taskset -c 0.
//
//   g++ -O2 -o /tmp/fma_peak benchmarks/fma_peak.cpp && taskset -c 0 /tmp/fma_peak
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

constexpr int kChains = 12;  // enough independent accumulators to cover the FMA latency twice over
constexpr long kIters = 20'000'000;

template <typename Step>
double gflops(Step step, double flops_per_iter) {
  double best = 0;
  for (int round = 0; round < 3; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    const float sink = step(kIters);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (sink == 12345.f) std::puts("");  // keeps the result live
    best = std::max(best, flops_per_iter * kIters / s / 1e9);
  }
  return best;
}

__attribute__((target("avx512f"))) float fma512(long iters) {
  __m512 acc[kChains];
  const __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(i);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(a, acc[i], b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

__attribute__((target("avx2,fma"))) float fma256(long iters) {
  __m256 acc[kChains];
  const __m256 a = _mm256_set1_ps(1.0000001f), b = _mm256_set1_ps(0.9999999f);
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(i);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(a, acc[i], b);
  }
  __m256 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_ps(s, acc[i]);
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  return out[0];
}

__attribute__((target("avx512f,avx512bf16"))) float dpbf16(long iters) {
  __m512 acc[kChains];
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f80);  // 1.0
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(i);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

// 24 chains of FMAs with a min every 8 (the D = 8 scan's mix: each score is 8 FMAs and one min
// into the running best): whether the fold's mins take FMA slots (if not, the rate is the FMAs').
__attribute__((target("avx512f"))) float fma512_with_min(long iters) {
  __m512 acc[24], least[3];
  const __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(0.9999999f);
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(i);
  for (int i = 0; i < 3; ++i) least[i] = _mm512_set1_ps(1e30f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(a, acc[i], b);
#pragma GCC unroll 3
    for (int i = 0; i < 3; ++i) least[i] = _mm512_min_ps(least[i], acc[8 * i]);
  }
  __m512 s = _mm512_add_ps(_mm512_add_ps(least[0], least[1]), least[2]);
  for (int i = 0; i < 24; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

int main() {
  if (__builtin_cpu_supports("avx512f")) std::printf("AVX-512 FMA  %6.1f GFLOP/s\n", gflops(fma512, kChains * 32.0));
  if (__builtin_cpu_supports("avx512f")) {
    std::printf("AVX-512 FMA, a min every 8  %6.1f GFLOP/s (FMA flops)\n", gflops(fma512_with_min, 24 * 32.0));
  }
  if (__builtin_cpu_supports("avx2")) std::printf("AVX2 FMA     %6.1f GFLOP/s\n", gflops(fma256, kChains * 16.0));
  if (__builtin_cpu_supports("avx512bf16")) std::printf("VDPBF16PS    %6.1f GFLOP/s\n", gflops(dpbf16, kChains * 64.0));
}
