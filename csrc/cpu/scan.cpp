// Which body of the fused scan runs (scan.h): AVX-512F or AVX2 + FMA, as the caller's ScanIsa
// says. The caller asks scan_available first; on CPUs other than x86-64 neither body exists and
// the forward takes the GEMM path (the stubs below, AMX's included, are never called).

#include "scan.h"

#include <c10/util/Exception.h>

namespace vqvae_fast {

#if defined(__x86_64__)

using Avx512 = ScanBody<ScanIsa::kAvx512>;
using Avx2 = ScanBody<ScanIsa::kAvx2>;

bool scan_available(ScanIsa isa) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return isa == ScanIsa::kAvx512 ? avx512 : avx2;
}

void scan_panel(ScanIsa isa, const float* zt, const float* codes, const float* norms, int64_t D, int64_t g0,
                int64_t g1, ScanState& state, bool group_index) {
  if (isa == ScanIsa::kAvx512) return Avx512::scan_panel(zt, codes, norms, D, g0, g1, state, group_index);
  Avx2::scan_panel(zt, codes, norms, D, g0, g1, state, group_index);
}

int64_t code_in_group(ScanIsa isa, const float* zt, int64_t row, const float* codes, const float* norms,
                      int64_t D, int64_t g, float best, float* second) {
  if (isa == ScanIsa::kAvx512) return Avx512::code_in_group(zt, row, codes, norms, D, g, best, second);
  return Avx2::code_in_group(zt, row, codes, norms, D, g, best, second);
}

void pack_panel(ScanIsa isa, const void* z, Elem type, int64_t ld, int64_t n, const float* centre, int64_t D,
                float* zt, float* norms) {
  if (isa == ScanIsa::kAvx512) return Avx512::pack_panel(z, type, ld, n, centre, D, zt, norms);
  Avx2::pack_panel(z, type, ld, n, centre, D, zt, norms);
}

double exact_sq_dist(ScanIsa isa, const void* z, const void* e, Elem type, int64_t D) {
  if (isa == ScanIsa::kAvx512) return Avx512::exact_sq_dist(z, e, type, D);
  return Avx2::exact_sq_dist(z, e, type, D);
}

#else  // no fused scan: every call below is a bug of the caller, which must ask scan_available first

bool scan_available(ScanIsa) { return false; }

namespace {
[[noreturn]] void no_scan() { TORCH_INTERNAL_ASSERT(false, "the fused CPU scan runs on x86-64 only"); }
}  // namespace

void scan_panel(ScanIsa, const float*, const float*, const float*, int64_t, int64_t, int64_t, ScanState&, bool) {
  no_scan();
}
int64_t code_in_group(ScanIsa, const float*, int64_t, const float*, const float*, int64_t, int64_t, float, float*) {
  no_scan();
}
void pack_panel(ScanIsa, const void*, Elem, int64_t, int64_t, const float*, int64_t, float*, float*) { no_scan(); }
double exact_sq_dist(ScanIsa, const void*, const void*, Elem, int64_t) { no_scan(); }
void centre_panel_rows(const void*, Elem, int64_t, int64_t, const float*, int64_t, float*, float*) { no_scan(); }

bool amx_scan_available() { return false; }
int64_t amx_row_length(int64_t) { no_scan(); }
void amx_pack_codes(const float*, int64_t, int64_t, int64_t, int64_t, uint16_t*) { no_scan(); }
void amx_pack_panel(const float*, int64_t, uint16_t*) { no_scan(); }
void amx_scan_panel(const uint16_t*, const uint16_t*, const float*, int64_t, int64_t, int64_t, ScanState&) {
  no_scan();
}
void transpose_words16(const uint32_t*, int64_t, uint32_t*) { no_scan(); }

#endif

}  // namespace vqvae_fast
