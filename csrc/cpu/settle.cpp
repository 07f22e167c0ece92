// The stages of the CPU forward that settle rows (settle.h): the fused scans, float and AMX,
// one driver over both, and the GEMM path that settles whatever they hand back.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "scan.h"
#include "settle.h"

namespace vqvae_fast {
namespace {

// Up to this D the fused scan records the group of each row's best code, not the code (2
// operations per group instead of per code). Not measured: commit 5461611 gives the reason (at
// small D the per-code bookkeeping is a large share of the work) but no timing of the threshold.
constexpr int64_t kGroupIndexMaxD = 32;
// The scans' working sets, per thread: a block of packed panels stays in L2 while the packed
// codebook streams past in chunks, each chunk scored against every panel of the block.
// Not measured: sized so block + chunk fit a core's L2 (2 MiB per core on the Sapphire Rapids-class
// Xeon of benchmarks/RESULTS.md); from commit 60dbde2, no sweep of either size.
constexpr int64_t kBlockBytes = 512 * 1024;
constexpr int64_t kChunkBytes = 256 * 1024;
// Blocks per thread, at least, where the rows allow: shared out dynamically (settle_rows_scan),
// so a thread slowed by another process on its core holds up one small block, not its half.
// Not tuned: 1, 4, 8 and 16 timed alike (N = 8192, K = 4096, D = 64, 2 threads, one core busy
// with another process: medians 16-21 ms, 1 thread 17.5 ms; RESULTS.md "Threads on a busy machine").
constexpr int64_t kBlocksPerThread = 4;

// Row i's candidates from its float scores e_norm[k] + dot[k] with per-code bounds: code k's
// float score lies within 0.5 rel_tol (||e_k - mu||^2 + 2 ||zc|| ||e_k - mu||) of its true value
// (RowSettler's bound for one code, with the code's own length: rows near many codes much
// shorter than the longest, as in later residual stages, are then not near-ties with all of
// them), so code k may be the nearest only if its score's lower bound is within the smallest
// upper bound (plus the row's underflow allowance `slack`). Only called on rows whose scores are
// all finite. The two passes over the K codes are written to vectorise (they were twice the
// GEMM's time where most rows come here: a degenerate late residual stage); then the candidates
// are re-scored exactly.
template <typename scalar_t>
void settle_with_code_bounds(RowSettler<scalar_t>& settler, int64_t i, const float* dot, double zc_norm2,
                             double slack) {
  const PreparedCodebook& cb = settler.cb;
  const int64_t K = cb.K;
  const float* e_norm = cb.e_norm.data();
  const double* e_root = cb.e_root.data();
  // Code k's bound: half_tol * (e_norm[k] + twice_zc * e_root[k]).
  const double half_tol = 0.5 * settler.rel_tol, twice_zc = 2.0 * std::sqrt(zc_norm2);
  double upper = std::numeric_limits<double>::infinity();
#pragma omp simd reduction(min : upper)
  for (int64_t k = 0; k < K; ++k) {
    const double score = static_cast<double>(e_norm[k] + dot[k]);  // as a scan rounds it
    upper = std::min(upper, score + half_tol * (static_cast<double>(e_norm[k]) + twice_zc * e_root[k]));
  }
  const double limit = upper + slack;
  thread_local std::vector<unsigned char> candidate;
  candidate.resize(K);
  unsigned char* is_candidate = candidate.data();
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    const double score = static_cast<double>(e_norm[k] + dot[k]);
    const double bound = half_tol * (static_cast<double>(e_norm[k]) + twice_zc * e_root[k]);
    is_candidate[k] = (e_root[k] < std::numeric_limits<double>::infinity()) & (score - bound <= limit);
  }
  settler.settle(i, [&](int64_t k) { return is_candidate[k] != 0; });
}

// Nothing seen yet: every score +inf.
void reset(ScanState& state) {
  std::fill(state.best, state.best + kScanRows, std::numeric_limits<float>::infinity());
  std::fill(state.second, state.second + kScanRows, std::numeric_limits<float>::infinity());
  std::fill(state.third, state.third + kScanRows, std::numeric_limits<float>::infinity());
  std::fill(state.index, state.index + kScanRows, 0);
  std::fill(state.index2, state.index2 + kScanRows, 0);
}

// Row j of a scan is row (*subset)[j] of z, or row first + j when there is no subset.
struct RowMap {
  const std::vector<int64_t>* subset;
  int64_t first = 0;
  int64_t operator()(int64_t j) const { return subset != nullptr ? (*subset)[j] : first + j; }
};

// The cache lines of scan rows [first, first + rows) of z where they are one run of memory (no
// subset, rows D elements apart); none otherwise.
template <typename scalar_t>
LinePrefetch contiguous_rows(const RowSettler<scalar_t>& settler, RowMap row_of, int64_t first, int64_t rows) {
  if (settler.z_rows == nullptr || row_of.subset != nullptr || settler.z_ld != settler.cb.D || rows <= 0) return {};
  const char* begin = static_cast<const char*>(settler.row_ptr(row_of(first)));
  const char* end = static_cast<const char*>(settler.row_ptr(row_of(first) + rows));
  return {begin - reinterpret_cast<uintptr_t>(begin) % 64, end};
}

// Settles row t of a scanned panel (row i of z) if its best code is its one candidate (no other
// score within `threshold`); false for a near-tie, left to the caller. With a group index the
// state holds the best group, and find(g, best, &second) gives the code in it (-1 if none) and
// the group's own second, as code_in_group does.
template <typename scalar_t, typename FindInGroup>
bool settle_scanned_row(bool group_index, int64_t t, const ScanState& s, int64_t i, RowSettler<scalar_t>& settler,
                        double threshold, FindInGroup find) {
  if (!group_index) {
    if (!(static_cast<double>(s.second[t]) > threshold)) return false;
    settler.finish(i, s.index[t], settler.exact_dist(i, s.index[t]));
    return true;
  }
  // s.second is the best of the other groups; the group's own second comes with its code.
  const int64_t g = s.index[t];
  float second = s.second[t];
  const int64_t j = find(g, s.best[t], &second);
  const int64_t code = g * kScanCodes + j;
  // j < 0 is not expected (the best score is the group's); the GEMM path would settle the row.
  if (j < 0 || code >= settler.cb.K || !(static_cast<double>(std::min(second, s.second[t])) > threshold)) {
    return false;
  }
  settler.finish(i, code, settler.exact_dist(i, code));
  return true;
}

// The float scan (scan.h, scan_panel, with settler.isa's instructions), as settle_rows_scan
// drives it. The codebook goes in groups of kScanCodes codes, coordinate-major inside a group;
// padding codes score +inf. Its tolerance is RowSettler's (the float score error).
template <typename scalar_t>
struct FloatScan {
  static const char* event(const RowSettler<scalar_t>& settler) {  // profiler event of a call
    switch (settler.isa) {
      case ScanIsa::kAvx512:
        return "vqvae_fast::cpu_scan_avx512";
      case ScanIsa::kAvx2:
        return "vqvae_fast::cpu_scan_avx2";
      case ScanIsa::kPortable:
        break;
    }
    return "vqvae_fast::cpu_scan_portable";
  }
  const RowSettler<scalar_t>& settler;
  int64_t D, groups;
  std::vector<float> codes, norms;
  // Small D: the per-code bookkeeping is a large share of the work, so track groups instead;
  // finding the code then costs one group's D x kScanCodes FMAs per row, small next to the scan.
  bool group_index;
  int64_t panel_bytes, group_bytes;

  explicit FloatScan(const RowSettler<scalar_t>& settler)
      : settler(settler), D(settler.cb.D), groups(ceil_div(settler.cb.K, kScanCodes)),
        codes(groups * D * kScanCodes), norms(groups * kScanCodes, std::numeric_limits<float>::infinity()),
        group_index(D <= kGroupIndexMaxD), panel_bytes(kScanRows * D * 4), group_bytes(D * kScanCodes * 4) {
    const PreparedCodebook& cb = settler.cb;
    const int64_t K = cb.K;
    const float* ecp = cb.ec_m2.const_data_ptr<float>();
    at::parallel_for(0, groups, grain_for(D * kScanCodes), [&](int64_t g0, int64_t g1) {
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
  }

  double threshold(float best, double bound, double zc_norm2) const { return settler.threshold(best, bound, zc_norm2); }

  // One thread's block of packed panels (D x kScanRows floats each).
  struct Panels {
    const FloatScan& scan;
    RowMap row_of;
    std::vector<float> zt;
    std::vector<char> gathered;  // a panel's rows, gathered from a subset

    Panels(const FloatScan& scan, int64_t block, RowMap row_of)
        : scan(scan), row_of(row_of), zt(block * scan.D * kScanRows),
          gathered(row_of.subset != nullptr ? kScanRows * scan.D * RowSettler<scalar_t>::elem_bytes : 0) {}
    float* panel(int64_t p) { return zt.data() + p * scan.D * kScanRows; }

    // Packs scan rows [first, first + rows) as panel p; their squared norms go to zc_norm2.
    void pack(int64_t p, int64_t first, int64_t rows, float* zc_norm2) {
      const RowSettler<scalar_t>& settler = scan.settler;
      const int64_t D = scan.D;
      const std::vector<float>& centre = settler.cb.centre;
      if constexpr (!std::is_same_v<scalar_t, double>) {  // read by pack_panel
        const int64_t elem_bytes = RowSettler<scalar_t>::elem_bytes;
        const void* z_first = settler.row_ptr(row_of(first));
        int64_t ld = settler.z_ld;
        if (row_of.subset != nullptr) {  // gather the panel's rows
          for (int64_t t = 0; t < rows; ++t)
            std::memcpy(gathered.data() + t * D * elem_bytes, settler.row_ptr(row_of(first + t)), D * elem_bytes);
          z_first = gathered.data();
          ld = D;
        }
        pack_panel(settler.isa, z_first, settler.z_type, ld, rows, centre.data(), D, panel(p), zc_norm2);
      } else {  // double: centred in double, then rounded
        float* out = panel(p);
        for (int64_t t = 0; t < kScanRows; ++t) {
          float n2 = 0.0f;
          for (int64_t d = 0; d < D; ++d) {
            const float c = t < rows ? static_cast<float>(to_double(settler.Z(row_of(first + t), d)) - centre[d]) : 0.0f;
            out[d * kScanRows + t] = c;
            n2 += c * c;
          }
          zc_norm2[t] = n2;
        }
      }
    }

    void scan_groups(int64_t p, int64_t g0, int64_t g1, ScanState& state, LinePrefetch& fetch) {
      scan_panel(scan.settler.isa, panel(p), scan.codes.data(), scan.norms.data(), scan.D, g0, g1, state,
                 scan.group_index, fetch);
    }

    bool settle(int64_t p, int64_t t, const ScanState& s, int64_t i, RowSettler<scalar_t>& settler,
                double threshold) {
      return settle_scanned_row(scan.group_index, t, s, i, settler, threshold, [&](int64_t g, float best, float* second) {
        return code_in_group(settler.isa, panel(p), t, scan.codes.data(), scan.norms.data(), scan.D, g, best, second);
      });
    }
  };
};

// The bf16 scan (scan.h, bf16_scan_panel: bf16 rows and codes, uncentred), as settle_rows_scan
// drives it; its scores are float sums of exact products, so RowSettler's float bound holds.
template <typename scalar_t>
struct Bf16Scan {
  static const char* event(const RowSettler<scalar_t>&) { return "vqvae_fast::cpu_scan_avx512_bf16"; }
  const RowSettler<scalar_t>& settler;
  int64_t D, P, groups;
  std::vector<uint32_t> codes;
  std::vector<float> norms;
  bool group_index;
  int64_t panel_bytes, group_bytes;

  explicit Bf16Scan(const RowSettler<scalar_t>& settler)
      : settler(settler), D(settler.cb.D), P(bf16_pairs(D)), groups(ceil_div(settler.cb.K, kScanCodes)),
        codes(groups * P * kScanCodes), norms(groups * kScanCodes, std::numeric_limits<float>::infinity()),
        group_index(D <= kGroupIndexMaxD), panel_bytes(kScanRows * P * 4), group_bytes(P * kScanCodes * 4) {
    const PreparedCodebook& cb = settler.cb;
    const float* ecp = cb.ec_m2.const_data_ptr<float>();
    at::parallel_for(0, groups, grain_for(D * kScanCodes), [&](int64_t g0, int64_t g1) {
      bf16_pack_codes(ecp, cb.K, D, g0, g1, codes.data());
    });
    std::copy(cb.e_norm.begin(), cb.e_norm.end(), norms.begin());
  }

  double threshold(float best, double bound, double zc_norm2) const { return settler.threshold(best, bound, zc_norm2); }

  // One thread's block of packed panels (P x kScanRows words each); rows [0, N) only.
  struct Panels {
    const Bf16Scan& scan;
    std::vector<uint32_t> zt;

    RowMap row_of;

    Panels(const Bf16Scan& scan, int64_t block, RowMap row_of)
        : scan(scan), zt(block * scan.P * kScanRows), row_of(row_of) {
      TORCH_INTERNAL_ASSERT(row_of.subset == nullptr, "the bf16 scan reads a run of rows");
    }
    uint32_t* panel(int64_t p) { return zt.data() + p * scan.P * kScanRows; }

    void pack(int64_t p, int64_t first, int64_t rows, float* zc_norm2) {
      const RowSettler<scalar_t>& settler = scan.settler;
      bf16_pack_panel(static_cast<const uint16_t*>(settler.row_ptr(row_of(first))), settler.z_ld, rows, scan.D, panel(p),
                      zc_norm2);
    }

    void scan_groups(int64_t p, int64_t g0, int64_t g1, ScanState& state, LinePrefetch& fetch) {
      bf16_scan_panel(panel(p), scan.codes.data(), scan.norms.data(), scan.P, g0, g1, state, scan.group_index, fetch);
    }

    bool settle(int64_t p, int64_t t, const ScanState& s, int64_t i, RowSettler<scalar_t>& settler,
                double threshold) {
      return settle_scanned_row(scan.group_index, t, s, i, settler, threshold, [&](int64_t g, float best, float* second) {
        return bf16_code_in_group(panel(p), t, scan.codes.data(), scan.norms.data(), scan.P, g, best, second);
      });
    }
  };
};

// An upper bound of sqrt(x) for x a sum of n squares computed in float by FMAs and a lane
// reduction: each square and addition is within (n + 4) u of the true sum (u = 2^-24), and each
// term loses at most 2^-126 to underflow (also with denormals flushed to zero).
double float_norm_upper(float norm2, int64_t n) {
  const double slack = static_cast<double>(n + 4);
  return std::sqrt(static_cast<double>(norm2) + slack * 0x1p-126) * (1.0 + slack * 0x1p-23);
}

// The rounded bf16 scan (scan.h, bf16_round_rows + bf16_scan_panel with top3), as
// settle_rows_scan drives it: the centred float rows x and codes c = -2 (e - mu) rounded to bf16
// (x^, c^), scores e_norm + x^.c^ summed in float. Against the float scan's score, the rounding
// moves a score by |x^.c^ - x.c| <= ||x|| ||c - c^|| + ||x - x^|| ||c^|| (Cauchy-Schwarz, with
// the norms of what each rounding dropped, about 2^-9 of a value's size); the float accumulation,
// norms and centring keep RowSettler's bound (exact products, as in the bf16 scan). That rounding
// term, for two codes, widens each row's threshold: several times the float one, so where a
// row's second-best lies inside it the scan's third-best decides whether the best two codes are
// the only candidates (then both are re-scored exactly); else the row goes to the float scan.
// VDPBF16PS does twice the products of an FMA: measured in benchmarks/RESULTS.md.
template <typename scalar_t>
struct RoundedBf16Scan {
  static const char* event(const RowSettler<scalar_t>&) { return "vqvae_fast::cpu_scan_avx512_bf16_rounded"; }
  const RowSettler<scalar_t>& settler;
  int64_t D, P, groups;
  std::vector<uint32_t> codes;
  std::vector<float> norms;
  double code_dropped = 0.0, code_rounded = 0.0;  // the largest ||c - c^|| and ||c^|| (upper bounds)
  int64_t panel_bytes, group_bytes;

  explicit RoundedBf16Scan(const RowSettler<scalar_t>& settler)
      : settler(settler), D(settler.cb.D), P(bf16_pairs(D)), groups(ceil_div(settler.cb.K, kScanCodes)),
        codes(groups * P * kScanCodes), norms(groups * kScanCodes, std::numeric_limits<float>::infinity()),
        panel_bytes(kScanRows * P * 4), group_bytes(P * kScanCodes * 4) {
    const PreparedCodebook& cb = settler.cb;
    const int64_t K = cb.K;
    std::vector<uint16_t> rounded(K * D);
    std::vector<float> dropped2(K), rounded2(K);
    const float* ecp = cb.ec_m2.const_data_ptr<float>();  // zero rows for the codes never chosen
    at::parallel_for(0, K, grain_for(D), [&](int64_t k0, int64_t k1) {
      bf16_round_rows(ecp + k0 * D, D, k1 - k0, D, rounded.data() + k0 * D, dropped2.data() + k0, rounded2.data() + k0);
    });
    for (int64_t k = 0; k < K; ++k) {
      code_dropped = std::max(code_dropped, float_norm_upper(dropped2[k], D));
      code_rounded = std::max(code_rounded, float_norm_upper(rounded2[k], D));
    }
    at::parallel_for(0, groups, grain_for(D * kScanCodes), [&](int64_t g0, int64_t g1) {
      bf16_pack_code_rows(rounded.data(), K, D, g0, g1, codes.data());
    });
    std::copy(cb.e_norm.begin(), cb.e_norm.end(), norms.begin());
  }

  double threshold(float best, double bound, double zc_norm2) const { return settler.threshold(best, bound, zc_norm2); }

  // One thread's block of packed panels; a run of rows (no subset).
  struct Panels {
    const RoundedBf16Scan& scan;
    std::vector<float> centred, dropped2, unused_norms;
    std::vector<uint16_t> rounded;
    std::vector<uint32_t> zt;
    std::vector<double> widen;  // per scan row, what the rounding adds to its threshold
    RowMap row_of;

    Panels(const RoundedBf16Scan& scan, int64_t block, RowMap row_of)
        : scan(scan), centred(kScanRows * scan.D), dropped2(kScanRows), unused_norms(kScanRows),
          rounded(kScanRows * scan.D), zt(block * scan.P * kScanRows), widen(block * kScanRows), row_of(row_of) {
      TORCH_INTERNAL_ASSERT(row_of.subset == nullptr, "the rounded bf16 scan reads a run of rows");
    }
    uint32_t* panel(int64_t p) { return zt.data() + p * scan.P * kScanRows; }

    void pack(int64_t p, int64_t first, int64_t rows, float* zc_norm2) {
      const RowSettler<scalar_t>& settler = scan.settler;
      const int64_t D = scan.D;
      centre_panel_rows(settler.row_ptr(row_of(first)), settler.z_type, settler.z_ld, rows, settler.cb.centre.data(), D,
                        centred.data(), zc_norm2);
      bf16_round_rows(centred.data(), D, kScanRows, D, rounded.data(), dropped2.data(), nullptr);
      bf16_pack_panel(rounded.data(), D, kScanRows, D, panel(p), unused_norms.data());  // the bound uses zc_norm2
      for (int64_t t = 0; t < rows; ++t) {  // two codes' scores moved by the rounding
        widen[p * kScanRows + t] = 2.0 * (float_norm_upper(zc_norm2[t], D) * scan.code_dropped +
                                          float_norm_upper(dropped2[t], D) * scan.code_rounded);
      }
    }

    void scan_groups(int64_t p, int64_t g0, int64_t g1, ScanState& state, LinePrefetch& fetch) {
      bf16_scan_panel(panel(p), scan.codes.data(), scan.norms.data(), scan.P, g0, g1, state, false, fetch, true);
    }

    // One candidate (second-best beyond the threshold) or two (third-best beyond it): settled
    // from exact distances, ties to the lower index; more go back (nan thresholds included).
    bool settle(int64_t p, int64_t t, const ScanState& s, int64_t i, RowSettler<scalar_t>& settler,
                double threshold) {
      const double limit = threshold + widen[p * kScanRows + t];
      if (static_cast<double>(s.second[t]) > limit) {
        settler.finish(i, s.index[t], settler.exact_dist(i, s.index[t]));
        return true;
      }
      if (!(static_cast<double>(s.third[t]) > limit)) return false;
      const int64_t a = std::min(s.index[t], s.index2[t]), b = std::max(s.index[t], s.index2[t]);
      const double da = settler.exact_dist(i, a), db = settler.exact_dist(i, b);
      if (db < da) {
        settler.finish(i, b, db);
      } else {
        settler.finish(i, a, da);
      }
      return true;
    }
  };
};

// The AMX scan (scan.h, amx_scan_panel), as settle_rows_scan drives it: scores from bf16 tile
// products of split operands. Their error per score is at most
//   3.1 * 2^-16 * 2 ||zc|| M                     the dropped parts of the split (xl.yl and the remainders)
// + 1.05 (L + 8) u (M2 + 2 ||zc|| M)           float accumulation of the exact bf16 products, norm, centring
// + (2 L + 8) 2^-126 (1 + ||zc|| + 2M)          denormal inputs and results flushed to zero by the tiles
// (L = amx_row_length(D) >= 3D, the products summed); two codes and a factor 2 of safety give
// the tolerance of `threshold`.
template <typename scalar_t>
struct AmxScan {
  static const char* event(const RowSettler<scalar_t>&) { return "vqvae_fast::cpu_scan_amx"; }  // profiler event
  const RowSettler<scalar_t>& settler;
  int64_t D, groups, length, group_elems, panel_elems;
  at::Tensor codes_buffer;  // tile rows are 64 bytes: 64-byte aligned buffers keep each in one cache line
  const uint16_t* codes;
  std::vector<float> norms;
  double rel_tol, abs_scale;
  int64_t panel_bytes, group_bytes;

  explicit AmxScan(const RowSettler<scalar_t>& settler)
      : settler(settler), D(settler.cb.D), groups(ceil_div(settler.cb.K, kAmxCodes)), length(amx_row_length(D)),
        group_elems(length * kAmxCodes), panel_elems(kAmxRows * length),
        codes_buffer(at::empty({groups * group_elems}, at::TensorOptions().dtype(at::kBFloat16))),
        codes(reinterpret_cast<const uint16_t*>(codes_buffer.const_data_ptr())),
        norms(groups * kAmxCodes, std::numeric_limits<float>::infinity()),
        rel_tol(4.0 * (3.1 * std::ldexp(1.0, -16) + 1.05 * static_cast<double>(length + 8) * std::ldexp(1.0, -24))),
        abs_scale(4.0 * static_cast<double>(2 * length + 8) * std::ldexp(1.0, -126)),
        panel_bytes(panel_elems * 2), group_bytes(group_elems * 2) {
    const PreparedCodebook& cb = settler.cb;
    uint16_t* packed = reinterpret_cast<uint16_t*>(codes_buffer.data_ptr());
    const float* ecp = cb.ec_m2.const_data_ptr<float>();
    at::parallel_for(0, groups, grain_for(length * kAmxCodes), [&](int64_t g0, int64_t g1) {
      amx_pack_codes(ecp, cb.K, D, g0, g1, packed);
    });
    std::copy(cb.e_norm.begin(), cb.e_norm.end(), norms.begin());
  }

  double threshold(float best, double bound, double zc_norm2) const {
    return static_cast<double>(best) + rel_tol * bound + abs_scale * (1.0 + std::sqrt(zc_norm2) + 2.0 * settler.cb.M);
  }

  // One thread's block of packed panels (panel_elems bf16 each); rows [0, N) only, no subset.
  struct Panels {
    const AmxScan& scan;
    std::vector<float> centred;
    at::Tensor a_buffer;
    uint16_t* a;

    Panels(const AmxScan& scan, int64_t block, RowMap row_of)
        : scan(scan), centred(kAmxRows * scan.D),
          a_buffer(at::empty({block * scan.panel_elems}, at::TensorOptions().dtype(at::kBFloat16))),
          a(reinterpret_cast<uint16_t*>(a_buffer.data_ptr())) {
      TORCH_INTERNAL_ASSERT(row_of.subset == nullptr && row_of.first == 0, "the AMX scan reads rows [0, N)");
    }

    void pack(int64_t p, int64_t first, int64_t rows, float* zc_norm2) {
      const RowSettler<scalar_t>& settler = scan.settler;
      centre_panel_rows(settler.row_ptr(first), settler.z_type, settler.z_ld, rows, settler.cb.centre.data(), scan.D,
                        centred.data(), zc_norm2);
      amx_pack_panel(centred.data(), scan.D, a + p * scan.panel_elems);
    }

    void scan_groups(int64_t p, int64_t g0, int64_t g1, ScanState& state, LinePrefetch& /*fetch*/) {  // nothing fetched: untimed on AMX
      amx_scan_panel(a + p * scan.panel_elems, scan.codes, scan.norms.data(), scan.D, g0, g1, state);
    }

    bool settle(int64_t /*p*/, int64_t t, const ScanState& s, int64_t i, RowSettler<scalar_t>& settler,
                double threshold) {
      if (!(static_cast<double>(s.second[t]) > threshold)) return false;
      settler.finish(i, s.index[t], settler.exact_dist(i, s.index[t]));
      return true;
    }
  };
};

// The fused path, for either scan: for panels of kScanRows rows the scan keeps each row's best
// and second-best score over all codes (with a group index: with the group's own second from
// Panels::settle). A row whose second-best is beyond the scan's error bound
// of its best has exactly one candidate, the best, and only that code's distance is computed
// exactly; the others (near-ties, rows that could overflow) are returned. Each panel is packed just
// before its first scan and settled right after its last, and while a panel is scanned the next
// one's rows of z are fetched (AMD Zen 4: 3-6 % faster at K = 256, D >= 128, 1-3 % at K = 1024;
// at D = 8 unchanged with AVX-512; with the AVX2 scan forced 3 % slower, about half of it won back
// by fetching all at once below D = 16; benchmarks/RESULTS.md).
template <typename Scan, typename scalar_t>
std::vector<int64_t> settle_rows_scan(const Scan& scan, RowSettler<scalar_t>& settler, int64_t N, RowMap row_of) {
  RECORD_USER_SCOPE(Scan::event(settler));
  static_assert(kAmxRows == kScanRows, "both scans fill ScanState's panels");
  const int64_t panels = ceil_div(N, kScanRows);
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  // Blocks go to whichever thread is free (a shared counter), at least kBlocksPerThread per
  // thread: on a busy machine a thread that shares its core with another process then delays
  // the call by a block, not by its share of the rows.
  const int64_t block = std::clamp<int64_t>(
      std::min<int64_t>(kBlockBytes / scan.panel_bytes, ceil_div(panels, nthreads == 1 ? 1 : nthreads * kBlocksPerThread)), 1, panels);
  const int64_t blocks = ceil_div(panels, block);
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / scan.group_bytes);
  std::vector<int64_t> unsettled;
  std::mutex unsettled_mutex;
  std::atomic<int64_t> next_block{0};

  // One task per thread, each taking blocks until none is left; a small scan runs inline.
  const bool small = N * settler.cb.K * scan.D < kMinParallelWork;
  at::parallel_for(0, small ? 1 : std::min(nthreads, blocks), 1, [&](int64_t, int64_t) {
    typename Scan::Panels work(scan, block, row_of);
    std::vector<float> zc_norm2(block * kScanRows);
    std::vector<ScanState> states(block);
    std::vector<int64_t> mine;
    for (int64_t b = next_block++; b < blocks; b = next_block++) {
      const int64_t p0 = b * block, np = std::min(block, panels - p0);
      const auto first_row = [&](int64_t p) { return (p0 + p) * kScanRows; };
      const auto rows_in = [&](int64_t p) { return std::min(kScanRows, N - first_row(p)); };
      for (int64_t g0 = 0; g0 < scan.groups; g0 += chunk) {
        const int64_t g1 = std::min(scan.groups, g0 + chunk);
        const bool first_chunk = g0 == 0, last_chunk = g1 == scan.groups;
        for (int64_t p = 0; p < np; ++p) {
          if (first_chunk) {  // packed just before its first scan
            work.pack(p, first_row(p), rows_in(p), zc_norm2.data() + p * kScanRows);
            reset(states[p]);
          }
          // The next panel's rows are read next when it is packed (first chunk) or settled (last).
          LinePrefetch fetch;
          if ((first_chunk || last_chunk) && p + 1 < np) {
            fetch = contiguous_rows(settler, row_of, first_row(p + 1), rows_in(p + 1));
          }
          work.scan_groups(p, g0, g1, states[p], fetch);
          if (!last_chunk) continue;
          // Settled right after its last scan, while its rows of z are still in cache.
          const ScanState& s = states[p];
          for (int64_t t = 0; t < rows_in(p); ++t) {
            const int64_t i = row_of(first_row(p) + t);
            const double zc2 = zc_norm2[p * kScanRows + t];
            const double bound = settler.bound(zc2);
            if (!settler.scores_usable(bound) || !work.settle(p, t, s, i, settler, scan.threshold(s.best[t], bound, zc2))) {
              mine.push_back(i);  // near-tie, or no trustworthy scores
            }
          }
        }
      }
    }
    std::lock_guard<std::mutex> lock(unsettled_mutex);
    unsettled.insert(unsettled.end(), mine.begin(), mine.end());
  });
  return unsettled;
}

}  // namespace

template <typename scalar_t>
std::vector<int64_t> settle_rows_float(RowSettler<scalar_t>& settler, int64_t N, const std::vector<int64_t>* subset,
                                        int64_t first) {
  return settle_rows_scan(FloatScan<scalar_t>(settler), settler, N, RowMap{subset, first});
}

template <typename scalar_t>
std::vector<int64_t> settle_rows_amx(RowSettler<scalar_t>& settler, int64_t N) {
  static_assert(!std::is_same_v<scalar_t, double>, "the AMX scan reads float, bf16 and fp16 rows");
  return settle_rows_scan(AmxScan<scalar_t>(settler), settler, N, RowMap{nullptr});
}

template <typename scalar_t>
std::vector<int64_t> settle_rows_bf16_rounded(RowSettler<scalar_t>& settler, int64_t N, int64_t probe,
                                              double max_share, int64_t* stopped_at) {
  static_assert(!std::is_same_v<scalar_t, double>, "the rounded bf16 scan reads float32, fp16 and bf16 rows");
  const RoundedBf16Scan<scalar_t> scan(settler);  // the codes rounded and packed once for both parts
  probe = std::min(probe, N);
  std::vector<int64_t> back = settle_rows_scan(scan, settler, probe, RowMap{nullptr, 0});
  *stopped_at = N;
  if (probe == N) return back;
  if (static_cast<double>(back.size()) > max_share * static_cast<double>(probe)) {
    *stopped_at = probe;
    return back;
  }
  const std::vector<int64_t> more = settle_rows_scan(scan, settler, N - probe, RowMap{nullptr, probe});
  back.insert(back.end(), more.begin(), more.end());
  return back;
}

std::vector<int64_t> settle_rows_bf16(RowSettler<at::BFloat16>& settler, int64_t N) {
  TORCH_INTERNAL_ASSERT(std::all_of(settler.cb.centre.begin(), settler.cb.centre.end(), [](float c) { return c == 0.0f; }),
                        "the bf16 scan reads an uncentred codebook");
  return settle_rows_scan(Bf16Scan<at::BFloat16>(settler), settler, N, RowMap{nullptr});
}

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
  RECORD_USER_SCOPE("vqvae_fast::cpu_settle_gemm");
  const at::Tensor ecT = cb.ec_m2.t();  // (D, K)
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t R = std::clamp<int64_t>(kTileFloats / (K + D), 16, 4096);
  R = std::max<int64_t>(1, std::min(R, ceil_div(n, nthreads)));

  at::parallel_for(0, ceil_div(n, R), grain_for(R * K * D), [&](int64_t b0, int64_t b1) {
    at::Tensor zc = at::empty({R, D}, cb.ec_m2.options());
    at::Tensor dots = at::empty({R, K}, cb.ec_m2.options());
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
      at::Tensor out = dots.narrow(0, 0, r);
      at::mm_out(out, zc.narrow(0, 0, r), ecT);  // -2 (z - mu).(e - mu)

      for (int64_t t = 0; t < r; ++t) {
        const int64_t i = rows[j0 + t];
        const float* row = dp + t * K;
        const double bound = settler.bound(zc_norm2[t]);
        if (!settler.scores_usable(bound)) {
          settler.settle(i, [](int64_t) { return true; });
          continue;
        }
        settle_with_code_bounds(settler, i, row, zc_norm2[t], settler.underflow_slack(zc_norm2[t]));
      }
    }
  });
}

#define VQVAE_FAST_SETTLE_STAGES(T)                                                                        \
  template std::vector<int64_t> settle_rows_float<T>(RowSettler<T>&, int64_t, const std::vector<int64_t>*, int64_t); \
  template void settle_rows_gemm<T>(RowSettler<T>&, const std::vector<int64_t>&);
VQVAE_FAST_SETTLE_STAGES(float)
VQVAE_FAST_SETTLE_STAGES(double)
VQVAE_FAST_SETTLE_STAGES(at::BFloat16)
VQVAE_FAST_SETTLE_STAGES(at::Half)
#undef VQVAE_FAST_SETTLE_STAGES
template std::vector<int64_t> settle_rows_amx<float>(RowSettler<float>&, int64_t);
template std::vector<int64_t> settle_rows_amx<at::BFloat16>(RowSettler<at::BFloat16>&, int64_t);
template std::vector<int64_t> settle_rows_amx<at::Half>(RowSettler<at::Half>&, int64_t);
#define VQVAE_FAST_ROUNDED_STAGE(T) \
  template std::vector<int64_t> settle_rows_bf16_rounded<T>(RowSettler<T>&, int64_t, int64_t, double, int64_t*);
VQVAE_FAST_ROUNDED_STAGE(float)
VQVAE_FAST_ROUNDED_STAGE(at::Half)
VQVAE_FAST_ROUNDED_STAGE(at::BFloat16)
#undef VQVAE_FAST_ROUNDED_STAGE

}  // namespace vqvae_fast
