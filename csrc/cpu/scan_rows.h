// The row helpers of the portable scan body in plain C++: an element as a float, packing a panel
// (scan.h, pack_panel) and the exact distance (exact_sq_dist). The x86 bodies have vectorised
// ones of their own.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "scan.h"

namespace vqvae_fast {
namespace {

// Element i of z as a float (16-bit floats widen exactly).
template <Elem T>
inline float element(const void* z, int64_t i) {
  if constexpr (T == Elem::kFloat) {
    return static_cast<const float*>(z)[i];
  } else if constexpr (T == Elem::kBFloat16) {
    return static_cast<float>(static_cast<const c10::BFloat16*>(z)[i]);
  } else {
    return static_cast<float>(static_cast<const c10::Half*>(z)[i]);
  }
}

// pack_panel: the norm of each row is one FMA chain over its coordinates in order, as the
// AVX-512 body forms it.
template <Elem T>
void pack(const void* z, int64_t ld, int64_t n, const float* centre, int64_t D, float* zt,
                                 float* norms) {
  std::fill(zt, zt + D * kScanRows, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    float norm = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float c = element<T>(z, t * ld + d) - centre[d];
      zt[d * kScanRows + t] = c;
      norm = std::fma(c, c, norm);
    }
    norms[t] = norm;
  }
}

template <Elem T>
double exact(const void* z, const void* e, int64_t D) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};  // four chains: not one add latency per coordinate
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    for (int j = 0; j < 4; ++j) {
      const double t = static_cast<double>(element<T>(z, d + j)) - static_cast<double>(element<T>(e, d + j));
      s[j] = std::fma(t, t, s[j]);
    }
  }
  for (; d < D; ++d) {
    const double t = static_cast<double>(element<T>(z, d)) - static_cast<double>(element<T>(e, d));
    s[0] = std::fma(t, t, s[0]);
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

}  // namespace
}  // namespace vqvae_fast
