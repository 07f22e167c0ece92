// CPU kernels of vqvae_fast::nearest_code, quantize_fwd and quantize_bwd
// (schemas in csrc/ops.cpp).
//
// Forward, for z (N, D) and codebook (K, D):
//   1. Centre everything on the codebook mean mu (per column over the codes without a NaN/Inf
//      entry, rounded to float): a shared offset (say all vectors near +1000) would otherwise be lost to
//      cancellation in ||z||^2 - 2 z.e + ||e||^2. Codes with a NaN/Inf entry are never chosen
//      (unless every code has one) and do not change the centre; nor do exact repeats of an
//      earlier code, which can never win a tie.
//   2. Score every code in float32, whatever the input dtype:
//        s_k = ||e_k - mu||^2 - 2 (z_i - mu).(e_k - mu)     (= ||z_i - e_k||^2 - const_i)
//      Fused path (CPUs with AVX-512F, scan.h): panels of 32 rows against groups of 12 codes
//      in registers, folded at once into each row's best and second-best score; no score is
//      stored. Its AMX form (D >= 16, CPUs with AMX-BF16) computes the same scores from bf16
//      tile products of split operands, with a looser bound; the rows it cannot settle are
//      scanned again in float. GEMM path (other CPUs, and the rows the fused path hands back):
//      one BLAS GEMM per block of rows into a per-thread buffer that stays in cache. Nothing
//      is N x K.
//   3. Re-score exactly, in double from the original values, every code whose float
//      score is within a rigorous error bound of the row's best float score, and keep
//      the smallest exact distance (ties -> lowest index). On the fused path a row whose
//      second-best score is beyond that bound has one candidate, so only its best code is
//      re-scored; near-ties go to the GEMM path, which re-scores all of its candidates.
//      The chosen code therefore has the true minimum distance up to double rounding, and
//      its exact distance is the row's term of the loss.
// Rows whose float scores could overflow, or with NaN/Inf, are scanned exactly over all
// finite codes; if no distance compares smaller than +inf (all NaN/Inf) the index is 0.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "scan.h"

namespace vqvae_fast {
namespace {

using at::Tensor;

// Size of the per-thread float work tile (R rows of scores and of centred z).
constexpr int64_t kTileFloats = 128 * 1024;  // 512 KiB
// Up to this D the fused scan records the group of each row's best code, not the code.
constexpr int64_t kGroupIndexMaxD = 32;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

template <typename T>
inline double to_double(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return static_cast<double>(static_cast<float>(v));
  }
}

template <typename T>
inline T from_double(double v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return static_cast<T>(static_cast<float>(v));
  }
}

// Read-only strided view of a 2-D tensor's elements.
template <typename T>
struct View2D {
  const T* data;
  int64_t s0, s1, cols;
  explicit View2D(const Tensor& t)
      : data(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), cols(t.size(1)) {}
  T operator()(int64_t i, int64_t j) const { return data[i * s0 + j * s1]; }
};

void check_z_codebook(const char* op, const Tensor& z, const Tensor& codebook) {
  TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D (N, D), got shape ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, op, ": codebook must be 2-D (K, D), got shape ", codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), op,
              ": z and codebook must have the same D (size of dim 1), got z ", z.sizes(),
              " and codebook ", codebook.sizes());
  TORCH_CHECK(codebook.size(0) >= 1, op, ": codebook must have at least one code (K >= 1), got shape ",
              codebook.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), op, ": z must have a floating-point dtype, got ",
              dtype_name(z.scalar_type()));
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), op,
              ": z and codebook must have the same dtype, got z ", dtype_name(z.scalar_type()),
              " and codebook ", dtype_name(codebook.scalar_type()));
  const auto t = z.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": unsupported dtype ", dtype_name(t),
              " (supported: torch.float32, torch.float64, torch.float16, torch.bfloat16)");
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(), op,
              ": expected z and codebook on the CPU, got z on ", z.device(), " and codebook on ",
              codebook.device());
}

// min_k (e_norm[k] + dot[k]); only called on rows whose scores are all finite.
inline float min_score(const float* dot, const float* e_norm, int64_t K) {
  constexpr int64_t W = 16;  // independent lanes, so the compiler can vectorise
  float m[W];
  for (int64_t j = 0; j < W; ++j) m[j] = std::numeric_limits<float>::infinity();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    for (int64_t j = 0; j < W; ++j) {
      const float s = e_norm[k + j] + dot[k + j];
      m[j] = s < m[j] ? s : m[j];
    }
  }
  float r = std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < W; ++j) r = m[j] < r ? m[j] : r;
  for (; k < K; ++k) {
    const float s = e_norm[k] + dot[k];
    r = s < r ? s : r;
  }
  return r;
}

// Which forward the CPU runs: the fused AVX-512 scan where the CPU has it (its AMX variant from
// D = kAmxMinD on, where the CPU has AMX-BF16), otherwise one BLAS GEMM per block of rows.
// VQVAE_FAST_CPU_SCAN=gemm | avx512 | amx forces a path where the CPU can run it (tests, comparisons).
constexpr int64_t kAmxMinD = 16;  // below, storing and folding the score tiles costs more than the tiles save

std::string scan_choice() {
  const char* choice = std::getenv("VQVAE_FAST_CPU_SCAN");
  return choice == nullptr ? "" : choice;
}
bool use_fused_scan() { return scan_choice() != "gemm" && scan_available(); }
bool use_amx_scan(int64_t D) {
  const std::string choice = scan_choice();
  if (choice == "gemm" || choice == "avx512" || !amx_scan_available()) return false;
  return choice == "amx" || D >= kAmxMinD;
}

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
  const int64_t K = static_cast<int64_t>(row_hash.size());
  std::vector<int64_t> order(K);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return row_hash[a] != row_hash[b] ? row_hash[a] < row_hash[b] : a < b;
  });
  for (int64_t i = 1; i < K; ++i) {
    const int64_t k = order[i];
    if (!usable[k]) continue;
    for (int64_t j = i - 1; j >= 0 && row_hash[order[j]] == row_hash[k]; --j) {
      const int64_t first = order[j];  // lower index, same hash
      if (!usable[first]) continue;
      bool same = true;
      for (int64_t d = 0; same && d < E.cols; ++d) same = element_bits(E(first, d)) == element_bits(E(k, d));
      if (same) {
        usable[k] = 0;
        break;
      }
    }
  }
}

// The codebook as both forward paths read it, centred on the per-column mean mu of its usable
// codes (a shared offset would otherwise be lost to cancellation in the float scores).
struct PreparedCodebook {
  int64_t K, D;
  std::vector<float> centre;   // D, the per-column mean of the usable codes, rounded to float
  std::vector<float> e_norm;   // K, ||e_k - mu||^2 in float; +inf for a code with a NaN/Inf entry or a duplicate
  Tensor ec_m2;                // K x D float, -2 (e_k - mu) (0 for a non-finite code)
  double M2 = 0.0, M = 0.0;    // max ||e_k - mu||^2 over finite codes and its root; +inf: no float scores

  // The passes over K x D run on all threads (page faults of the workspace included); every
  // value is computed as a serial pass would, so the result does not depend on the threads.
  template <typename scalar_t>
  PreparedCodebook(const Tensor& codebook, const View2D<scalar_t>& E) : K(codebook.size(0)), D(codebook.size(1)) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D));
    std::vector<char> usable(K, 1);
    std::vector<uint64_t> row_hash(K, 0);
    at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        uint64_t h = 0x9E3779B97F4A7C15ull;
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t v = E(k, d);
          if (!std::isfinite(to_double(v))) usable[k] = 0;
          h = mix_hash(h, element_bits(v));
        }
        row_hash[k] = h;
      }
    });
    exclude_duplicates(E, row_hash, usable);
    // Column sums over the usable codes, each column summed in code order by one thread: a code
    // with a NaN/Inf entry takes no part, not even through its finite entries (a [1e30, NaN]
    // code would move the centre by 5e29 and leave every float score to the fallbacks).
    std::vector<double> mu(D, 0.0), count(D, 0.0);
    at::parallel_for(0, D, 1, [&](int64_t d0, int64_t d1) {
      for (int64_t k = 0; k < K; ++k) {
        if (!usable[k]) continue;
        for (int64_t d = d0; d < d1; ++d) {
          mu[d] += to_double(E(k, d));
          count[d] += 1.0;
        }
      }
    });
    centre.resize(D);
    for (int64_t d = 0; d < D; ++d) centre[d] = static_cast<float>(count[d] > 0 ? mu[d] / count[d] : 0.0);

    ec_m2 = at::empty({K, D}, codebook.options().dtype(at::kFloat));
    float* ecp = ec_m2.data_ptr<float>();
    e_norm.resize(K);
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
  // Rows of z the AVX-512 helpers read directly (fused path, every dtype but double): row i
  // starts at element i * z_ld of z_rows.
  const void* z_rows = nullptr;
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
  // the tolerance below. Underflow adds at most (D + 1) * 2^-149 per score.
  double rel_tol, abs_tol;
  static constexpr double kOverflowGuard = 1e38;  // < FLT_MAX / 3: no float score can overflow

  RowSettler(const PreparedCodebook& cb, const Tensor& z, const Tensor& codebook, int64_t* indices,
             scalar_t* quantized, std::vector<double>& row_err)
      : cb(cb), Z(z), E(codebook), indices(indices), quantized(quantized), row_err(row_err),
        rel_tol(4.0 * static_cast<double>(cb.D + 4) * std::ldexp(1.0, -24)),
        abs_tol(static_cast<double>(cb.D + 4) * std::ldexp(1.0, -147)) {}

  // Largest float score error of row i's codes, up to the tolerance factors; not below the
  // overflow guard (or NaN) when the row's float scores cannot be trusted at all.
  double bound(double zc_norm2) const { return cb.M2 + 2.0 * std::sqrt(zc_norm2) * cb.M; }
  bool scores_usable(double bound) const { return bound < kOverflowGuard; }  // false for NaN/Inf
  double threshold(float best_score, double bound) const {
    return static_cast<double>(best_score) + rel_tol * bound + abs_tol;
  }

  const void* row_ptr(int64_t i) const {
    return static_cast<const char*>(z_rows) + i * z_ld * elem_bytes;
  }

  double exact_dist(int64_t i, int64_t k) const {
    if (z_rows != nullptr) {
      return exact_sq_dist(row_ptr(i), static_cast<const char*>(e_rows) + k * e_ld * elem_bytes, z_type, cb.D);
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

  void finish(int64_t i, int64_t best, double best_dist) {
    if (best < 0) {  // every distance NaN or +inf
      best = 0;
      best_dist = exact_dist(i, 0);
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
    for (int64_t k = k0; k < (k1 < 0 ? cb.K : k1); ++k) {
      if (!is_candidate(k)) continue;
      const double dist = exact_dist(i, k);
      if (dist < best_dist) {
        best_dist = dist;
        best = k;
      }
    }
    finish(i, best, best_dist);
  }
  void settle_range(int64_t i, int64_t k0, int64_t k1) {
    settle(i, [](int64_t) { return true; }, k0, k1);
  }
};

// Settles the given rows with one float32 GEMM per block of rows: scores
//   s_k = ||e_k - mu||^2 - 2 (z_i - mu).(e_k - mu)     (= ||z_i - e_k||^2 - const_i)
// into a per-thread cache-sized buffer, then every code within the error bound of the row's
// best score is re-scored exactly. Rows whose scores could overflow, or with NaN/Inf, are
// scanned exactly over all codes.
template <typename scalar_t>
void settle_rows_gemm(RowSettler<scalar_t>& settler, const std::vector<int64_t>& rows) {
  const PreparedCodebook& cb = settler.cb;
  const int64_t n = static_cast<int64_t>(rows.size()), K = cb.K, D = cb.D;
  if (n == 0) return;
  const Tensor ecT = cb.ec_m2.t();  // (D, K)
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t R = std::clamp<int64_t>(kTileFloats / (K + D), 16, 4096);
  R = std::max<int64_t>(1, std::min(R, ceil_div(n, nthreads)));

  at::parallel_for(0, ceil_div(n, R), 1, [&](int64_t b0, int64_t b1) {
    Tensor zc = at::empty({R, D}, cb.ec_m2.options());
    Tensor dots = at::empty({R, K}, cb.ec_m2.options());
    float* zcp = zc.data_ptr<float>();
    const float* dp = dots.const_data_ptr<float>();
    std::vector<double> zc_norm2(R);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * R, r = std::min(R, n - j0);
      for (int64_t t = 0; t < r; ++t) {
        const int64_t i = rows[j0 + t];
        double n2 = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const float c = static_cast<float>(to_double(settler.Z(i, d)) - cb.centre[d]);
          zcp[t * D + d] = c;
          n2 += static_cast<double>(c) * c;
        }
        zc_norm2[t] = n2;
      }
      Tensor out = dots.narrow(0, 0, r);
      at::mm_out(out, zc.narrow(0, 0, r), ecT);  // -2 (z - mu).(e - mu)

      for (int64_t t = 0; t < r; ++t) {
        const int64_t i = rows[j0 + t];
        const float* row = dp + t * K;
        const double bound = settler.bound(zc_norm2[t]);
        if (!settler.scores_usable(bound)) {
          settler.settle(i, [](int64_t) { return true; });
          continue;
        }
        const double threshold = settler.threshold(min_score(row, cb.e_norm.data(), K), bound);
        settler.settle(i, [&](int64_t k) { return static_cast<double>(cb.e_norm[k] + row[k]) <= threshold; });
      }
    }
  });
}

// Nothing seen yet: every score +inf.
void reset(ScanState& state) {
  std::fill(state.best, state.best + kScanRows, std::numeric_limits<float>::infinity());
  std::fill(state.second, state.second + kScanRows, std::numeric_limits<float>::infinity());
  std::fill(state.index, state.index + kScanRows, 0);
}

// The fused path: for panels of kScanRows rows, scan_panel keeps each row's best and second-best
// float score over all codes. A row whose second-best is beyond the error bound of its best has
// exactly one candidate, the best, and only that code's distance is computed exactly; the rare
// others (near-ties, rows that could overflow) are returned for settle_rows_gemm.
template <typename scalar_t>
std::vector<int64_t> settle_rows_fused(RowSettler<scalar_t>& settler, int64_t N,
                                       const std::vector<int64_t>* subset = nullptr) {
  // Row j of the scan is row `subset[j]` of z (all N rows when there is no subset).
  auto row_of = [subset](int64_t j) { return subset != nullptr ? (*subset)[j] : j; };
  const PreparedCodebook& cb = settler.cb;
  const int64_t K = cb.K, D = cb.D;
  const int64_t groups = ceil_div(K, kScanCodes);

  // Codebook in groups of kScanCodes codes, coordinate-major inside a group; padding codes
  // score +inf.
  std::vector<float> codes(groups * D * kScanCodes);
  std::vector<float> norms(groups * kScanCodes, std::numeric_limits<float>::infinity());
  const float* ecp = cb.ec_m2.const_data_ptr<float>();
  at::parallel_for(0, groups, std::max<int64_t>(1, 1024 / std::max<int64_t>(1, D)), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t j = 0; j < kScanCodes; ++j) {
          const int64_t k = g * kScanCodes + j;
          codes[(g * D + d) * kScanCodes + j] = k < K ? ecp[k * D + d] : 0.0f;
        }
      }
    }
  });
  std::copy(cb.e_norm.begin(), cb.e_norm.end(), norms.begin());

  // A thread takes blocks of panels whose rows (~512 KiB) stay in its L2 while the codebook
  // streams past in chunks of ~256 KiB, each chunk scored against every panel of the block.
  const int64_t panels = ceil_div(N, kScanRows);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = std::clamp<int64_t>(std::min(kTileFloats / (kScanRows * D), ceil_div(panels, nthreads)),
                                            1, panels);
  const int64_t chunk = std::max<int64_t>(1, (kTileFloats / 2) / (D * kScanCodes));
  // Small D: the per-code bookkeeping is a large share of the work, so track groups instead;
  // finding the code then costs one group's D x kScanCodes FMAs per row, small next to the scan.
  const bool group_index = D <= kGroupIndexMaxD;
  std::vector<int64_t> unsettled;
  std::mutex unsettled_mutex;
  // Double is centred in double, then rounded; the other dtypes are read by pack_panel.
  constexpr bool wide = std::is_same_v<scalar_t, double>;

  at::parallel_for(0, ceil_div(panels, block), 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> zt(block * D * kScanRows);
    std::vector<float> zc_norm2(block * kScanRows);
    std::vector<ScanState> states(block);
    std::vector<int64_t> mine;
    std::vector<char> gathered(subset != nullptr ? kScanRows * D * settler.elem_bytes : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = b * block, np = std::min(block, panels - p0);
      for (int64_t p = 0; p < np; ++p) {
        float* panel = zt.data() + p * D * kScanRows;
        const int64_t first = (p0 + p) * kScanRows, rows = std::min(kScanRows, N - first);
        if (!wide) {
          const void* z_first = settler.row_ptr(first);
          int64_t ld = settler.z_ld;
          if (subset != nullptr) {  // gather the panel's rows
            for (int64_t t = 0; t < rows; ++t)
              std::memcpy(gathered.data() + t * D * settler.elem_bytes, settler.row_ptr(row_of(first + t)),
                          D * settler.elem_bytes);
            z_first = gathered.data();
            ld = D;
          }
          pack_panel(z_first, settler.z_type, ld, rows, cb.centre.data(), D, panel,
                     zc_norm2.data() + p * kScanRows);
        } else {
          for (int64_t t = 0; t < kScanRows; ++t) {
            float n2 = 0.0f;
            for (int64_t d = 0; d < D; ++d) {
              const float c = t < rows ? static_cast<float>(to_double(settler.Z(row_of(first + t), d)) - cb.centre[d]) : 0.0f;
              panel[d * kScanRows + t] = c;
              n2 += c * c;
            }
            zc_norm2[p * kScanRows + t] = n2;
          }
        }
        reset(states[p]);
      }
      for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
        const int64_t g1 = std::min(groups, g0 + chunk);
        for (int64_t p = 0; p < np; ++p)
          scan_panel(zt.data() + p * D * kScanRows, codes.data(), norms.data(), D, g0, g1, states[p], group_index);
      }
      for (int64_t p = 0; p < np; ++p) {
        const ScanState& s = states[p];
        for (int64_t t = 0; t < kScanRows; ++t) {
          if ((p0 + p) * kScanRows + t >= N) break;
          const int64_t i = row_of((p0 + p) * kScanRows + t);
          const double bound = settler.bound(zc_norm2[p * kScanRows + t]);
          if (!settler.scores_usable(bound) ||
              !(static_cast<double>(s.second[t]) > settler.threshold(s.best[t], bound))) {
            mine.push_back(i);  // near-tie, or no trustworthy float scores
            continue;
          }
          if (!group_index) {
            settler.finish(i, s.index[t], settler.exact_dist(i, s.index[t]));
            continue;
          }
          const int64_t g = s.index[t];
          const int64_t j = code_in_group(zt.data() + p * D * kScanRows, t, codes.data(), norms.data(), D, g,
                                          s.best[t]);
          if (j >= 0 && g * kScanCodes + j < K) {
            settler.finish(i, g * kScanCodes + j, settler.exact_dist(i, g * kScanCodes + j));
          } else {  // not expected: the one candidate is in the group, and is its exactly nearest code
            settler.settle_range(i, g * kScanCodes, std::min(K, (g + 1) * kScanCodes));
          }
        }
      }
    }
    std::lock_guard<std::mutex> lock(unsettled_mutex);
    unsettled.insert(unsettled.end(), mine.begin(), mine.end());
  });
  return unsettled;
}

// The AMX path (large D): like settle_rows_fused, with scores from bf16 tile products of split
// operands (scan.h). Their error per score is at most
//   3.1 * 2^-16 * 2 ||zc|| M                     the dropped parts of the split (xl.yl and the remainders)
// + 1.05 (L + 8) u (M2 + 2 ||zc|| M)           float accumulation of the exact bf16 products, norm, centring
// + (2 L + 8) 2^-126 (1 + ||zc|| + 2M)          denormal inputs and results flushed to zero by the tiles
// (L = amx_row_length(D) >= 3D, the products summed); two codes and a factor 2 of safety give the tolerance below. A row
// whose second-best is beyond it has one candidate, re-scored exactly; the others go to the GEMM path.
template <typename scalar_t>
std::vector<int64_t> settle_rows_amx(RowSettler<scalar_t>& settler, int64_t N) {
  const PreparedCodebook& cb = settler.cb;
  const int64_t K = cb.K, D = cb.D;
  const int64_t groups = ceil_div(K, kAmxCodes), length = amx_row_length(D);
  const int64_t group_elems = length * kAmxCodes;
  // Tile rows are 64 bytes: buffers on 64-byte boundaries keep every tile row in one cache line.
  const Tensor codes_buffer = at::empty({groups * group_elems}, at::TensorOptions().dtype(at::kBFloat16));
  uint16_t* codes = reinterpret_cast<uint16_t*>(codes_buffer.data_ptr());
  std::vector<float> norms(groups * kAmxCodes, std::numeric_limits<float>::infinity());
  const float* ecp = cb.ec_m2.const_data_ptr<float>();
  at::parallel_for(0, groups, std::max<int64_t>(1, 256 / std::max<int64_t>(1, D)), [&](int64_t g0, int64_t g1) {
    amx_pack_codes(ecp, K, D, g0, g1, codes);
  });
  std::copy(cb.e_norm.begin(), cb.e_norm.end(), norms.begin());
  const double u = std::ldexp(1.0, -24);
  const double rel_tol = 4.0 * (3.1 * std::ldexp(1.0, -16) + 1.05 * static_cast<double>(length + 8) * u);
  const double abs_scale = 4.0 * static_cast<double>(2 * length + 8) * std::ldexp(1.0, -126);

  // Blocks of panels (~512 KiB of packed rows) stay in L2 while chunks of ~256 KiB of codes stream past.
  const int64_t panels = ceil_div(N, kAmxRows);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t panel_elems = kAmxRows * length;
  const int64_t block = std::clamp<int64_t>(std::min<int64_t>((256 * 1024) / panel_elems, ceil_div(panels, nthreads)),
                                            1, panels);
  const int64_t chunk = std::max<int64_t>(1, (128 * 1024) / group_elems);
  std::vector<int64_t> unsettled;
  std::mutex unsettled_mutex;
  at::parallel_for(0, ceil_div(panels, block), 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> centred(kAmxRows * D);
    const Tensor a_buffer = at::empty({block * panel_elems}, at::TensorOptions().dtype(at::kBFloat16));
    uint16_t* a = reinterpret_cast<uint16_t*>(a_buffer.data_ptr());
    std::vector<float> zc_norm2(block * kAmxRows);
    std::vector<ScanState> states(block);
    std::vector<int64_t> mine;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = b * block, np = std::min(block, panels - p0);
      for (int64_t p = 0; p < np; ++p) {
        const int64_t first = (p0 + p) * kAmxRows, rows = std::min(kAmxRows, N - first);
        centre_panel_rows(settler.row_ptr(first), settler.z_type, settler.z_ld, rows, cb.centre.data(), D,
                          centred.data(), zc_norm2.data() + p * kAmxRows);
        amx_pack_panel(centred.data(), D, a + p * panel_elems);
        reset(states[p]);
      }
      for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
        const int64_t g1 = std::min(groups, g0 + chunk);
        for (int64_t p = 0; p < np; ++p)
          amx_scan_panel(a + p * panel_elems, codes, norms.data(), D, g0, g1, states[p]);
      }
      for (int64_t p = 0; p < np; ++p) {
        const ScanState& result = states[p];
        for (int64_t t = 0; t < kAmxRows; ++t) {
          const int64_t i = (p0 + p) * kAmxRows + t;
          if (i >= N) break;
          const double zc2 = zc_norm2[p * kAmxRows + t];
          const double bound = settler.bound(zc2);
          const double threshold = static_cast<double>(result.best[t]) + rel_tol * bound +
                                   abs_scale * (1.0 + std::sqrt(zc2) + 2.0 * cb.M);
          if (!settler.scores_usable(bound) || !(static_cast<double>(result.second[t]) > threshold)) {
            mine.push_back(i);  // near-tie, or no trustworthy scores
            continue;
          }
          settler.finish(i, result.index[t], settler.exact_dist(i, result.index[t]));
        }
      }
    }
    std::lock_guard<std::mutex> lock(unsettled_mutex);
    unsettled.insert(unsettled.end(), mine.begin(), mine.end());
  });
  return unsettled;
}

// Fills indices (N,) and, unless quantized is null, quantized (N, D, contiguous); returns
// sum_i ||z_i - e_{idx_i}||^2, summed in row order (independent of the thread count).
template <typename scalar_t>
double nearest_code_kernel(const Tensor& z, const Tensor& codebook, int64_t* indices,
                           scalar_t* quantized) {
  const int64_t N = z.size(0);
  const PreparedCodebook cb(codebook, View2D<scalar_t>(codebook));
  std::vector<double> row_err(N);
  RowSettler<scalar_t> settler(cb, z, codebook, indices, quantized, row_err);
  std::vector<int64_t> rows;
  Tensor z_rows, e_rows;  // outlive both paths: settler.z_rows and e_rows point into them
  if (use_fused_scan() && cb.K <= std::numeric_limits<int32_t>::max()) {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      z_rows = z.stride(1) == 1 ? z : z.contiguous();  // rows of contiguous elements
      settler.z_rows = z_rows.const_data_ptr();
      settler.z_ld = z_rows.stride(0);
      e_rows = codebook.stride(1) == 1 ? codebook : codebook.contiguous();
      settler.e_rows = e_rows.const_data_ptr();
      settler.e_ld = e_rows.stride(0);
      settler.z_type = std::is_same_v<scalar_t, float>           ? Elem::kFloat
                       : std::is_same_v<scalar_t, at::BFloat16> ? Elem::kBFloat16
                                                                : Elem::kHalf;
    }
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (use_amx_scan(cb.D)) {
        // The AMX scan's looser bound hands back more rows (a few percent): the float scan
        // settles most of them before the GEMM path sees the rest.
        const std::vector<int64_t> near_ties = settle_rows_amx(settler, N);
        if (!near_ties.empty()) rows = settle_rows_fused(settler, static_cast<int64_t>(near_ties.size()), &near_ties);
      } else {
        rows = settle_rows_fused(settler, N);
      }
    } else {
      rows = settle_rows_fused(settler, N);
    }
  } else {
    rows.resize(N);
    std::iota(rows.begin(), rows.end(), 0);
  }
  settle_rows_gemm(settler, rows);

  double sum = 0.0;
  for (int64_t i = 0; i < N; ++i) sum += row_err[i];
  return sum;
}

Tensor nearest_code_cpu(const Tensor& z, const Tensor& codebook) {
  check_z_codebook("vqvae_fast::nearest_code", z, codebook);
  const int64_t N = z.size(0), D = z.size(1);
  Tensor indices = at::zeros({N}, z.options().dtype(at::kLong));  // D == 0: the lowest index
  if (N > 0 && D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "nearest_code_cpu", [&] {
      nearest_code_kernel<scalar_t>(z, codebook, indices.data_ptr<int64_t>(), nullptr);
    });
  }
  return indices;
}

std::tuple<Tensor, Tensor, Tensor> quantize_fwd_cpu(const Tensor& z, const Tensor& codebook, double beta,
                                                    bool /*rotation: the backward's*/) {
  check_z_codebook("vqvae_fast::quantize_fwd", z, codebook);
  const int64_t N = z.size(0), D = z.size(1);

  Tensor indices = at::zeros({N}, z.options().dtype(at::kLong));
  Tensor quantized = at::empty({N, D}, codebook.options());
  double loss = std::numeric_limits<double>::quiet_NaN();  // mean of nothing when N * D == 0
  if (N > 0 && D > 0) {
    double sum = 0.0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "quantize_fwd_cpu", [&] {
      sum = nearest_code_kernel<scalar_t>(z, codebook, indices.data_ptr<int64_t>(),
                                          quantized.data_ptr<scalar_t>());
    });
    loss = (1.0 + beta) * sum / (static_cast<double>(N) * static_cast<double>(D));
  }
  // Via double: a loss beyond the dtype's range becomes inf instead of raising.
  Tensor loss_t = at::scalar_tensor(loss, z.options().dtype(at::kDouble)).to(z.scalar_type());
  return {quantized, indices, loss_t};
}

// The rotation trick (Fifty et al., 2024) applied to one row's incoming gradient g, in place:
// g <- lam * (g - 2 w (w . g) + 2 u (q . g)) with u = z / |z|, q = e / |e|, lam = |e| / |z|,
// w = (u + q) / |u + q|. Guards as in vqvae_fast/reference.py: g is left as it is (straight
// through) when lam is outside [1e-6, 1e6], and w = 0 (a reflection) when |u + q| <= 1e-6.
constexpr double kRotationMaxScale = 1e6;
constexpr double kRotationMinSum = 1e-6;

void rotate_gradient(double* g, const double* z, const double* e, int64_t D) {
  double zz = 0.0, ee = 0.0, gz = 0.0, ge = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    zz += z[d] * z[d];
    ee += e[d] * e[d];
    gz += g[d] * z[d];
    ge += g[d] * e[d];
  }
  const double nz = std::sqrt(zz), ne = std::sqrt(ee);
  if (!(nz > 0.0) || nz * kRotationMaxScale < ne || ne * kRotationMaxScale < nz) return;
  double ss = 0.0;  // |u + q|^2, summed directly: 2 + 2 u.q cancels when z points away from e
  for (int64_t d = 0; d < D; ++d) {
    const double s = z[d] / nz + e[d] / ne;
    ss += s * s;
  }
  const double ns = std::sqrt(ss);
  const bool reflect = !(ns > kRotationMinSum);
  const double wg = reflect ? 0.0 : (gz / nz + ge / ne) / ns;  // w . g
  const double qg = ge / ne, lam = ne / nz;
  for (int64_t d = 0; d < D; ++d) {
    const double u = z[d] / nz;
    const double w = reflect ? 0.0 : (u + e[d] / ne) / ns;
    g[d] = lam * (g[d] - 2.0 * w * wg + 2.0 * u * qg);
  }
}

// Either output may be null: that gradient is not computed.
template <typename scalar_t>
void quantize_bwd_kernel(const Tensor& grad_quantized, double g, const Tensor& z,
                         const Tensor& codebook, const int64_t* idx, double beta, bool rotation,
                         scalar_t* grad_z, scalar_t* grad_codebook) {
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  const View2D<scalar_t> Z(z), E(codebook);
  const double scale = 2.0 * g / (static_cast<double>(N) * static_cast<double>(D));
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < K, "vqvae_fast::quantize_bwd: indices[", i, "] = ", idx[i],
                " is out of range for a codebook of ", K, " codes");
  }

  // grad_z = (grad_quantized, or its rotation) + scale * beta * (z - codebook[idx])
  const double scale_z = scale * beta;
  if (grad_z != nullptr) {
    const View2D<scalar_t> GQ(grad_quantized);
    at::parallel_for(0, N, std::max<int64_t>(1, 16384 / D), [&](int64_t i0, int64_t i1) {
      std::vector<double> g(D), zi(D), e(D);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = idx[i];
        for (int64_t d = 0; d < D; ++d) {
          g[d] = to_double(GQ(i, d));
          zi[d] = to_double(Z(i, d));
          e[d] = to_double(E(k, d));
        }
        if (rotation) rotate_gradient(g.data(), zi.data(), e.data(), D);
        for (int64_t d = 0; d < D; ++d) grad_z[i * D + d] = from_double<scalar_t>(g[d] + scale_z * (zi[d] - e[d]));
      }
    });
  }
  if (grad_codebook == nullptr) return;

  // grad_codebook[k] = scale * sum_{i: idx_i = k} (codebook[k] - z_i). Each thread owns a
  // range of codes and scans all rows in order: the result does not depend on threading.
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  at::parallel_for(0, K, ceil_div(K, nthreads), [&](int64_t k0, int64_t k1) {
    std::vector<double> acc((k1 - k0) * D, 0.0);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t k = idx[i];
      if (k < k0 || k >= k1) continue;
      double* a = acc.data() + (k - k0) * D;
      for (int64_t d = 0; d < D; ++d) a[d] += to_double(E(k, d)) - to_double(Z(i, d));
    }
    for (int64_t k = k0; k < k1; ++k)
      for (int64_t d = 0; d < D; ++d)
        grad_codebook[k * D + d] = from_double<scalar_t>(scale * acc[(k - k0) * D + d]);
  });
}

std::tuple<Tensor, Tensor> quantize_bwd_cpu(const Tensor& grad_quantized, const Tensor& grad_loss,
                                            const Tensor& z, const Tensor& codebook,
                                            const Tensor& indices, double beta, bool need_grad_z,
                                            bool need_grad_codebook, bool rotation) {
  const char* op = "vqvae_fast::quantize_bwd";
  check_z_codebook(op, z, codebook);
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == N, op, ": indices must have shape (N,) = (", N,
              ",), got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be torch.int64, got ",
              dtype_name(indices.scalar_type()));
  TORCH_CHECK(grad_quantized.sizes() == z.sizes(), op, ": grad_quantized must have z's shape ",
              z.sizes(), ", got ", grad_quantized.sizes());
  TORCH_CHECK(at::isFloatingType(grad_quantized.scalar_type()), op,
              ": grad_quantized must have a floating-point dtype, got ",
              dtype_name(grad_quantized.scalar_type()));
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must hold one value, got shape ",
              grad_loss.sizes());
  TORCH_CHECK(indices.device().is_cpu() && grad_quantized.device().is_cpu() && grad_loss.device().is_cpu(),
              op, ": expected all tensors on the CPU, got indices on ", indices.device(),
              ", grad_quantized on ", grad_quantized.device(), " and grad_loss on ", grad_loss.device());

  Tensor grad_z = need_grad_z ? at::empty({N, D}, z.options()) : at::empty({0}, z.options());
  Tensor grad_codebook = need_grad_codebook ? at::zeros({K, D}, codebook.options())
                                            : at::empty({0}, codebook.options());
  if (N == 0 || D == 0 || !(need_grad_z || need_grad_codebook)) return {grad_z, grad_codebook};
  const double g = grad_loss.item<double>();
  const Tensor gq = grad_quantized.scalar_type() == z.scalar_type()
                        ? grad_quantized
                        : grad_quantized.to(z.scalar_type());
  const Tensor idx = indices.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "quantize_bwd_cpu", [&] {
    quantize_bwd_kernel<scalar_t>(gq, g, z, codebook, idx.const_data_ptr<int64_t>(), beta, rotation,
                                  need_grad_z ? grad_z.data_ptr<scalar_t>() : nullptr,
                                  need_grad_codebook ? grad_codebook.data_ptr<scalar_t>() : nullptr);
  });
  return {grad_z, grad_codebook};
}

std::string cpu_forward_path(int64_t D) {
  return !use_fused_scan() ? "gemm" : use_amx_scan(D) ? "fused-amx" : "fused-avx512";
}

}  // namespace

// Which forward the CPU kernels take on this machine for rows of D elements (float32, bf16, fp16;
// float64 never takes the AMX one): "fused-amx", "fused-avx512" or "gemm".
TORCH_LIBRARY_FRAGMENT(vqvae_fast, m) { m.def("cpu_forward_path(int D=256) -> str", &cpu_forward_path); }

TORCH_LIBRARY_IMPL(vqvae_fast, CPU, m) {
  m.impl("nearest_code", &nearest_code_cpu);
  m.impl("quantize_fwd", &quantize_fwd_cpu);
  m.impl("quantize_bwd", &quantize_bwd_cpu);
}

}  // namespace vqvae_fast
