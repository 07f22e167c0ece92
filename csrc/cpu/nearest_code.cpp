// CPU kernels of vqvae_fast::nearest_code and quantize_fwd, the choice of their forward path,
// and the registration of the CPU kernels (quantize_bwd's is in quantize_bwd.cpp; schemas in
// csrc/ops.cpp). The stages that settle rows are in settle.cpp, the scans in scan_*.cpp.
//
// Forward, for z (N, D) and codebook (K, D):
//   1. Centre everything on the codebook mean mu (per column over the codes without a NaN/Inf
//      entry, rounded to float): a shared offset (say all vectors near +1000) would otherwise be lost to
//      cancellation in ||z||^2 - 2 z.e + ||e||^2. Codes with a NaN/Inf entry are never chosen
//      (unless every code has one) and do not change the centre; nor do exact repeats of an
//      earlier code, which can never win a tie.
//   2. Score every code in float32, whatever the input dtype:
//        s_k = ||e_k - mu||^2 - 2 (z_i - mu).(e_k - mu)     (= ||z_i - e_k||^2 - const_i)
//      Fused path (CPUs with AVX-512F or AVX2, aarch64; scan.h): panels of 32 rows against groups of 12 codes
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
#include <ATen/record_function.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "scan.h"
#include "settle.h"

namespace vqvae_fast {

using at::Tensor;

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

namespace {

// Which forward the CPU kernels run. Where the CPU has AVX-512F, a fused scan: its AMX form
// (CPUs with AMX-BF16, from D = kAmxMinD on; float32, bf16 and fp16 rows) or its float form;
// where it has AVX2 and FMA but not AVX-512F, the float form with AVX2 instructions; on aarch64,
// the float form in portable C++ (NEON). bf16 inputs that AMX does not take, on CPUs with
// AVX512-BF16 (AMD Zen 4/5): the bf16 form, on the uncentred codebook where its centre is small
// (else the float form); float32 and fp16 inputs there: the rounded bf16 form from D =
// kRoundedMinD on. Scan states index codes with int32 (so K <= INT32_MAX).
// Otherwise (other CPUs, other ISAs) one BLAS GEMM per block of rows.
// VQVAE_FAST_CPU_SCAN=gemm | portable | avx2 | avx512 | avx512bf16 | avx512bf16rounded | amx forces
// a path where the CPU and the inputs allow it (tests, comparisons; portable runs everywhere); it is
// read on every call. Forced avx512bf16 uncentres whatever the centre (more rows then go to the
// fallbacks); forced avx512bf16rounded takes float32 and fp16 inputs at every D.
enum class ForwardPath { kGemm, kFusedPortable, kFusedAvx2, kFusedAvx512, kFusedBf16, kFusedBf16Rounded, kFusedAmx };

// From this D on, float32 and fp16 rows on CPUs with AVX512-BF16 but not AMX take the rounded bf16
// scan (twice the products an instruction; rows it cannot settle go to the float scan). Measured
// against the float scan (AMD Zen 4, 1 thread, benchmarks/RESULTS.md): 1.00-1.32x at D = 16,
// 1.05-1.19x at D = 12 (not taken: more rows inside its bound there), 0.66x at D = 8.
constexpr int64_t kRoundedMinD = 16;

// Below, storing and folding the score tiles costs more than the tiles save: measured 0.5-0.7x the
// AVX-512 scan's speed at D = 8 (Intel Xeon with AMX, 2026-11-26; benchmarks/RESULTS.md "CPU: the
// AMX scan against cdist, addmm and FAISS"); lowered from 32 to 16 in commit 7ff903f. Re-measured
// on 2026-12-07 (this build, the same kind of Xeon, 2 threads, nearest_code fp32, both paths forced
// with VQVAE_FAST_CPU_SCAN, 15 interleaved rounds, median): D = 16 AMX 1.23-1.30x faster
// (65536 x 1024: 7.2 against 9.1 ms; 16384 x 16384: 27.7 against 34.4 ms); D = 8 0.92-1.00x.
constexpr int64_t kAmxMinD = 16;

const char* path_name(ForwardPath path) {
  switch (path) {
    case ForwardPath::kFusedAmx:
      return "fused-amx";
    case ForwardPath::kFusedAvx512:
      return "fused-avx512";
    case ForwardPath::kFusedBf16:
      return "fused-avx512-bf16";
    case ForwardPath::kFusedBf16Rounded:
      return "fused-avx512-bf16-rounded";
    case ForwardPath::kFusedAvx2:
      return "fused-avx2";
    case ForwardPath::kFusedPortable:
      return "fused-portable";
    case ForwardPath::kGemm:
      break;
  }
  return "gemm";
}

// VQVAE_FAST_CPU_SCAN, or "" (nothing forced).
std::string forced_scan() {
  const char* env = std::getenv("VQVAE_FAST_CPU_SCAN");
  return env == nullptr ? "" : env;
}

// The one place that decides; the kernels take the path it names, and cpu_forward_path reports it.
ForwardPath choose_forward_path(at::ScalarType dtype, int64_t D, int64_t K) {
  const std::string forced = forced_scan();
  if (forced == "gemm" || K > std::numeric_limits<int32_t>::max()) return ForwardPath::kGemm;
  if (forced == "portable") return ForwardPath::kFusedPortable;
  if (forced == "avx2" || !scan_available(ScanIsa::kAvx512)) {
    if (scan_available(ScanIsa::kAvx2)) return ForwardPath::kFusedAvx2;
    return kPortableScanIsVector ? ForwardPath::kFusedPortable : ForwardPath::kGemm;
  }
  // The AMX scan reads float32, bf16 and fp16 rows; float64 rows are centred in double by the float scan.
  // bf16 inputs on CPUs with AVX512-BF16: its scan (twice the products an instruction), where AMX
  // does not take them; nearest_code_kernel may still fall back to the float scan (see there).
  const bool bf16 = dtype == at::kBFloat16 && bf16_scan_available() && (forced.empty() || forced == "avx512bf16");
  const bool amx = amx_scan_available() && dtype != at::kDouble && forced != "avx512" && forced != "avx512bf16" &&
                   forced != "avx512bf16rounded" && (forced == "amx" || D >= kAmxMinD);
  if (amx) return ForwardPath::kFusedAmx;
  if (bf16) return ForwardPath::kFusedBf16;
  // float32 and fp16 rows rounded to bf16, where the CPU has AVX512-BF16 (AMD Zen 4/5).
  const bool roundable = (dtype == at::kFloat || dtype == at::kHalf) && bf16_scan_available();
  if (roundable && (forced == "avx512bf16rounded" || (forced.empty() && D >= kRoundedMinD))) {
    return ForwardPath::kFusedBf16Rounded;
  }
  return ForwardPath::kFusedAvx512;
}

// The rounded bf16 scan pays for itself only while it hands few rows back to the float scan:
// about 5-11 % on random data, but 29 % at D = 128 and 57 % at D = 256 with k-means-like
// codebooks (codes shorter than the rows and close together; benchmarks/rounded_candidates.py),
// where it was 0.87x the float scan (D = 256, 1 thread). So it runs on a first block of rows, and
// the rest take the float scan if more than kRoundedMaxHandBack of those came back (unless forced).
// Not tuned: the share where it breaks even is about 0.3 at D = 32 and 0.4 at D = 256 (the scan
// alone takes 0.6-0.7 of the float scan's time; benchmarks/RESULTS.md); the probe is 64 panels.
constexpr int64_t kRoundedProbeRows = 2048;
constexpr double kRoundedMaxHandBack = 0.25;

// Rows [0, N) by the rounded bf16 scan (or, after its probe, the float scan); returns the rows
// left for the GEMM path.
template <typename scalar_t>
std::vector<int64_t> settle_rows_rounded_or_float(RowSettler<scalar_t>& settler, int64_t N, bool forced) {
  int64_t stopped_at = N;
  const std::vector<int64_t> undecided =
      settle_rows_bf16_rounded(settler, N, forced ? N : kRoundedProbeRows, kRoundedMaxHandBack, &stopped_at);
  std::vector<int64_t> left;
  if (stopped_at < N) {
    RECORD_USER_SCOPE("vqvae_fast::cpu_rounded_scan_declined");
    left = settle_rows_float(settler, N - stopped_at, nullptr, stopped_at);
  }
  if (!undecided.empty()) {
    const std::vector<int64_t> near_ties = settle_rows_float(settler, static_cast<int64_t>(undecided.size()), &undecided);
    left.insert(left.end(), near_ties.begin(), near_ties.end());
  }
  return left;
}

// Fills indices (N,) and, unless quantized is null, quantized (N, D, contiguous); returns
// sum_i ||z_i - e_{idx_i}||^2, summed in row order (independent of the thread count).
template <typename scalar_t>
double nearest_code_kernel(const Tensor& z, const Tensor& codebook, int64_t* indices,
                           scalar_t* quantized) {
  const int64_t N = z.size(0);
  ForwardPath path = choose_forward_path(z.scalar_type(), codebook.size(1), codebook.size(0));
  // The bf16 scan's operands are the bf16 values themselves: the codebook uncentred, which costs
  // little where its mean is small next to the codes (forced: always), and no subnormal code (the
  // instruction reads it as zero); else the rounded bf16 scan (below kRoundedMinD the float scan)
  // on the centred codebook.
  PreparedCodebook cb(codebook, View2D<scalar_t>(codebook), path != ForwardPath::kFusedBf16);
  if (path == ForwardPath::kFusedBf16 &&
      (cb.bf16_subnormal || (forced_scan() != "avx512bf16" && !cb.mean_is_small()))) {
    cb.recentre(View2D<scalar_t>(codebook));
    // Centred bf16 values are no longer bf16: rounded again (a subnormal code is flushed there).
    path = codebook.size(1) >= kRoundedMinD ? ForwardPath::kFusedBf16Rounded : ForwardPath::kFusedAvx512;
  }
  std::vector<double> row_err(N);
  RowSettler<scalar_t> settler(cb, z, codebook, indices, quantized, row_err);
  std::vector<int64_t> rows;
  Tensor z_rows, e_rows;  // outlive every stage: settler.z_rows and e_rows point into them
  settler.isa = path == ForwardPath::kFusedAvx2       ? ScanIsa::kAvx2
                : path == ForwardPath::kFusedPortable ? ScanIsa::kPortable
                                                      : ScanIsa::kAvx512;
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (path != ForwardPath::kGemm) {  // the scans read rows of contiguous elements directly
      z_rows = z.stride(1) == 1 ? z : z.contiguous();
      settler.z_rows = z_rows.const_data_ptr();
      settler.z_ld = z_rows.stride(0);
      e_rows = codebook.stride(1) == 1 ? codebook : codebook.contiguous();
      settler.e_rows = e_rows.const_data_ptr();
      settler.e_ld = e_rows.stride(0);
      settler.z_type = std::is_same_v<scalar_t, float>           ? Elem::kFloat
                       : std::is_same_v<scalar_t, at::BFloat16> ? Elem::kBFloat16
                                                                : Elem::kHalf;
    }
  }
  switch (path) {
    case ForwardPath::kFusedAmx:
      if constexpr (!std::is_same_v<scalar_t, double>) {
        // The AMX scan's looser bound hands back more rows (a few percent): the float scan
        // settles most of them before the GEMM path sees the rest.
        const std::vector<int64_t> near_ties = settle_rows_amx(settler, N);
        if (!near_ties.empty()) rows = settle_rows_float(settler, static_cast<int64_t>(near_ties.size()), &near_ties);
        break;
      }
      TORCH_INTERNAL_ASSERT(false, "choose_forward_path chose the AMX scan for float64");
    case ForwardPath::kFusedBf16:
      if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        const std::vector<int64_t> near_ties = settle_rows_bf16(settler, N);
        if (!near_ties.empty()) rows = settle_rows_float(settler, static_cast<int64_t>(near_ties.size()), &near_ties);
        break;
      }
      TORCH_INTERNAL_ASSERT(false, "choose_forward_path chose the bf16 scan for another dtype");
    case ForwardPath::kFusedBf16Rounded:
      if constexpr (!std::is_same_v<scalar_t, double>) {
        rows = settle_rows_rounded_or_float(settler, N, forced_scan() == "avx512bf16rounded");
        break;
      }
      TORCH_INTERNAL_ASSERT(false, "choose_forward_path chose the rounded bf16 scan for float64");
    case ForwardPath::kFusedAvx512:
    case ForwardPath::kFusedAvx2:
    case ForwardPath::kFusedPortable:
      rows = settle_rows_float(settler, N);
      break;
    case ForwardPath::kGemm:
      rows.resize(N);
      std::iota(rows.begin(), rows.end(), 0);
      break;
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

// The path the forward takes on this machine for rows of D elements of `dtype` (default float32)
// and a codebook of K codes: "fused-amx", "fused-avx512", "fused-avx512-bf16", "fused-avx512-bf16-rounded",
// "fused-avx2", "fused-portable" or "gemm".
std::string cpu_forward_path(int64_t D, std::optional<at::ScalarType> dtype, int64_t K) {
  const at::ScalarType t = dtype.value_or(at::kFloat);
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "vqvae_fast::cpu_forward_path: unsupported dtype ", dtype_name(t),
              " (supported: torch.float32, torch.float64, torch.float16, torch.bfloat16)");
  TORCH_CHECK(D >= 1 && K >= 1, "vqvae_fast::cpu_forward_path: D and K must be at least 1 (no forward runs ",
              "without rows or codes), got D = ", D, " and K = ", K);
  return path_name(choose_forward_path(t, D, K));
}

// The squared norms ||z_i - centre||^2 (float, (n,)) that packing reports for the rows of z (n, D,
// contiguous), packed 32 rows at a time by the named body: "avx512", "avx2", "portable" (pack_panel),
// "avx512bf16" (bf16_pack_panel: bf16 rows, zero centre; +inf for a row with a subnormal) or
// "amx" (centre_panel_rows, AVX-512F). They enter only the float error bound, so a wrong one
// changes no result on ordinary inputs: tests compare them with float64 norms here.
at::Tensor cpu_pack_norms(const at::Tensor& z, const at::Tensor& centre, const std::string& body) {
  TORCH_CHECK(z.dim() == 2 && z.is_contiguous() && z.device().is_cpu(),
              "vqvae_fast::cpu_pack_norms: z must be a contiguous 2-D CPU tensor, got shape ", z.sizes());
  TORCH_CHECK(centre.dim() == 1 && centre.size(0) == z.size(1) && centre.scalar_type() == at::kFloat &&
                  centre.is_contiguous() && centre.device().is_cpu(),
              "vqvae_fast::cpu_pack_norms: centre must be a contiguous float32 CPU tensor of shape (D,) = (",
              z.size(1), ",), got ", centre.sizes(), " ", dtype_name(centre.scalar_type()));
  const at::ScalarType t = z.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "vqvae_fast::cpu_pack_norms: z must be ",
              "torch.float32, torch.bfloat16 or torch.float16 (float64 rows are not packed), got ", dtype_name(t));
  const int64_t n = z.size(0), D = z.size(1);
  const Elem type = t == at::kFloat ? Elem::kFloat : t == at::kBFloat16 ? Elem::kBFloat16 : Elem::kHalf;
  const auto isa = [&]() -> std::optional<ScanIsa> {
    if (body == "avx512" || body == "amx") return ScanIsa::kAvx512;
    if (body == "avx2") return ScanIsa::kAvx2;
    if (body == "portable") return ScanIsa::kPortable;
    return std::nullopt;
  }();
  const bool bf16 = body == "avx512bf16";
  TORCH_CHECK(isa.has_value() || bf16, "vqvae_fast::cpu_pack_norms: unknown body '", body,
              "' (avx512, avx2, portable, avx512bf16, amx)");
  TORCH_CHECK(bf16 ? bf16_scan_available() : scan_available(*isa), "vqvae_fast::cpu_pack_norms: this CPU cannot run '",
              body, "'");
  TORCH_CHECK(!bf16 || (t == at::kBFloat16 && centre.count_nonzero().item<int64_t>() == 0),
              "vqvae_fast::cpu_pack_norms: 'avx512bf16' packs bf16 rows around a zero centre");
  at::Tensor norms = at::empty({n}, z.options().dtype(at::kFloat));
  std::vector<float> panel(kScanRows * D);  // the largest packed panel: D x 32 floats (bf16: (D + 1) / 2 x 32 words)
  const char* rows = static_cast<const char*>(z.const_data_ptr());
  const int64_t row_bytes = D * z.element_size();
  for (int64_t first = 0; first < n; first += kScanRows) {
    const int64_t count = std::min(kScanRows, n - first);
    const void* start = rows + first * row_bytes;
    float* out = norms.data_ptr<float>() + first;
    if (bf16) {
      bf16_pack_panel(static_cast<const uint16_t*>(start), D, count, D, reinterpret_cast<uint32_t*>(panel.data()), out);
    } else if (body == "amx") {
      centre_panel_rows(start, type, D, count, centre.const_data_ptr<float>(), D, panel.data(), out);
    } else {
      pack_panel(*isa, start, type, D, count, centre.const_data_ptr<float>(), D, panel.data(), out);
    }
  }
  return norms;
}

}  // namespace

// No tensors, so no dispatch: defined here rather than in ops.cpp. cpu_pack_norms is a test hook.
TORCH_LIBRARY_FRAGMENT(vqvae_fast, m) {  // SCHEMAS in vqvae_fast/ops/registration.py, verbatim
  m.def("cpu_forward_path(int D=256, ScalarType? dtype=None, int K=1024) -> str", &cpu_forward_path);
  m.def("cpu_pack_norms(Tensor z, Tensor centre, str body) -> Tensor", &cpu_pack_norms);
}

TORCH_LIBRARY_IMPL(vqvae_fast, CPU, m) {
  m.impl("nearest_code", &nearest_code_cpu);
  m.impl("quantize_fwd", &quantize_fwd_cpu);
  m.impl("quantize_bwd", &quantize_bwd_cpu);
}

}  // namespace vqvae_fast
