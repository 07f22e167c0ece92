// Which body of the fused scan runs (scan.h): AVX-512F, AVX2 + FMA or portable C++, as the
// caller's ScanIsa says. The caller asks scan_available first; on CPUs other than x86-64 only the
// portable body exists (the AMX stubs at the end are never called there).

#include "scan.h"

#include <c10/util/Exception.h>

namespace vqvae_fast {

using Portable = ScanBody<ScanIsa::kPortable>;
#if defined(__x86_64__)
using Avx512 = ScanBody<ScanIsa::kAvx512>;
using Avx2 = ScanBody<ScanIsa::kAvx2>;
#endif

bool scan_available(ScanIsa isa) {
#if defined(__x86_64__)
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (isa == ScanIsa::kAvx512) return avx512;
  if (isa == ScanIsa::kAvx2) return avx2;
#endif
  return isa == ScanIsa::kPortable;
}

void scan_panel(ScanIsa isa, const float* zt, const float* codes, const float* norms, int64_t D, int64_t g0,
                int64_t g1, ScanState& state, bool group_index, LinePrefetch& fetch) {
#if defined(__x86_64__)
  if (isa == ScanIsa::kAvx512) return Avx512::scan_panel(zt, codes, norms, D, g0, g1, state, group_index, fetch);
  if (isa == ScanIsa::kAvx2) return Avx2::scan_panel(zt, codes, norms, D, g0, g1, state, group_index, fetch);
#endif
  Portable::scan_panel(zt, codes, norms, D, g0, g1, state, group_index, fetch);
}

int64_t code_in_group(ScanIsa isa, const float* zt, int64_t row, const float* codes, const float* norms,
                      int64_t D, int64_t g, float best, float* second) {
#if defined(__x86_64__)
  if (isa == ScanIsa::kAvx512) return Avx512::code_in_group(zt, row, codes, norms, D, g, best, second);
  if (isa == ScanIsa::kAvx2) return Avx2::code_in_group(zt, row, codes, norms, D, g, best, second);
#endif
  return Portable::code_in_group(zt, row, codes, norms, D, g, best, second);
}

void pack_panel(ScanIsa isa, const void* z, Elem type, int64_t ld, int64_t n, const float* centre, int64_t D,
                float* zt, float* norms) {
#if defined(__x86_64__)
  if (isa == ScanIsa::kAvx512) return Avx512::pack_panel(z, type, ld, n, centre, D, zt, norms);
  if (isa == ScanIsa::kAvx2) return Avx2::pack_panel(z, type, ld, n, centre, D, zt, norms);
#endif
  Portable::pack_panel(z, type, ld, n, centre, D, zt, norms);
}

double exact_sq_dist(ScanIsa isa, const void* z, const void* e, Elem type, int64_t D) {
#if defined(__x86_64__)
  if (isa == ScanIsa::kAvx512) return Avx512::exact_sq_dist(z, e, type, D);
  if (isa == ScanIsa::kAvx2) return Avx2::exact_sq_dist(z, e, type, D);
#endif
  return Portable::exact_sq_dist(z, e, type, D);
}

#if !defined(__x86_64__)  // no AMX, no AVX512-BF16: every call below is a bug of the caller (*_available say no)

namespace {
[[noreturn]] void no_amx() { TORCH_INTERNAL_ASSERT(false, "the AMX and bf16 scans run on x86-64 only"); }
}  // namespace

bool amx_scan_available() { return false; }
bool bf16_scan_available() { return false; }
void bf16_pack_codes(const float*, int64_t, int64_t, int64_t, int64_t, uint32_t*) { no_amx(); }
void bf16_pack_panel(const uint16_t*, int64_t, int64_t, int64_t, uint32_t*, float*) { no_amx(); }
void bf16_round_rows(const float*, int64_t, int64_t, int64_t, uint16_t*, float*, float*) { no_amx(); }
void bf16_pack_code_rows(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint32_t*) { no_amx(); }
void bf16_scan_panel(const uint32_t*, const uint32_t*, const float*, int64_t, int64_t, int64_t, ScanState&, bool,
                     LinePrefetch&, bool) {
  no_amx();
}
int64_t bf16_code_in_group(const uint32_t*, int64_t, const uint32_t*, const float*, int64_t, int64_t, float,
                           float*) {
  no_amx();
}
void centre_panel_rows(const void*, Elem, int64_t, int64_t, const float*, int64_t, float*, float*) { no_amx(); }
int64_t amx_row_length(int64_t) { no_amx(); }
void amx_pack_codes(const float*, int64_t, int64_t, int64_t, int64_t, uint16_t*) { no_amx(); }
void amx_pack_panel(const float*, int64_t, uint16_t*) { no_amx(); }
void amx_scan_panel(const uint16_t*, const uint16_t*, const float*, int64_t, int64_t, int64_t, ScanState&) {
  no_amx();
}
void transpose_words16(const uint32_t*, int64_t, uint32_t*) { no_amx(); }

#endif

}  // namespace vqvae_fast
