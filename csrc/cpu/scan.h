// The fused nearest-code scan of the CPU forward: scores of a panel of 32 rows against groups
// of 12 codes are accumulated in registers and folded straight into a running best /
// second-best / index per row, so no score is ever written to memory. Three bodies run it, chosen
// at run time (scan.cpp): AVX-512F (scan_avx512.cpp), AVX2 + FMA (scan_avx2.cpp) and portable C++
// (scan_portable.cpp: NEON on aarch64).
#pragma once

#include <cstdint>
#include <type_traits>

namespace vqvae_fast {

// Register arithmetic, not a sweep: 32 rows are the lanes of two 512-bit vectors, and 12 codes x 2
// vectors = 24 accumulators of the 32 zmm registers, the rest for operands. What it reached:
// 340-350 GFLOP/s at D = 256 on 2 cores, 73% of the FMA peak (benchmarks/RESULTS.md "CPU, previous
// kernel (history)", commit 6bdbaf3); other group widths were not measured.
constexpr int64_t kScanRows = 32;   // rows per panel: the lanes of two 512-bit vectors
constexpr int64_t kScanCodes = 12;  // codes per group: 24 accumulators, the rest of the registers for operands

// What a scan has seen so far, per row of a panel: the smallest float score, the second
// smallest (over all other codes, ties included) and the index of the smallest. With a group
// index: the group of the smallest, and as `second` the smallest score of the other groups (the
// best group's own second comes from code_in_group).
// The rounded bf16 scan also keeps the third-smallest score and the second-smallest's code.
struct ScanState {
  alignas(64) float best[kScanRows];
  alignas(64) float second[kScanRows];
  alignas(64) int32_t index[kScanRows];
  alignas(64) float third[kScanRows];
  alignas(64) int32_t index2[kScanRows];
};

// Cache lines a scan asks for while it runs, a few at a time between steps of its arithmetic: the
// rows of z its caller reads next (to pack or settle the next panel). Packing reads 16 rows a line
// each at a time, an order in which z came from memory at 7-8 GB/s against 26 GB/s read in
// sequence (one core, AMD Zen 4), and packing was 10 % of a call at N x K x D = 16384 x 256 x 128
// (42 % at K = 12, D = 256); asked for this way, those loads overlap the scan's FMAs.
struct LinePrefetch {
  const char* next = nullptr;
  const char* end = nullptr;
  void step() {
    if (next < end) {
      __builtin_prefetch(next, 0, 3);
      next += 64;
    }
  }
  void all() {  // every line at once: where they are few (the AVX2 scan below D = 16)
    while (next < end) step();
  }
};

// The instruction set a float scan and its helpers run with. Every score is the same chain of
// fused multiply-adds (the norm, then one FMA per coordinate in order), so all give the same
// scores bit for bit; they differ in speed only.
enum class ScanIsa { kAvx512, kAvx2, kPortable };

// True when this CPU can run the scan with `isa` (AVX-512F; AVX2 and FMA; checked once). The
// portable body runs everywhere; the AVX ones only on x86-64.
bool scan_available(ScanIsa isa);

// Whether the portable body is vector code on this build (NEON on aarch64) and so the forward's
// default where neither AVX body runs; elsewhere it is one std::fma per lane, run only when forced.
#if defined(__aarch64__) && defined(__ARM_NEON)
constexpr bool kPortableScanIsVector = true;
#else
constexpr bool kPortableScanIsVector = false;
#endif

// Folds the scores of code groups [g0, g1) into `state`, for one panel of rows:
//   zt     D x kScanRows floats, zt[d * kScanRows + r] = coordinate d of row r
//   codes  per group, D x kScanCodes floats, codes[(g * D + d) * kScanCodes + j] = coordinate d of
//          code g * kScanCodes + j, already multiplied by the factor the score needs (-2)
//   norms  per code, the score's constant term (||e||^2, +inf for a code that must never win)
// score(r, k) = norms[k] + sum_d zt[d][r] * codes[k][d], accumulated in float with FMAs.
// With group_index, state.index holds the group of the best code rather than the code, and each
// group is folded as its minimum (one operation per code instead of three, which matters at
// small D; the caller then finds the code and the group's second among the group's scores).
// `fetch`'s lines are asked for along the way.
void scan_panel(ScanIsa isa, const float* zt, const float* codes, const float* norms, int64_t D, int64_t g0,
                int64_t g1, ScanState& state, bool group_index, LinePrefetch& fetch);

// After a scan with group_index: the code of group g whose score for panel row `row` is `best`
// (the scores recomputed exactly as the scan computed them), or -1 if none is; *second gets the
// smallest score of the group's other codes (+inf past K).
int64_t code_in_group(ScanIsa isa, const float* zt, int64_t row, const float* codes, const float* norms,
                      int64_t D, int64_t g, float best, float* second);

// Element types the packing and the exact distances read directly (16-bit ones widen exactly).
enum class Elem { kFloat, kBFloat16, kHalf };

template <Elem T>
constexpr int64_t elem_size() { return T == Elem::kFloat ? 4 : 2; }

// Packs n <= kScanRows rows of z (row i at element i * ld) minus `centre` into zt (D x
// kScanRows, zero rows after n) and their squared norms, summed in float, into norms[0..n).
void pack_panel(ScanIsa isa, const void* z, Elem type, int64_t ld, int64_t n, const float* centre, int64_t D,
                float* zt, float* norms);

// sum_d (z[d] - e[d])^2 in double for a row of z and a code (both of `type`): exact products
// and sums of the widened values up to double rounding, in a fixed order.
double exact_sq_dist(ScanIsa isa, const void* z, const void* e, Elem type, int64_t D);

// The body of each instruction set (scan_avx512.cpp, scan_avx2.cpp: x86-64 only;
// scan_portable.cpp: everywhere): the functions above, which dispatch to ScanBody<isa> (scan.cpp).
template <ScanIsa isa>
struct ScanBody {
  static void scan_panel(const float* zt, const float* codes, const float* norms, int64_t D, int64_t g0, int64_t g1,
                         ScanState& state, bool group_index, LinePrefetch& fetch);
  static int64_t code_in_group(const float* zt, int64_t row, const float* codes, const float* norms, int64_t D,
                               int64_t g, float best, float* second);
  static void pack_panel(const void* z, Elem type, int64_t ld, int64_t n, const float* centre, int64_t D, float* zt,
                         float* norms);
  static double exact_sq_dist(const void* z, const void* e, Elem type, int64_t D);
};

// f(std::integral_constant<Elem, T>{}) for the element type named at run time.
template <typename F>
auto with_elem(Elem type, F&& f) {
  switch (type) {
    case Elem::kBFloat16: return f(std::integral_constant<Elem, Elem::kBFloat16>{});
    case Elem::kHalf: return f(std::integral_constant<Elem, Elem::kHalf>{});
    case Elem::kFloat: break;
  }
  return f(std::integral_constant<Elem, Elem::kFloat>{});
}

// As pack_panel, but rows stay rows: out (kScanRows x D) holds z[t] - centre, zero rows past n
// (AVX-512F; the AMX scan's).
void centre_panel_rows(const void* z, Elem type, int64_t ld, int64_t n, const float* centre, int64_t D, float* out,
                       float* norms);

// The bf16 variant (scan_bf16.cpp; bf16 inputs on CPUs with AVX512-BF16): one VDPBF16PS (two
// exact bf16 products added to a float lane) per pair of coordinates where the float scan has two
// FMAs, on uncentred values (every operand must be a bf16: the codebook's centre is zero).
// Words hold a pair of bf16 (coordinate 2p in the low half), zero past D.
bool bf16_scan_available();  // AVX-512F, BW and BF16, x86-64 only
constexpr int64_t bf16_pairs(int64_t D) { return (D + 1) / 2; }
// codes of groups [g0, g1) of ec (K x D floats, -2 e, each exact in bf16; asserted) as pairs x
// kScanCodes words per group, word (g * P + p) * kScanCodes + j; codes past K are zero.
void bf16_pack_codes(const float* ec, int64_t K, int64_t D, int64_t g0, int64_t g1, uint32_t* packed);
// n <= kScanRows bf16 rows (row t at element t * ld) as pairs x kScanRows words, zero rows after n,
// and their squared norms summed in float (+inf for a row with a subnormal, which the instruction
// would read as zero: the caller leaves such rows to another scan).
void bf16_pack_panel(const uint16_t* z, int64_t ld, int64_t n, int64_t D, uint32_t* zt, float* norms);
// As scan_panel and code_in_group, on packed words (P = bf16_pairs(D)). With top3 (no group
// index) the state's third and index2 are kept too (the rounded scan's fold).
void bf16_scan_panel(const uint32_t* zt, const uint32_t* codes, const float* norms, int64_t P, int64_t g0,
                     int64_t g1, ScanState& state, bool group_index, LinePrefetch& fetch, bool top3 = false);
int64_t bf16_code_in_group(const uint32_t* zt, int64_t row, const uint32_t* codes, const float* norms, int64_t P,
                           int64_t g, float best, float* second);
// The rounded bf16 scan (float and fp16 inputs): centred float values rounded to bf16 (nearest
// even; results below bf16's normal range flushed to zero, which VDPBF16PS would read as zero
// anyway), scanned as above; the rounding's effect on a score is bounded from the norms of what
// was rounded off (settle.cpp, RoundedBf16Scan). Rounds n rows of D floats (row r at src + r *
// ld) into dst (row r at dst + r * D, bf16 bits) and reports, per row, the squared norms of the
// part rounded off and (unless rounded_norm2 is null) of the rounded row, summed in float.
void bf16_round_rows(const float* src, int64_t ld, int64_t n, int64_t D, uint16_t* dst, float* dropped_norm2,
                     float* rounded_norm2);
// As bf16_pack_codes, from bf16 rows (code k at rows + k * D).
void bf16_pack_code_rows(const uint16_t* rows, int64_t K, int64_t D, int64_t g0, int64_t g1, uint32_t* packed);

// The AMX variant (D >= 16 where the CPU has AMX-BF16). Scores come from split operands: the
// centred row x and code y (float) are each split into bf16 parts, x = xh + xl + rx with |rx| <=
// 2^-16 |x|, and xh.yh + xh.yl + xl.yh is one bf16 tile product of codes [yh, yl, yh] and rows
// [xh, xh, xl], accumulated in float: within ~3 * 2^-16 |x||y| of x.y plus float rounding
// (settle.cpp, AmxScan, holds the bound). Codes are the tiles' rows, so each code's scores for the
// panel's 32 rows are two vectors, folded into ScanState as the AVX-512 scan folds them.
// Hardware, not tuning: a tile holds at most 16 rows, and 2 x 2 accumulator tiles plus 2 + 2 operand
// tiles fill the 8 tile registers (benchmarks/RESULTS.md "CPU: the AMX scan ...", Floors).
constexpr int64_t kAmxRows = kScanRows;  // two tiles of 16 rows
constexpr int64_t kAmxCodes = 32;        // two tiles of 16 codes

// True when this CPU has AMX-BF16 and the kernel lets this process use the tiles (asked once).
bool amx_scan_available();
// bf16 elements per packed row: [hi, hi, lo] (panel) or [hi, lo, hi] (codes), 3D padded to 32.
int64_t amx_row_length(int64_t D);
// Packs the codes of groups [g0, g1) of kAmxCodes codes of ec (K x D floats, the score's factor
// -2 included) as rows of amx_row_length(D); codes past K are zero.
void amx_pack_codes(const float* ec, int64_t K, int64_t D, int64_t g0, int64_t g1, uint16_t* packed);
// Packs a panel of centred rows (centre_panel_rows' kAmxRows x D) as tiles: b[(s * 2 + half) *
// 512 ...] holds step s (32 elements) of rows half * 16 .. half * 16 + 15 in the tiles' pair order.
void amx_pack_panel(const float* rows, int64_t D, uint16_t* b);
// Folds code groups [g0, g1) (norms: per code, +inf past K) into `state` (index: the code).
void amx_scan_panel(const uint16_t* b, const uint16_t* codes, const float* norms, int64_t D, int64_t g0,
                    int64_t g1, ScanState& state);
// dst[p * 16 + n] = src[n * stride + p] for a 16 x 16 block of 32-bit words (AVX-512F).
void transpose_words16(const uint32_t* src, int64_t stride, uint32_t* dst);

}  // namespace vqvae_fast
