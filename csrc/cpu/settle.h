// The forward's second half, shared by its files: the codebook as the scans read it (centred,
// usable codes marked), and RowSettler, which turns a row's float scores into its code and exact
// distance. The stages that settle rows (settle.cpp): the fused scans (float: AVX-512 or AVX2; AMX) and the GEMM path.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "common.h"
#include "scan.h"

namespace vqvae_fast {

// Size of the per-thread float work tile (R rows of scores and of centred z) of the GEMM path.
// Not measured: 512 KiB, a cache-sized buffer, from the first CPU kernel (commit 0fe4019); the GEMM
// path now settles only the rows the scans hand back, or runs on CPUs without AVX-512.
constexpr int64_t kTileFloats = 128 * 1024;  // 512 KiB

template <typename T>
inline uint64_t element_bits(T v) {
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

inline uint64_t mix_hash(uint64_t h, uint64_t bits) {  // splitmix64's finaliser over h ^ bits
  h ^= bits + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
  h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
  return h ^ (h >> 31);
}

// A code whose bits equal those of an earlier code can never be chosen (exact ties go to the
// lowest index): it is left out like a non-finite code, so that the rows near it are not
// near-ties sent to the GEMM path (restarts from a batch with repeats make many such codes).
template <typename scalar_t>
void exclude_duplicates(const View2D<scalar_t>& E, const std::vector<uint64_t>& row_hash,
                        std::vector<char>& usable) {
  // An open-addressing table of the usable codes seen so far, in index order, so the first of
  // equal codes stays: O(K) (the sort of the codes by hash it replaces was half of a call's fixed
  // cost at K = 8192, D = 8: 0.33 of 0.73 ms on an AMD EPYC, one thread).
  const int64_t K = static_cast<int64_t>(row_hash.size());
  int64_t size = 16;
  while (size < 2 * K) size *= 2;
  std::vector<int64_t> table(size, -1);
  const uint64_t mask = static_cast<uint64_t>(size - 1);
  for (int64_t k = 0; k < K; ++k) {
    if (!usable[k]) continue;
    uint64_t slot = row_hash[k] & mask;
    for (; table[slot] >= 0; slot = (slot + 1) & mask) {
      const int64_t first = table[slot];  // lower index
      if (row_hash[first] != row_hash[k]) continue;
      bool same = true;
      for (int64_t d = 0; same && d < E.cols; ++d) same = element_bits(E(first, d)) == element_bits(E(k, d));
      if (same) break;
    }
    if (table[slot] >= 0) {
      usable[k] = 0;  // the loop stopped at an equal code
    } else {
      table[slot] = k;
    }
  }
}

// The codebook as both forward paths read it, centred on the per-column mean mu of its usable
// codes (a shared offset would otherwise be lost to cancellation in the float scores).
struct PreparedCodebook {
  int64_t K, D;
  std::vector<float> centre;   // D, what the codes and rows are centred on: `mean`, or zero
  std::vector<float> e_norm;   // K, ||e_k - mu||^2 in float; +inf for a code with a NaN/Inf entry or a duplicate
  std::vector<double> e_root;  // K, ||e_k - mu|| (+inf where e_norm is)
  at::Tensor ec_m2;               // K x D float, -2 (e_k - mu) (0 for a non-finite code)
  double M2 = 0.0, M = 0.0;    // max ||e_k - mu||^2 over finite codes and its root; +inf: no float scores
  std::vector<float> mean;     // D, the per-column mean of the usable codes, rounded to float (the centre unless uncentred)
  std::vector<char> usable;    // K, finite and not a duplicate
  bool bf16_subnormal = false;  // a bf16 code has a subnormal entry (the bf16 scan would read it as zero)

  // The passes over K x D run on all threads (page faults of the workspace included); every
  // value is computed as a serial pass would, so the result does not depend on the threads.
  // centred = false: around zero (what the bf16 scan reads; recentre() when it cannot run).
  template <typename scalar_t>
  PreparedCodebook(const at::Tensor& codebook, const View2D<scalar_t>& E, bool centred = true)
      : K(codebook.size(0)), D(codebook.size(1)) {
    const int64_t grain = grain_for(D);
    usable.assign(K, 1);
    std::vector<char> subnormal(K, 0);
    std::vector<uint64_t> row_hash(K, 0);
    at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        // One multiply per element (mix_hash per element was most of this pass), mixed once
        // at the end: the table in exclude_duplicates indexes by the low bits.
        uint64_t h = 0x9E3779B97F4A7C15ull;
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t v = E(k, d);
          if (!std::isfinite(to_double(v))) usable[k] = 0;
          if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
            subnormal[k] |= (element_bits(v) & 0x7F80u) == 0 && (element_bits(v) & 0x7Fu) != 0;
          }
          h = (h ^ element_bits(v)) * 0xD6E8FEB86659FD93ull;
        }
        row_hash[k] = mix_hash(h, static_cast<uint64_t>(D));
      }
    });
    exclude_duplicates(E, row_hash, usable);
    bf16_subnormal = std::any_of(subnormal.begin(), subnormal.end(), [](char c) { return c != 0; });
    // Column sums over the usable codes, each column summed in code order by one thread: a code
    // with a NaN/Inf entry takes no part, not even through its finite entries (a [1e30, NaN]
    // code would move the centre by 5e29 and leave every float score to the fallbacks).
    std::vector<double> mu(D, 0.0), count(D, 0.0);
    at::parallel_for(0, D, grain_for(K), [&](int64_t d0, int64_t d1) {
      for (int64_t k = 0; k < K; ++k) {
        if (!usable[k]) continue;
        for (int64_t d = d0; d < d1; ++d) {
          mu[d] += to_double(E(k, d));
          count[d] += 1.0;
        }
      }
    });
    mean.resize(D);
    for (int64_t d = 0; d < D; ++d) mean[d] = static_cast<float>(count[d] > 0 ? mu[d] / count[d] : 0.0);
    centre = centred ? mean : std::vector<float>(D, 0.0f);
    ec_m2 = at::empty({K, D}, codebook.options().dtype(at::kFloat));
    centre_codes(E);
  }

  // Whether the mean is small next to the codes (||mu||^2 <= M2 / 16, M2 of the codes around
  // the current centre): then uncentred scores have nearly the error bound of centred ones.
  bool mean_is_small() const {
    double m2 = 0.0;
    for (float m : mean) m2 += static_cast<double>(m) * m;
    return m2 <= M2 / 16.0;
  }

  // The codebook centred on its mean (after an uncentred construction).
  template <typename scalar_t>
  void recentre(const View2D<scalar_t>& E) {
    centre = mean;
    centre_codes(E);
  }

 private:
  // ec_m2, e_norm, e_root, M2 and M of the codes around `centre`.
  template <typename scalar_t>
  void centre_codes(const View2D<scalar_t>& E) {
    const int64_t grain = grain_for(D);
    float* ecp = ec_m2.data_ptr<float>();
    e_norm.resize(K);
    e_root.resize(K);
    std::vector<double> norm2(K, 0.0);
    at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        double n2 = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const float c = usable[k] ? static_cast<float>(to_double(E(k, d)) - centre[d]) : 0.0f;
          ecp[k * D + d] = -2.0f * c;  // exact
          n2 += static_cast<double>(c) * c;
        }
        norm2[k] = n2;
        e_norm[k] = usable[k] ? static_cast<float>(n2) : std::numeric_limits<float>::infinity();
        e_root[k] = usable[k] ? std::sqrt(n2) : std::numeric_limits<double>::infinity();
      }
    });
    double max_norm2 = 0.0;
    bool norms_finite = true;
    for (int64_t k = 0; k < K; ++k) {
      if (!usable[k]) continue;
      norms_finite = norms_finite && std::isfinite(norm2[k]) && std::isfinite(e_norm[k]);
      max_norm2 = std::max(max_norm2, norm2[k]);
    }
    M2 = norms_finite ? max_norm2 : std::numeric_limits<double>::infinity();
    M = std::sqrt(M2);
  }
};

// Settles rows: picks each row's code and its exact distance, given its float scores.
template <typename scalar_t>
struct RowSettler {
  const PreparedCodebook& cb;
  View2D<scalar_t> Z, E;
  // Rows of z the scan helpers read directly (fused path, every dtype but double): row i
  // starts at element i * z_ld of z_rows; `isa` names the helpers' instruction set.
  const void* z_rows = nullptr;
  ScanIsa isa = ScanIsa::kAvx512;
  Elem z_type = Elem::kFloat;
  int64_t z_ld = 0;
  const void* e_rows = nullptr;  // the codebook's rows, the same way (element e_ld * k starts code k)
  int64_t e_ld = 0;
  static constexpr int64_t elem_bytes = sizeof(scalar_t);
  int64_t* indices;
  scalar_t* quantized;  // null: no gather
  std::vector<double>& row_err;
  // Float score error (one code) <= ~(D + 2) * u * (M2 + 2 ||zc|| M) from the dot product (any
  // order, FMA or not), the norms and the centring; two codes and a factor 2 of safety give
  // the tolerance below. Underflow adds at most (2 D + 8) 2^-126 (1 + ||zc|| + 2M) per score,
  // also with denormals flushed to zero (torch.set_flush_denormal: each operation, input or result, can lose 2^-126).
  double rel_tol, abs_scale;
  static constexpr double kOverflowGuard = 1e38;  // < FLT_MAX / 3: no float score can overflow

  RowSettler(const PreparedCodebook& cb, const at::Tensor& z, const at::Tensor& codebook, int64_t* indices,
             scalar_t* quantized, std::vector<double>& row_err)
      : cb(cb), Z(z), E(codebook), indices(indices), quantized(quantized), row_err(row_err),
        rel_tol(4.0 * static_cast<double>(cb.D + 4) * std::ldexp(1.0, -24)),
        abs_scale(4.0 * static_cast<double>(2 * cb.D + 8) * std::ldexp(1.0, -126)) {}

  // Largest float score error of row i's codes, up to the tolerance factors; not below the
  // overflow guard (or NaN) when the row's float scores cannot be trusted at all.
  double bound(double zc_norm2) const { return cb.M2 + 2.0 * std::sqrt(zc_norm2) * cb.M; }
  bool scores_usable(double bound) const { return bound < kOverflowGuard; }  // false for NaN/Inf
  double underflow_slack(double zc_norm2) const { return abs_scale * (1.0 + std::sqrt(zc_norm2) + 2.0 * cb.M); }
  double threshold(float best_score, double bound, double zc_norm2) const {
    return static_cast<double>(best_score) + rel_tol * bound + underflow_slack(zc_norm2);
  }


  const void* row_ptr(int64_t i) const {
    return static_cast<const char*>(z_rows) + i * z_ld * elem_bytes;
  }

  double exact_dist(int64_t i, int64_t k) const {
    if (z_rows != nullptr) {
      return exact_sq_dist(isa, row_ptr(i), static_cast<const char*>(e_rows) + k * e_ld * elem_bytes, z_type, cb.D);
    }
    double s[4] = {0.0, 0.0, 0.0, 0.0};  // four chains: not one add latency per coordinate
    int64_t d = 0;
    for (; d + 4 <= cb.D; d += 4) {
      for (int j = 0; j < 4; ++j) {
        const double t = to_double(Z(i, d + j)) - to_double(E(k, d + j));
        s[j] += t * t;
      }
    }
    for (; d < cb.D; ++d) {
      const double t = to_double(Z(i, d)) - to_double(E(k, d));
      s[0] += t * t;
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
  }

  // Row i's nearest code among the codes of [k0, k1) that `is_candidate` admits, from float64
  // distances of z and the codes scaled by 2^exponent (a power of two, so exact): for distances
  // beyond float64's range (exponent -600: each is still above 2^-176 there) and below it (+600:
  // rows and codes of magnitude 2^-300 and less, whose squares lose bits to underflow). -1 if
  // none compares smaller than +inf.
  template <typename Pred>
  int64_t nearest_at_scale(int64_t i, int exponent, Pred is_candidate, int64_t k0, int64_t k1) const {
    int64_t best = -1;
    double best_dist = std::numeric_limits<double>::infinity();
    for (int64_t k = k0; k < k1; ++k) {
      if (!is_candidate(k)) continue;
      double s = 0.0;
      for (int64_t d = 0; d < cb.D; ++d) {
        const double t = std::ldexp(to_double(Z(i, d)), exponent) - std::ldexp(to_double(E(k, d)), exponent);
        s += t * t;
      }
      if (s < best_dist) {
        best_dist = s;
        best = k;
      }
    }
    return best;
  }
  // Float64 distances below this may have lost bits to underflow (a term under 2^-1022).
  static constexpr double kUnderflowDistance = 0x1p-900;

  void finish(int64_t i, int64_t best, double best_dist) {
    if (best < 0) {  // every distance NaN or +inf
      const auto all = [](int64_t) { return true; };
      best = std::is_same_v<scalar_t, double> ? std::max<int64_t>(0, nearest_at_scale(i, -600, all, 0, cb.K)) : 0;
      best_dist = exact_dist(i, best);
    }
    indices[i] = best;
    row_err[i] = best_dist;
    if (quantized != nullptr) {
      scalar_t* q = quantized + i * cb.D;
      for (int64_t d = 0; d < cb.D; ++d) q[d] = E(best, d);
    }
  }

  // The smallest exact distance among the codes of [k0, k1) that `is_candidate` admits (ties ->
  // lowest index).
  template <typename Pred>
  void settle(int64_t i, Pred is_candidate, int64_t k0 = 0, int64_t k1 = -1) {
    int64_t best = -1;
    double best_dist = std::numeric_limits<double>::infinity();
    if (k1 < 0) k1 = cb.K;
    for (int64_t k = k0; k < k1; ++k) {
      if (!is_candidate(k)) continue;
      const double dist = exact_dist(i, k);
      if (dist < best_dist) {
        best_dist = dist;
        best = k;
      }
    }
    if constexpr (std::is_same_v<scalar_t, double>) {
      if (best >= 0 && best_dist < kUnderflowDistance) {  // tiny rows and codes: compare them at 2^600
        best = nearest_at_scale(i, 600, is_candidate, k0, k1);
        best_dist = exact_dist(i, best);
      }
    }
    finish(i, best, best_dist);
  }
  void settle_range(int64_t i, int64_t k0, int64_t k1) {
    settle(i, [](int64_t) { return true; }, k0, k1);
  }
};

// The stages (settle.cpp, instantiated for float, double, BFloat16 and Half). Each scan settles
// the rows whose best code it can vouch for and returns the others (near-ties, rows whose float
// scores cannot be trusted), in no particular order.
//   settle_rows_float   the float scan (scan_panel, settler.isa) over rows [first, first + N), or over subset[0, N) if given
//   settle_rows_amx     the bf16 tile scan (amx_scan_panel; not double) over rows [0, N)
//   settle_rows_bf16    the bf16 scan of bf16 rows (bf16_scan_panel) over rows [0, N)
//   settle_rows_bf16_rounded  the same scan of centred rows rounded to bf16, over rows [0, N) (see below)
//   settle_rows_gemm    settles every row it is given: one float GEMM per block of rows
template <typename scalar_t>
std::vector<int64_t> settle_rows_float(RowSettler<scalar_t>& settler, int64_t N,
                                        const std::vector<int64_t>* subset = nullptr, int64_t first = 0);
template <typename scalar_t>
std::vector<int64_t> settle_rows_amx(RowSettler<scalar_t>& settler, int64_t N);
std::vector<int64_t> settle_rows_bf16(RowSettler<at::BFloat16>& settler, int64_t N);
// Not double. Rows [0, probe) first: if more than max_share of them come back, it stops there
// (*stopped_at = probe: rows [probe, N) are the caller's), else it scans the rest (*stopped_at = N).
template <typename scalar_t>
std::vector<int64_t> settle_rows_bf16_rounded(RowSettler<scalar_t>& settler, int64_t N, int64_t probe,
                                              double max_share, int64_t* stopped_at);
template <typename scalar_t>
void settle_rows_gemm(RowSettler<scalar_t>& settler, const std::vector<int64_t>& rows);

}  // namespace vqvae_fast
