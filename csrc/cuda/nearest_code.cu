// CUDA implementation of the vqvae_fast ops (schemas live in csrc/ops.cpp):
//
//   nearest_code(z, codebook) -> indices                 (search only: no gather, no loss)
//   quantize_fwd(z, codebook, beta, rotation) -> (quantized, indices, loss)
//   quantize_bwd(grad_quantized, grad_loss, z, codebook, indices, beta, need_grad_z,
//                need_grad_codebook, rotation) -> (grad_z, grad_codebook)
//
// Forward pipeline (all on the current stream, no host synchronisation, no float atomics,
// bitwise deterministic for a given GPU architecture):
//
//   0. Centre c (D,), with ATen ops on the device: c_d = the mean of the finite entries of
//      codebook column d (0 if there are none, or if that mean is not finite). 16-bit WMMA path:
//      c_d = 0 unless the column's finite entries satisfy max - min <= |mean| / 4, and then
//      c_d = the mean rounded to the 16-bit dtype, so that every finite e - c_d is exact in
//      16 bits (same rule and proof as _column_centre in vqvae_fast/ops/triton_nearest_code.py).
//      NaN / Inf entries are left out (the finite entries of such a code still count), so one
//      bad code cannot push c to NaN / Inf for every score.
//   1. code_norm_kernel: one warp per code, ||e_k - c||^2 in the accumulation type, summed
//      in an order that depends only on d, so identical codes get identical norms (exact ties
//      then resolve to the lowest index). A code with any NaN / Inf entry gets norm +inf, so
//      its score is +inf or NaN and never wins a strict '<'; it is never chosen unless every
//      code is non-finite (the row's index then stays at its initial 0).
//   2. A tiled search kernel that never forms the N x K matrix. A block owns 64 rows of z and
//      walks a range of 64-code tiles (grid.y splits the code tiles when N is small, to fill the
//      GPU). Per (row, code) it computes s = ||e_k - c||^2 - 2 (z_i - c).(e_k - c), and keeps
//      a running (score, index) minimum per row in registers (initially (+inf, 0)), strict '<'
//      while walking codes in increasing order, then merges threads with the lexicographic
//      (score, index) order. The dot product of a (row, code) pair is computed the same way
//      whatever block / split handles it, so the result does not depend on the split count.
//        - search_fma_kernel (fp32, fp64, and fp16/bf16 on GPUs without the WMMA path): 256
//          threads, 64 x 64 block tile, D staged in chunks of 64 (fp64: 32) into shared memory
//          transposed (d-major, converted to the accumulation type and centred by c), each
//          thread computes a 4 x 4 register micro-tile with explicit FMAs (no TF32). 35 KB smem.
//        - search_wmma_kernel (fp16 / bf16, sm_80+): on operands centred on the host with ATen:
//          the codebook e - c in 16 bits (exact; codes with a non-finite entry zeroed, their
//          norm is +inf anyway) and z - c rounded to 16 bits (clamped to the finite 16-bit
//          range). Products of two 16-bit values are exact in fp32 (for bf16, barring fp32
//          overflow / underflow). 128 threads = 4 warps in a 2 x 2 layout, 64 x 64 block tile,
//          each warp owns 32 x 32 (2 x 2 WMMA 16x16x16 fragments, fp32 accumulate). D staged
//          in chunks of 64, zero padded in shared memory (D need not be a multiple of 16;
//          k-steps entirely past D are skipped). The accumulators go through a column-major
//          shared tile (conflict-free reads) to the running minimum. 36 KB smem.
//          The norms are those of step 1 (bitwise equal to the norms of the 16-bit centred
//          codes, which are exact). Rows whose centred z has a finite value that is not exact
//          in 16 bits are flagged (int8, ATen) and re-scored: search_fma_kernel runs a second
//          time over the same grid, on the original z and codebook centred by c, with
//          row_flags: blocks without a flagged row return at once, and only flagged rows
//          overwrite their partials (every split), so each row's partials come from one kernel.
//        When D fits in a single chunk the z tile is staged only once per block.
//      Output: per-split partial (score, index) per row (same splits x N layout for both).
//   3. finalize_kernel: one warp per row merges the split partials (lexicographic), writes
//      indices; for quantize_fwd it also copies codebook[idx] into quantized (bitwise), and
//      the row's squared error sum((z - e)^2) (fp32 for fp32/fp16/bf16, fp64 for fp64;
//      fixed-order warp tree). nearest_code stops here.
//   4. quantize_fwd only: loss_partial_kernel + loss_final_kernel: fixed-chunk, fixed-tree
//      reduction of the row errors in fp64; loss = (1 + beta) * sum / (N * D), written in z's
//      dtype.
//
// Backward (a gradient whose need_grad_* flag is false is returned as an empty tensor, and no
// kernel is launched for it):
//   grad_z = grad_quantized + g * 2 beta (z - e_idx) / (N D), g read on the device.
//   grad_codebook[k] = g * 2 sum_{i: idx_i = k} (e_k - z_i) / (N D).
//   - default: bwd_rows_kernel<kGradZ, kAtomic=true> computes grad_z (when needed) and
//     atomically adds (e - z) into an fp32 (fp64 for fp64) accumulator; cb_finalize_kernel
//     scales it into the codebook dtype. grad_z only: bwd_rows_kernel<true, false>.
//   - torch.use_deterministic_algorithms(True): bwd_rows_kernel<true, false> for grad_z, then a
//     stable at::sort of the indices, and grad_cb_segment_kernel: one block per (code, 32
//     columns) finds its segment of the sorted order by binary search and sums it in a fixed
//     order (16 row lanes, each sequential, then an ordered combine). No float atomics.
//
// Limits: K < 2^30 and D <= 65535 * 32 (deterministic backward grid.y), checked on the host.
// Rows of z with a NaN / Inf value still get an index in [0, K), never an out-of-range one
// (index 0 when none of the row's scores is below +inf).

// ATen/cuda/CUDAContext.h is deliberately not included: it pulls in cuBLAS / cuSPARSE headers,
// which a bare CUDA toolkit may lack (this file needs only the stream and two device attributes).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

namespace vqvae_fast {
namespace {

// --------------------------------------------------------------------------------------------
// Small device helpers
// --------------------------------------------------------------------------------------------

template <typename T>
struct AccT {
  using type = float;
};
template <>
struct AccT<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ T dev_inf();
template <>
__device__ __forceinline__ float dev_inf<float>() {
  return __int_as_float(0x7f800000);
}
template <>
__device__ __forceinline__ double dev_inf<double>() {
  return __longlong_as_double(0x7ff0000000000000LL);
}

__device__ __forceinline__ float dev_fma(float a, float b, float c) {
  return fmaf(a, b, c);
}
__device__ __forceinline__ double dev_fma(double a, double b, double c) {
  return fma(a, b, c);
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}

// Lexicographic (score, index) minimum; NaN scores never win (partials never hold NaN).
template <typename acc_t>
__device__ __forceinline__ void lex_min(acc_t& s, int& k, acc_t os, int ok) {
  if (os < s || (os == s && ok < k)) {
    s = os;
    k = ok;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;  // identical in every lane (xor butterfly, commutative adds)
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Fixed tile geometry shared by both search kernels (the partial layout depends on it).
constexpr int kBM = 64;  // z rows per block
constexpr int kBN = 64;  // codes per tile

// --------------------------------------------------------------------------------------------
// 1. Code norms: enorm[k] = sum_d (e[k,d] - mu[d])^2  (mu == nullptr means 0), +inf for a code
//    with any NaN / Inf entry (its score is then +inf or NaN, never '< best').
// --------------------------------------------------------------------------------------------

constexpr int kNormThreads = 256;  // 8 warps, one code each

template <typename scalar_t>
__global__ void __launch_bounds__(kNormThreads)
    code_norm_kernel(const scalar_t* __restrict__ cb,
                     const typename AccT<scalar_t>::type* __restrict__ mu, int K, int D,
                     typename AccT<scalar_t>::type* __restrict__ enorm) {
  using acc_t = typename AccT<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * (kNormThreads / 32) + (threadIdx.x >> 5);
  if (k >= K) return;  // whole warp leaves together
  const scalar_t* e = cb + k * D;
  acc_t s = 0;
  bool non_finite = false;
  for (int d = lane; d < D; d += 32) {
    const acc_t x = to_acc<acc_t>(e[d]);  // 16-bit Inf / NaN stay Inf / NaN in fp32
    non_finite |= !isfinite(x);
    const acc_t v = (mu != nullptr) ? x - mu[d] : x;
    s = dev_fma(v, v, s);
  }
  s = warp_sum(s);
  non_finite = __any_sync(0xffffffffu, non_finite);  // the whole warp is here (see above)
  if (lane == 0) enorm[k] = non_finite ? dev_inf<acc_t>() : s;
}

// --------------------------------------------------------------------------------------------
// 2a. FMA search kernel (exact fp32 / fp64; fallback for fp16 / bf16)
// --------------------------------------------------------------------------------------------

constexpr int kFmThreads = 256;  // 16 x 16 threads, 4 x 4 micro-tile each
// D chunk: 64 for fp32 accumulation (35 KB smem; D <= 64 keeps the z tile resident),
// 32 for fp64 (35 KB smem as well, under the 48 KB static limit).
template <typename acc_t>
struct FmBK {
  static constexpr int value = 64;
};
template <>
struct FmBK<double> {
  static constexpr int value = 32;
};
constexpr int kFmLd = kBM + 4;   // padded leading dimension of the transposed tiles
static_assert(kBM == kBN, "FMA staging assumes square tiles");
static_assert(kBM == 16 * 4 && kBN == 16 * 4, "4x4 micro-tiles on a 16x16 thread grid");

// 16-byte vector load of VW = 16 / sizeof(scalar_t) elements, converted to the accumulation
// type (no local-memory type punning).
__device__ __forceinline__ void load_vec(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}
__device__ __forceinline__ void load_vec(const double* p, double (&v)[2]) {
  const double2 t = *reinterpret_cast<const double2*>(p);
  v[0] = t.x;
  v[1] = t.y;
}
template <typename half_t>
__device__ __forceinline__ void load_vec16(const half_t* p, float (&v)[8]) {
  const uint4 t = *reinterpret_cast<const uint4*>(p);
  const unsigned w[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    v[2 * q] = static_cast<float>(
        half_t(static_cast<uint16_t>(w[q] & 0xffffu), typename half_t::from_bits_t()));
    v[2 * q + 1] = static_cast<float>(
        half_t(static_cast<uint16_t>(w[q] >> 16), typename half_t::from_bits_t()));
  }
}
__device__ __forceinline__ void load_vec(const at::Half* p, float (&v)[8]) {
  load_vec16(p, v);
}
__device__ __forceinline__ void load_vec(const at::BFloat16* p, float (&v)[8]) {
  load_vec16(p, v);
}

// Stage rows [r0, r0 + kBM) x columns [d0, d0 + BK) of src (row-major, ld = D) into
// dst[c][r] (transposed), centred by mu, zero outside [0, nrows) x [0, D).
template <typename scalar_t, bool kVec>
__device__ __forceinline__ void stage_fma(typename AccT<scalar_t>::type (*dst)[kFmLd],
                                          const scalar_t* __restrict__ src,
                                          const typename AccT<scalar_t>::type* __restrict__ mu,
                                          int64_t r0, int64_t nrows, int D, int d0, int tid) {
  using acc_t = typename AccT<scalar_t>::type;
  constexpr int BK = FmBK<acc_t>::value;
  if constexpr (kVec) {
    constexpr int VW = 16 / static_cast<int>(sizeof(scalar_t));  // elements per 16-byte load
    constexpr int VPR = BK / VW;                                   // vectors per tile row
    static_assert((kBM * VPR) % kFmThreads == 0, "vector staging must divide evenly");
#pragma unroll 2
    for (int j = 0; j < kBM * VPR / kFmThreads; ++j) {
      const int idx = tid + j * kFmThreads;
      const int r = idx / VPR;
      const int c = (idx % VPR) * VW;
      const int64_t row = r0 + r;
      const int gd = d0 + c;
      acc_t v[VW];
      if (row < nrows && gd < D) {  // D % VW == 0, so the whole vector is in range
        load_vec(src + row * D + gd, v);
#pragma unroll
        for (int q = 0; q < VW; ++q) v[q] -= mu[gd + q];
      } else {
#pragma unroll
        for (int q = 0; q < VW; ++q) v[q] = acc_t(0);
      }
#pragma unroll
      for (int q = 0; q < VW; ++q) dst[c + q][r] = v[q];
    }
  } else {
    static_assert((kBM * BK) % kFmThreads == 0, "scalar staging must divide evenly");
#pragma unroll 4
    for (int j = 0; j < kBM * BK / kFmThreads; ++j) {
      const int idx = tid + j * kFmThreads;
      const int r = idx / BK;
      const int c = idx % BK;
      const int64_t row = r0 + r;
      const int gd = d0 + c;
      acc_t v = acc_t(0);
      if (row < nrows && gd < D) v = to_acc<acc_t>(src[row * D + gd]) - mu[gd];
      dst[c][r] = v;
    }
  }
}

__device__ __forceinline__ void lds4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}
__device__ __forceinline__ void lds4(const double* p, double (&v)[4]) {
  const double2 t0 = reinterpret_cast<const double2*>(p)[0];
  const double2 t1 = reinterpret_cast<const double2*>(p)[1];
  v[0] = t0.x;
  v[1] = t0.y;
  v[2] = t1.x;
  v[3] = t1.y;
}

template <typename acc_t>
__device__ __forceinline__ void fma_step(const acc_t (*zs)[kFmLd], const acc_t (*es)[kFmLd],
                                         int d, int tx, int ty, acc_t (&acc)[4][4]) {
  acc_t a[4], b[4];
  lds4(&zs[d][ty * 4], a);
  lds4(&es[d][tx * 4], b);
#pragma unroll
  for (int rr = 0; rr < 4; ++rr)
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) acc[rr][cc] = dev_fma(a[rr], b[cc], acc[rr][cc]);
}

// row_flags == nullptr: search every row. Otherwise (re-scoring of the 16-bit WMMA path) only
// the rows with row_flags[row] != 0 are searched and written; a block without any flagged row
// returns at once, and the partials of the other rows are left as they are.
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kFmThreads, 2)
    search_fma_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ cb,
                      const typename AccT<scalar_t>::type* __restrict__ mu,
                      const typename AccT<scalar_t>::type* __restrict__ enorm,
                      const int8_t* __restrict__ row_flags, int64_t N, int K, int D,
                      int tiles_per_split, typename AccT<scalar_t>::type* __restrict__ part_score,
                      int* __restrict__ part_idx) {
  using acc_t = typename AccT<scalar_t>::type;
  constexpr int BK = FmBK<acc_t>::value;
  __shared__ __align__(16) acc_t zs[BK][kFmLd];
  __shared__ __align__(16) acc_t es[BK][kFmLd];

  const int tid = threadIdx.x;
  const int tx = tid & 15;  // codes tx*4 .. tx*4+3 of a tile
  const int ty = tid >> 4;  // rows   ty*4 .. ty*4+3 of the block
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  if (row_flags != nullptr) {  // uniform: a kernel argument
    int flagged = 0;
    if (tid < kBM && row0 + tid < N) flagged = row_flags[row0 + tid] != 0;
    if (!__syncthreads_or(flagged)) return;  // reached by every thread of the block
  }
  const int num_tiles = static_cast<int>(ceil_div(K, kBN));
  const int t_begin = static_cast<int>(blockIdx.y) * tiles_per_split;
  const int t_end = min(t_begin + tiles_per_split, num_tiles);
  const bool z_resident = D <= BK;  // single chunk: stage z once

  acc_t best[4];
  int best_k[4];
#pragma unroll
  for (int rr = 0; rr < 4; ++rr) {
    best[rr] = dev_inf<acc_t>();
    best_k[rr] = 0;
  }

  for (int t = t_begin; t < t_end; ++t) {
    const int k0 = t * kBN;
    acc_t acc[4][4];
#pragma unroll
    for (int rr = 0; rr < 4; ++rr)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) acc[rr][cc] = acc_t(0);

    for (int d0 = 0; d0 < D; d0 += BK) {
      __syncthreads();  // previous chunk fully consumed
      if (!z_resident || t == t_begin) stage_fma<scalar_t, kVec>(zs, z, mu, row0, N, D, d0, tid);
      stage_fma<scalar_t, kVec>(es, cb, mu, k0, K, D, d0, tid);
      __syncthreads();
      const int dlim = min(BK, D - d0);
      if (dlim == BK) {
#pragma unroll
        for (int d = 0; d < BK; ++d) fma_step<acc_t>(zs, es, d, tx, ty, acc);
      } else {
        // Zero padding would be an exact no-op; skipping it only saves work.
#pragma unroll 4
        for (int d = 0; d < dlim; ++d) fma_step<acc_t>(zs, es, d, tx, ty, acc);
      }
    }

#pragma unroll
    for (int cc = 0; cc < 4; ++cc) {
      const int k = k0 + tx * 4 + cc;  // increasing within the thread: strict '<' keeps lowest
      if (k < K) {
        const acc_t en = enorm[k];
#pragma unroll
        for (int rr = 0; rr < 4; ++rr) {
          const acc_t s = en - acc_t(2) * acc[rr][cc];
          if (s < best[rr]) {
            best[rr] = s;
            best_k[rr] = k;
          }
        }
      }
    }
  }

  // Merge the 16 threads (same ty, lanes differing in the low 4 bits) that share each row.
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) {
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
      const acc_t os = __shfl_xor_sync(0xffffffffu, best[rr], off);
      const int ok = __shfl_xor_sync(0xffffffffu, best_k[rr], off);
      lex_min(best[rr], best_k[rr], os, ok);
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int rr = 0; rr < 4; ++rr) {
      const int64_t row = row0 + ty * 4 + rr;
      if (row < N && (row_flags == nullptr || row_flags[row] != 0)) {
        const int64_t o = static_cast<int64_t>(blockIdx.y) * N + row;
        part_score[o] = best[rr];
        part_idx[o] = best_k[rr];
      }
    }
  }
}

// --------------------------------------------------------------------------------------------
// 2b. Tensor-core (WMMA) search kernel for fp16 / bf16, sm_80+
// --------------------------------------------------------------------------------------------

constexpr int kWmThreads = 128;      // 4 warps, 2 x 2 over the 64 x 64 tile
constexpr int kWmBK = 64;            // D chunk
constexpr int kWmLdA = kWmBK + 8;    // halfs; multiple of 8 (WMMA ldm rule), 144-byte rows
constexpr int kWmLdC = kBM + 4;      // floats; multiple of 4 (WMMA ldm rule)

template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Stage rows [r0, r0 + kBM) x columns [d0, d0 + kWmBK) of 16-bit src (raw bits) into dst[r][c],
// zero outside [0, nrows) x [0, D). The all-zero bit pattern is +0 in fp16 and bf16.
template <bool kVec>
__device__ __forceinline__ void stage_raw16(uint16_t (*dst)[kWmLdA],
                                            const uint16_t* __restrict__ src, int64_t r0,
                                            int64_t nrows, int D, int d0, int tid) {
  if constexpr (kVec) {
    constexpr int VPR = kWmBK / 8;
    static_assert((kBM * VPR) % kWmThreads == 0, "vector staging must divide evenly");
#pragma unroll
    for (int j = 0; j < kBM * VPR / kWmThreads; ++j) {
      const int idx = tid + j * kWmThreads;
      const int r = idx / VPR;
      const int c = (idx % VPR) * 8;
      const int64_t row = r0 + r;
      const int gd = d0 + c;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row < nrows && gd < D) v = *reinterpret_cast<const uint4*>(src + row * D + gd);
      *reinterpret_cast<uint4*>(&dst[r][c]) = v;
    }
  } else {
    static_assert((kBM * kWmBK) % kWmThreads == 0, "scalar staging must divide evenly");
#pragma unroll 8
    for (int j = 0; j < kBM * kWmBK / kWmThreads; ++j) {
      const int idx = tid + j * kWmThreads;
      const int r = idx / kWmBK;
      const int c = idx % kWmBK;
      const int64_t row = r0 + r;
      const int gd = d0 + c;
      uint16_t v = 0;
      if (row < nrows && gd < D) v = src[row * D + gd];
      dst[r][c] = v;
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kWmThreads)
    search_wmma_kernel(const uint16_t* __restrict__ z, const uint16_t* __restrict__ cb,
                       const float* __restrict__ enorm, int64_t N, int K, int D,
                       int tiles_per_split, float* __restrict__ part_score,
                       int* __restrict__ part_idx) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  __shared__ __align__(128) uint16_t zs[kBM][kWmLdA];
  __shared__ __align__(128) uint16_t es[kBN][kWmLdA];
  __shared__ __align__(128) float sc[kBN][kWmLdC];  // column-major scores: sc[code][row]
  __shared__ float en_s[kBN];
  __shared__ float m_s[kBM];
  __shared__ int m_k[kBM];

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wr = warp >> 1;  // warp's rows  wr*32 .. wr*32+31
  const int wc = warp & 1;   // warp's codes wc*32 .. wc*32+31
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int num_tiles = static_cast<int>(ceil_div(K, kBN));
  const int t_begin = static_cast<int>(blockIdx.y) * tiles_per_split;
  const int t_end = min(t_begin + tiles_per_split, num_tiles);
  const bool z_resident = D <= kWmBK;

  // Scoring: thread scans row my_r, codes my_h*32 .. my_h*32+31 of each tile.
  const int my_r = tid & (kBM - 1);
  const int my_h = tid >> 6;
  float best = dev_inf<float>();
  int best_k = 0;

  for (int t = t_begin; t < t_end; ++t) {
    const int k0 = t * kBN;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int d0 = 0; d0 < D; d0 += kWmBK) {
      __syncthreads();  // previous chunk (and previous tile's sc / en_s) fully consumed
      if (!z_resident || t == t_begin) stage_raw16<kVec>(zs, z, row0, N, D, d0, tid);
      stage_raw16<kVec>(es, cb, k0, K, D, d0, tid);
      __syncthreads();
      const int nsteps = min(kWmBK / 16, (D - d0 + 15) / 16);  // k-steps past D are all zero
      for (int s = 0; s < nsteps; ++s) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(a[i], reinterpret_cast<const T*>(&zs[wr * 32 + i * 16][s * 16]),
                                 kWmLdA);
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(b[j], reinterpret_cast<const T*>(&es[wc * 32 + j * 16][s * 16]),
                                 kWmLdA);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }

    // Element (row m, code n) of a fragment goes to sc[code0 + n][row0 + m].
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&sc[wc * 32 + j * 16][wr * 32 + i * 16], acc[i][j], kWmLdC,
                                wmma::mem_col_major);
    if (tid < kBN) en_s[tid] = (k0 + tid < K) ? enorm[k0 + tid] : 0.0f;
    __syncthreads();

#pragma unroll 8
    for (int c = my_h * 32; c < my_h * 32 + 32; ++c) {
      const int k = k0 + c;
      if (k < K) {
        const float s = en_s[c] - 2.0f * sc[c][my_r];
        if (s < best) {
          best = s;
          best_k = k;
        }
      }
    }
  }

  // Merge the two threads of each row (they live in different warps).
  if (my_h == 1) {
    m_s[my_r] = best;
    m_k[my_r] = best_k;
  }
  __syncthreads();
  if (my_h == 0) {
    lex_min(best, best_k, m_s[my_r], m_k[my_r]);
    const int64_t row = row0 + my_r;
    if (row < N) {
      const int64_t o = static_cast<int64_t>(blockIdx.y) * N + row;
      part_score[o] = best;
      part_idx[o] = best_k;
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // never launched: the host checks the kernel's PTX version first
#endif
}

// --------------------------------------------------------------------------------------------
// 3. Merge splits, gather, per-row squared error (quantized == nullptr: indices only; z and
//    row_err are then not read / written and may be null)
// --------------------------------------------------------------------------------------------

constexpr int kFinThreads = 256;  // 8 warps, one row each (grid-stride)

template <typename scalar_t>
__global__ void __launch_bounds__(kFinThreads)
    finalize_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ cb,
                    const typename AccT<scalar_t>::type* __restrict__ part_score,
                    const int* __restrict__ part_idx, int splits, int64_t N, int K, int D,
                    int64_t* __restrict__ indices, scalar_t* __restrict__ quantized,
                    double* __restrict__ row_err) {
  using acc_t = typename AccT<scalar_t>::type;
  constexpr int kWarps = kFinThreads / 32;
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); i < N;
       i += stride) {
    acc_t bs = dev_inf<acc_t>();
    int bk = 0;
    for (int s = lane; s < splits; s += 32) {
      const int64_t o = static_cast<int64_t>(s) * N + i;
      lex_min(bs, bk, part_score[o], part_idx[o]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const acc_t os = __shfl_xor_sync(0xffffffffu, bs, off);
      const int ok = __shfl_xor_sync(0xffffffffu, bk, off);
      lex_min(bs, bk, os, ok);
    }
    const int64_t k = min(max(bk, 0), K - 1);  // always in range already; defensive

    if (quantized == nullptr) {  // uniform: a kernel argument
      if (lane == 0) indices[i] = k;
      continue;
    }
    const scalar_t* e = cb + k * D;
    const scalar_t* zr = z + i * D;
    scalar_t* q = quantized + i * D;
    acc_t err = acc_t(0);
    for (int d = lane; d < D; d += 32) {
      const scalar_t ev = e[d];
      q[d] = ev;
      const acc_t diff = to_acc<acc_t>(zr[d]) - to_acc<acc_t>(ev);
      err = dev_fma(diff, diff, err);
    }
    err = warp_sum(err);
    if (lane == 0) {
      indices[i] = k;
      row_err[i] = static_cast<double>(err);
    }
  }
}

// --------------------------------------------------------------------------------------------
// 4. Deterministic loss reduction
// --------------------------------------------------------------------------------------------

constexpr int kRedThreads = 256;
constexpr int64_t kRedChunk = 8192;  // rows per partial (fixed: the order depends only on N)

__device__ __forceinline__ double block_sum_fixed(double v, double* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int off = kRedThreads / 2; off > 0; off >>= 1) {
    if (threadIdx.x < off) sh[threadIdx.x] += sh[threadIdx.x + off];
    __syncthreads();
  }
  return sh[0];
}

__global__ void __launch_bounds__(kRedThreads)
    loss_partial_kernel(const double* __restrict__ row_err, int64_t N,
                        double* __restrict__ partials) {
  __shared__ double sh[kRedThreads];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kRedChunk;
  const int64_t end = min(N, begin + kRedChunk);
  double s = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kRedThreads) s += row_err[i];
  s = block_sum_fixed(s, sh);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRedThreads)
    loss_final_kernel(const double* __restrict__ partials, int64_t nparts, double scale,
                      scalar_t* __restrict__ loss) {
  __shared__ double sh[kRedThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < nparts; i += kRedThreads) s += partials[i];
  s = block_sum_fixed(s, sh);
  if (threadIdx.x == 0) {
    if constexpr (std::is_same_v<scalar_t, double>) {
      *loss = s * scale;
    } else {
      *loss = static_cast<scalar_t>(static_cast<float>(s * scale));
    }
  }
}

// --------------------------------------------------------------------------------------------
// Backward kernels
// --------------------------------------------------------------------------------------------

constexpr int kBwdThreads = 256;

// kGradZ: grad_z = gq + g * scale_z * (z - e_idx); kAtomic: cb_acc[idx] += (e_idx - z)
// atomically. gq / grad_z are not read / written (may be null) without kGradZ, cb_acc without
// kAtomic.
template <typename scalar_t, bool kGradZ, bool kAtomic>
__global__ void __launch_bounds__(kBwdThreads)
    bwd_rows_kernel(const scalar_t* __restrict__ gq, const scalar_t* __restrict__ z,
                    const scalar_t* __restrict__ cb, const int64_t* __restrict__ idx,
                    const typename AccT<scalar_t>::type* __restrict__ g,
                    typename AccT<scalar_t>::type scale_z, int64_t N, int K, int D,
                    scalar_t* __restrict__ grad_z,
                    typename AccT<scalar_t>::type* __restrict__ cb_acc) {
  static_assert(kGradZ || kAtomic, "bwd_rows_kernel: nothing to compute");
  using acc_t = typename AccT<scalar_t>::type;
  acc_t coef = acc_t(0);
  if constexpr (kGradZ) coef = g[0] * scale_z;
  const int64_t total = N * D;
  const bool small = total <= static_cast<int64_t>(UINT32_MAX);  // cheaper 32-bit division
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBwdThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x; e < total;
       e += stride) {
    const int64_t i = small ? static_cast<int64_t>(static_cast<uint32_t>(e) /
                                                   static_cast<uint32_t>(D))
                            : e / D;
    const int64_t d = e - i * D;
    const int64_t k = idx[i];
    CUDA_KERNEL_ASSERT_MSG(k >= 0 && k < K, "quantize_bwd: index out of range [0, K)");
    acc_t out = acc_t(0);
    if constexpr (kGradZ) out = to_acc<acc_t>(gq[e]);
    if (k >= 0 && k < K) {
      const int64_t ke = k * D + d;
      const acc_t diff = to_acc<acc_t>(z[e]) - to_acc<acc_t>(cb[ke]);
      if constexpr (kGradZ) out = dev_fma(coef, diff, out);
      if constexpr (kAtomic) atomicAdd(cb_acc + ke, -diff);
    }
    if constexpr (kGradZ) grad_z[e] = static_cast<scalar_t>(out);
  }
}

// The rotation trick's grad_z (Fifty et al., 2024), one warp per row: grad_z = rot(gq) + g *
// scale_z * (z - e_idx), rot(gq) = lam (gq - 2 w (w . gq) + 2 u (q . gq)), u = z / |z|,
// q = e / |e|, lam = |e| / |z|, w = (u + q) / |u + q|. Guards as in vqvae_fast/reference.py:
// gq unchanged when lam is outside [1e-6, 1e6]; w = 0 (a reflection) when |u + q| <= 1e-6.
constexpr int kRotWarps = 8;

template <typename scalar_t>
__global__ void __launch_bounds__(kRotWarps * 32)
    rotation_grad_z_kernel(const scalar_t* __restrict__ gq, const scalar_t* __restrict__ z,
                           const scalar_t* __restrict__ cb, const int64_t* __restrict__ idx,
                           const typename AccT<scalar_t>::type* __restrict__ g,
                           typename AccT<scalar_t>::type scale_z, int64_t N, int K, int D,
                           scalar_t* __restrict__ grad_z) {
  using acc_t = typename AccT<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRotWarps + (threadIdx.x >> 5);
  if (i >= N) return;
  const int64_t k = idx[i];
  CUDA_KERNEL_ASSERT_MSG(k >= 0 && k < K, "quantize_bwd: index out of range [0, K)");
  if (k < 0 || k >= K) return;
  const scalar_t* zr = z + i * D;
  const scalar_t* er = cb + k * D;
  const scalar_t* gr = gq + i * D;
  acc_t zz = 0, ee = 0, gz = 0, ge = 0;
  for (int d = lane; d < D; d += 32) {
    const acc_t zv = to_acc<acc_t>(zr[d]), ev = to_acc<acc_t>(er[d]), gv = to_acc<acc_t>(gr[d]);
    zz = dev_fma(zv, zv, zz);
    ee = dev_fma(ev, ev, ee);
    gz = dev_fma(gv, zv, gz);
    ge = dev_fma(gv, ev, ge);
  }
  zz = warp_sum(zz);
  ee = warp_sum(ee);
  gz = warp_sum(gz);
  ge = warp_sum(ge);
  const acc_t nz = sqrt(zz), ne = sqrt(ee);
  const acc_t max_scale = acc_t(1e6), min_sum = acc_t(1e-6);
  const bool regular = nz > acc_t(0) && nz * max_scale >= ne && ne * max_scale >= nz;
  acc_t ns = 1, wg = 0, qg = 0, lam = 1;
  bool reflect = true;
  if (regular) {  // |u + q|, summed directly: 2 + 2 u.q cancels when z points away from e
    acc_t ss = 0;
    for (int d = lane; d < D; d += 32) {
      const acc_t s = to_acc<acc_t>(zr[d]) / nz + to_acc<acc_t>(er[d]) / ne;
      ss = dev_fma(s, s, ss);
    }
    ns = sqrt(warp_sum(ss));
    reflect = !(ns > min_sum);
    wg = reflect ? acc_t(0) : (gz / nz + ge / ne) / ns;
    qg = ge / ne;
    lam = ne / nz;
  }
  const acc_t coef = g[0] * scale_z;
  for (int d = lane; d < D; d += 32) {
    const acc_t zv = to_acc<acc_t>(zr[d]), ev = to_acc<acc_t>(er[d]), gv = to_acc<acc_t>(gr[d]);
    acc_t out = gv;
    if (regular) {
      const acc_t u = zv / nz;
      const acc_t w = reflect ? acc_t(0) : (u + ev / ne) / ns;
      out = lam * (gv - acc_t(2) * w * wg + acc_t(2) * u * qg);
    }
    grad_z[i * D + d] = static_cast<scalar_t>(dev_fma(coef, zv - ev, out));
  }
}

// grad_cb = g * scale_c * cb_acc  (atomic path)
template <typename scalar_t>
__global__ void __launch_bounds__(kBwdThreads)
    cb_finalize_kernel(const typename AccT<scalar_t>::type* __restrict__ cb_acc,
                       const typename AccT<scalar_t>::type* __restrict__ g,
                       typename AccT<scalar_t>::type scale_c, int64_t total,
                       scalar_t* __restrict__ grad_cb) {
  using acc_t = typename AccT<scalar_t>::type;
  const acc_t coef = g[0] * scale_c;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kBwdThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kBwdThreads + threadIdx.x; e < total;
       e += stride)
    grad_cb[e] = static_cast<scalar_t>(coef * cb_acc[e]);
}

__device__ __forceinline__ int64_t lower_bound_dev(const int64_t* __restrict__ a, int64_t n,
                                                   int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

constexpr int kSegLanes = 16;  // row lanes per block (blockDim = 32 x kSegLanes)

// Deterministic grad_cb: block (k, column chunk) sums its segment of the stably sorted rows.
template <typename scalar_t>
__global__ void __launch_bounds__(32 * kSegLanes)
    grad_cb_segment_kernel(const int64_t* __restrict__ sorted_idx,
                           const int64_t* __restrict__ perm, const scalar_t* __restrict__ z,
                           const scalar_t* __restrict__ cb,
                           const typename AccT<scalar_t>::type* __restrict__ g,
                           typename AccT<scalar_t>::type scale_c, int64_t N, int D,
                           scalar_t* __restrict__ grad_cb) {
  using acc_t = typename AccT<scalar_t>::type;
  __shared__ int64_t seg[2];
  __shared__ acc_t red[kSegLanes][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t k = blockIdx.x;
  const int d = static_cast<int>(blockIdx.y) * 32 + tx;
  if (tx == 0 && ty == 0) {
    seg[0] = lower_bound_dev(sorted_idx, N, k);
    seg[1] = lower_bound_dev(sorted_idx, N, k + 1);
  }
  __syncthreads();
  const int64_t begin = seg[0], end = seg[1];
  acc_t s = acc_t(0);
  if (d < D) {
    const acc_t ev = to_acc<acc_t>(cb[k * D + d]);
#pragma unroll 4
    for (int64_t j = begin + ty; j < end; j += kSegLanes) {
      const int64_t i = perm[j];
      s += ev - to_acc<acc_t>(z[i * D + d]);
    }
  }
  red[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && d < D) {
    acc_t tot = red[0][tx];
#pragma unroll
    for (int q = 1; q < kSegLanes; ++q) tot += red[q][tx];
    grad_cb[k * D + d] = static_cast<scalar_t>((g[0] * scale_c) * tot);
  }
}

// --------------------------------------------------------------------------------------------
// Host side
// --------------------------------------------------------------------------------------------

constexpr int64_t kMaxK = int64_t(1) << 30;
constexpr int64_t kMaxD = int64_t(65535) * 32;

void check_inputs(const at::Tensor& z, const at::Tensor& codebook, const char* op) {
  TORCH_CHECK(z.dim() == 2, op, ": z must be a 2-D tensor (N, D), got shape ", z.sizes());
  TORCH_CHECK(codebook.dim() == 2, op, ": codebook must be a 2-D tensor (K, D), got shape ",
              codebook.sizes());
  TORCH_CHECK(z.size(1) == codebook.size(1), op,
              ": z and codebook must have the same last dimension D, got z ", z.sizes(),
              " and codebook ", codebook.sizes());
  TORCH_CHECK(z.scalar_type() == codebook.scalar_type(), op,
              ": z and codebook must have the same dtype, got ", z.scalar_type(), " and ",
              codebook.scalar_type());
  const auto st = z.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              op, ": unsupported dtype ", st,
              " (expected float32, float16, bfloat16 or float64)");
  TORCH_CHECK(z.is_cuda() && codebook.is_cuda(), op,
              ": z and codebook must both be CUDA tensors, got ", z.device(), " and ",
              codebook.device());
  TORCH_CHECK(z.device() == codebook.device(), op,
              ": z and codebook must be on the same device, got ", z.device(), " and ",
              codebook.device());
  TORCH_CHECK(codebook.size(0) > 0, op, ": codebook must have at least one code (K >= 1)");
  TORCH_CHECK(codebook.size(0) < kMaxK, op, ": too many codes (K = ", codebook.size(0),
              ", limit ", kMaxK, ")");
  TORCH_CHECK(z.size(1) <= kMaxD, op, ": D = ", z.size(1), " is too large (limit ", kMaxD, ")");
}

int grid_for(int64_t work, int threads) {
  const int64_t cap = int64_t(1) << 20;
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(work, threads), cap)));
}

int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

// The WMMA kernel is compiled for real only when __CUDA_ARCH__ >= 800; ask the runtime which
// PTX architecture the loaded image was built for (cached per device).
bool wmma_available() {
  const int dev = c10::cuda::current_device();
  constexpr int kMaxDev = 64;
  static std::atomic<int> cache[kMaxDev];  // 0 unknown, 1 no, 2 yes
  if (dev >= 0 && dev < kMaxDev) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c != 0) return c == 2;
  }
  bool ok = false;
  if (device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8) {
    cudaFuncAttributes attr;
    const cudaError_t err = cudaFuncGetAttributes(&attr, search_wmma_kernel<__half, false>);
    if (err == cudaSuccess) {
      ok = attr.ptxVersion >= 80;
    } else {
      (void)cudaGetLastError();  // clear the (non-sticky) error
    }
  }
  if (dev >= 0 && dev < kMaxDev) cache[dev].store(ok ? 2 : 1, std::memory_order_relaxed);
  return ok;
}

bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Per-column centre c (shape (D,), accumulation dtype), computed with ATen on the current
// stream (no host synchronisation). c_d = the mean of the finite entries of column d, 0 if it
// has none or if that mean is not finite (the fp32 / fp64 sum overflowed).
// narrow16 (16-bit WMMA path): c_d = 0 unless the column's finite entries also satisfy
// max - min <= |mean| / 4; then c_d = the mean rounded to the 16-bit dtype (as a float). Every
// finite centred code entry e - c_d is then exact in the 16-bit dtype (so in fp32 too): see
// _column_centre in vqvae_fast/ops/triton_nearest_code.py, which uses the same rule.
at::Tensor column_centre(const at::Tensor& cbc, const at::Tensor& finite, const at::Tensor& cb_acc,
                         bool narrow16) {
  const at::Tensor count = finite.sum(0);  // int64 (D,)
  const at::Tensor mean = at::where(finite, cb_acc, 0.0).sum(0) / count.clamp_min(1);
  at::Tensor centre = mean;
  if (narrow16) {
    const double inf = std::numeric_limits<double>::infinity();
    const at::Tensor low = at::where(finite, cb_acc, inf).amin(0);
    const at::Tensor high = at::where(finite, cb_acc, -inf).amax(0);
    const at::Tensor narrow = count.gt(0).logical_and((high - low).le(mean.abs() * 0.25));
    centre = at::where(narrow, mean.to(cbc.scalar_type()).to(cb_acc.scalar_type()), 0.0);
  }
  return centre.nan_to_num(0.0, 0.0, 0.0).contiguous();
}

// quantized == nullptr (and loss == nullptr): nearest_code, indices only (no gather, no loss).
template <typename scalar_t>
void launch_forward(const at::Tensor& zc, const at::Tensor& cbc, double beta,
                    at::Tensor& indices, at::Tensor* quantized, at::Tensor* loss,
                    const char* op) {
  using acc_t = typename AccT<scalar_t>::type;
  constexpr bool kIsDouble = std::is_same_v<scalar_t, double>;
  constexpr bool kIs16 =
      std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;
  TORCH_INTERNAL_ASSERT((quantized == nullptr) == (loss == nullptr));
  const auto acc_dtype = kIsDouble ? at::kDouble : at::kFloat;
  const int64_t N = zc.size(0);
  const int K = static_cast<int>(cbc.size(0));
  const int D = static_cast<int>(zc.size(1));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_opts = zc.options().dtype(acc_dtype);

  const scalar_t* z_ptr = zc.data_ptr<scalar_t>();
  const scalar_t* cb_ptr = cbc.data_ptr<scalar_t>();

  bool use_wmma = false;
  if constexpr (kIs16) use_wmma = wmma_available();

  // Centre and code norms ||e_k - c||^2 (+inf for codes with a non-finite entry).
  const at::Tensor finite = cbc.isfinite();
  const at::Tensor cb_acc = cbc.to(acc_dtype);  // no copy for fp32 / fp64
  const at::Tensor centre = column_centre(cbc, finite, cb_acc, /*narrow16=*/use_wmma);
  const acc_t* mu_ptr = centre.data_ptr<acc_t>();
  at::Tensor enorm = at::empty({K}, acc_opts);
  code_norm_kernel<scalar_t>
      <<<static_cast<unsigned>(ceil_div(K, kNormThreads / 32)), kNormThreads, 0, stream>>>(
          cb_ptr, mu_ptr, K, D, enorm.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Grid: 64-row blocks x code-tile splits (splits only when there are too few row blocks).
  const int64_t row_blocks = ceil_div(N, kBM);
  TORCH_CHECK(row_blocks <= std::numeric_limits<int>::max(), op, ": N too large");
  const int num_tiles = static_cast<int>(ceil_div(K, kBN));
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount);
  const int64_t target_blocks = int64_t(4) * sms;
  int64_t splits = 1;
  if (row_blocks < target_blocks) splits = ceil_div(target_blocks, row_blocks);
  splits = std::min<int64_t>({splits, num_tiles, 65535});
  const int tiles_per_split = static_cast<int>(ceil_div(num_tiles, splits));
  splits = ceil_div(num_tiles, tiles_per_split);  // no empty split

  at::Tensor part_score = at::empty({splits, N}, acc_opts);
  at::Tensor part_idx = at::empty({splits, N}, zc.options().dtype(at::kInt));
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(splits));

  constexpr int kVecElems = 16 / static_cast<int>(sizeof(scalar_t));
  const bool vec = (D % kVecElems == 0) && aligned16(z_ptr) && aligned16(cb_ptr);

  // 16-bit tensor-core path: search on centred 16-bit operands, then re-score (FMA kernel,
  // below) the rows whose centred z is not exact in 16 bits.
  at::Tensor inexact;  // int8 (N,): 1 = re-score the row; kept alive until the launch below
  const int8_t* flags_ptr = nullptr;
  if constexpr (kIs16) {
    if (use_wmma) {
      const auto st = zc.scalar_type();
      // Exact (column_centre); codes with a non-finite entry are zeroed (their norm is +inf),
      // so the norms above are bitwise those of these centred operands.
      const at::Tensor row_ok = finite.all(1, /*keepdim=*/true);
      const at::Tensor cb16 = at::where(row_ok, cb_acc - centre, 0.0).to(st).contiguous();
      const at::Tensor zf = zc.to(at::kFloat) - centre;
      // Largest finite 16-bit value: a centred z beyond it is clamped (and so flagged) rather
      // than turned into Inf.
      const double lim =
          std::is_same_v<scalar_t, at::Half> ? 65504.0 : 3.3895313892515355e38;
      const at::Tensor z16 = zf.clamp(-lim, lim).to(st).contiguous();
      // Only finite values are flagged: re-scoring cannot help a NaN / Inf row.
      inexact = z16.to(at::kFloat).ne(zf).logical_and(zf.isfinite()).any(1).to(at::kChar)
                    .contiguous();
      flags_ptr = inexact.data_ptr<int8_t>();

      using T = typename WmmaType<scalar_t>::type;
      const auto* zr = reinterpret_cast<const uint16_t*>(z16.data_ptr<scalar_t>());
      const auto* cr = reinterpret_cast<const uint16_t*>(cb16.data_ptr<scalar_t>());
      const bool vec16 = (D % 8 == 0) && aligned16(zr) && aligned16(cr);
      if (vec16) {
        search_wmma_kernel<T, true><<<grid, kWmThreads, 0, stream>>>(
            zr, cr, enorm.data_ptr<float>(), N, K, D, tiles_per_split,
            part_score.data_ptr<float>(), part_idx.data_ptr<int>());
      } else {
        search_wmma_kernel<T, false><<<grid, kWmThreads, 0, stream>>>(
            zr, cr, enorm.data_ptr<float>(), N, K, D, tiles_per_split,
            part_score.data_ptr<float>(), part_idx.data_ptr<int>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  // FMA search: every row (fp32, fp64, 16-bit without WMMA), or (WMMA path) only the flagged
  // rows, on the original operands centred by c, overwriting their WMMA partials (same grid,
  // same partial layout).
  if (vec) {
    search_fma_kernel<scalar_t, true><<<grid, kFmThreads, 0, stream>>>(
        z_ptr, cb_ptr, mu_ptr, enorm.data_ptr<acc_t>(), flags_ptr, N, K, D, tiles_per_split,
        part_score.data_ptr<acc_t>(), part_idx.data_ptr<int>());
  } else {
    search_fma_kernel<scalar_t, false><<<grid, kFmThreads, 0, stream>>>(
        z_ptr, cb_ptr, mu_ptr, enorm.data_ptr<acc_t>(), flags_ptr, N, K, D, tiles_per_split,
        part_score.data_ptr<acc_t>(), part_idx.data_ptr<int>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (quantized == nullptr) {
    finalize_kernel<scalar_t><<<grid_for(N, kFinThreads / 32), kFinThreads, 0, stream>>>(
        nullptr, cb_ptr, part_score.data_ptr<acc_t>(), part_idx.data_ptr<int>(),
        static_cast<int>(splits), N, K, D, indices.data_ptr<int64_t>(), nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  at::Tensor row_err = at::empty({N}, zc.options().dtype(at::kDouble));
  finalize_kernel<scalar_t><<<grid_for(N, kFinThreads / 32), kFinThreads, 0, stream>>>(
      z_ptr, cb_ptr, part_score.data_ptr<acc_t>(), part_idx.data_ptr<int>(),
      static_cast<int>(splits), N, K, D, indices.data_ptr<int64_t>(),
      quantized->data_ptr<scalar_t>(), row_err.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t nparts = ceil_div(N, kRedChunk);
  at::Tensor partials = at::empty({nparts}, zc.options().dtype(at::kDouble));
  loss_partial_kernel<<<static_cast<unsigned>(nparts), kRedThreads, 0, stream>>>(
      row_err.data_ptr<double>(), N, partials.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const double scale = (1.0 + beta) / (static_cast<double>(N) * static_cast<double>(D));
  loss_final_kernel<scalar_t><<<1, kRedThreads, 0, stream>>>(
      partials.data_ptr<double>(), nparts, scale, loss->data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dispatch_forward(const at::Tensor& zc, const at::Tensor& cbc, double beta,
                      at::Tensor& indices, at::Tensor* quantized, at::Tensor* loss,
                      const char* op) {
  switch (zc.scalar_type()) {
    case at::kFloat:
      launch_forward<float>(zc, cbc, beta, indices, quantized, loss, op);
      break;
    case at::kDouble:
      launch_forward<double>(zc, cbc, beta, indices, quantized, loss, op);
      break;
    case at::kHalf:
      launch_forward<at::Half>(zc, cbc, beta, indices, quantized, loss, op);
      break;
    case at::kBFloat16:
      launch_forward<at::BFloat16>(zc, cbc, beta, indices, quantized, loss, op);
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", zc.scalar_type());
  }
}

at::Tensor nearest_code_cuda(const at::Tensor& z, const at::Tensor& codebook) {
  check_inputs(z, codebook, "nearest_code");
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  const at::Tensor cbc = codebook.contiguous();
  const int64_t N = zc.size(0);
  const int64_t D = zc.size(1);

  at::Tensor indices = at::empty({N}, zc.options().dtype(at::kLong));
  if (N == 0) return indices;
  if (D == 0) {  // every code is at distance 0: the lowest index wins
    indices.zero_();
    return indices;
  }
  dispatch_forward(zc, cbc, 0.0, indices, nullptr, nullptr, "nearest_code");
  return indices;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_fwd_cuda(const at::Tensor& z,
                                                                 const at::Tensor& codebook,
                                                                 double beta,
                                                                 bool /*rotation: the backward's*/) {
  check_inputs(z, codebook, "quantize_fwd");
  const c10::cuda::CUDAGuard guard(z.device());
  const at::Tensor zc = z.contiguous();
  const at::Tensor cbc = codebook.contiguous();
  const int64_t N = zc.size(0);
  const int64_t D = zc.size(1);

  at::Tensor indices = at::empty({N}, zc.options().dtype(at::kLong));
  at::Tensor quantized = at::empty({N, D}, cbc.options());
  if (N == 0 || D == 0) {
    // D == 0: every code is at distance 0, the lowest index wins. The loss is 0/0.
    indices.zero_();
    at::Tensor loss = at::full({}, std::numeric_limits<double>::quiet_NaN(), zc.options());
    return {quantized, indices, loss};
  }
  at::Tensor loss = at::empty({}, zc.options());
  dispatch_forward(zc, cbc, beta, indices, &quantized, &loss, "quantize_fwd");
  return {quantized, indices, loss};
}

// gq / grad_z: undefined when !need_z; grad_cb: undefined when !need_cb (at least one needed).
template <typename scalar_t>
void launch_backward(const at::Tensor& gq, const at::Tensor& g, const at::Tensor& zc,
                     const at::Tensor& cbc, const at::Tensor& idx, double beta, bool need_z,
                     bool need_cb, bool rotation, at::Tensor& grad_z, at::Tensor& grad_cb) {
  using acc_t = typename AccT<scalar_t>::type;
  const int64_t N = zc.size(0);
  const int K = static_cast<int>(cbc.size(0));
  const int D = static_cast<int>(zc.size(1));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const double nd = static_cast<double>(N) * static_cast<double>(D);
  const acc_t scale_z = static_cast<acc_t>(2.0 * beta / nd);
  const acc_t scale_c = static_cast<acc_t>(2.0 / nd);
  const int64_t total = N * D;
  const acc_t* g_ptr = g.data_ptr<acc_t>();
  const scalar_t* gq_ptr = need_z ? gq.data_ptr<scalar_t>() : nullptr;
  scalar_t* grad_z_ptr = need_z ? grad_z.data_ptr<scalar_t>() : nullptr;
  const int rows_grid = grid_for(total, kBwdThreads);

  if (rotation && need_z) {  // grad_z by its own row kernel; the codebook's as without rotation
    rotation_grad_z_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(N, kRotWarps)),
                                       kRotWarps * 32, 0, stream>>>(
        gq_ptr, zc.data_ptr<scalar_t>(), cbc.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(), g_ptr,
        scale_z, N, K, D, grad_z_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!need_cb) return;
    need_z = false;
  }

  if (at::globalContext().deterministicAlgorithms()) {
    if (need_z) {
      bwd_rows_kernel<scalar_t, true, false><<<rows_grid, kBwdThreads, 0, stream>>>(
          gq_ptr, zc.data_ptr<scalar_t>(), cbc.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
          g_ptr, scale_z, N, K, D, grad_z_ptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_cb) {
      auto sorted = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
      const at::Tensor sorted_idx = std::get<0>(sorted).contiguous();
      const at::Tensor perm = std::get<1>(sorted).contiguous();
      const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(ceil_div(D, 32)));
      const dim3 block(32, kSegLanes);
      grad_cb_segment_kernel<scalar_t><<<grid, block, 0, stream>>>(
          sorted_idx.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), zc.data_ptr<scalar_t>(),
          cbc.data_ptr<scalar_t>(), g_ptr, scale_c, N, D, grad_cb.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else if (need_cb) {
    at::Tensor cb_acc = at::zeros({K, D}, zc.options().dtype(g.scalar_type()));
    if (need_z) {
      bwd_rows_kernel<scalar_t, true, true><<<rows_grid, kBwdThreads, 0, stream>>>(
          gq_ptr, zc.data_ptr<scalar_t>(), cbc.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
          g_ptr, scale_z, N, K, D, grad_z_ptr, cb_acc.data_ptr<acc_t>());
    } else {
      bwd_rows_kernel<scalar_t, false, true><<<rows_grid, kBwdThreads, 0, stream>>>(
          nullptr, zc.data_ptr<scalar_t>(), cbc.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
          g_ptr, scale_z, N, K, D, nullptr, cb_acc.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t kd = static_cast<int64_t>(K) * D;
    cb_finalize_kernel<scalar_t><<<grid_for(kd, kBwdThreads), kBwdThreads, 0, stream>>>(
        cb_acc.data_ptr<acc_t>(), g_ptr, scale_c, kd, grad_cb.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {  // grad_z only
    bwd_rows_kernel<scalar_t, true, false><<<rows_grid, kBwdThreads, 0, stream>>>(
        gq_ptr, zc.data_ptr<scalar_t>(), cbc.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
        g_ptr, scale_z, N, K, D, grad_z_ptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_bwd_cuda(
    const at::Tensor& grad_quantized, const at::Tensor& grad_loss, const at::Tensor& z,
    const at::Tensor& codebook, const at::Tensor& indices, double beta, bool need_grad_z,
    bool need_grad_codebook, bool rotation) {
  check_inputs(z, codebook, "quantize_bwd");
  const int64_t N = z.size(0);
  const int64_t D = z.size(1);
  const int64_t K = codebook.size(0);
  TORCH_CHECK(grad_quantized.dim() == 2 && grad_quantized.size(0) == N &&
                  grad_quantized.size(1) == D,
              "quantize_bwd: grad_quantized must have shape ", z.sizes(), ", got ",
              grad_quantized.sizes());
  TORCH_CHECK(grad_quantized.is_floating_point(),
              "quantize_bwd: grad_quantized must be a floating tensor, got ",
              grad_quantized.scalar_type());
  TORCH_CHECK(grad_loss.numel() == 1, "quantize_bwd: grad_loss must have one element, got shape ",
              grad_loss.sizes());
  TORCH_CHECK(grad_loss.is_floating_point(), "quantize_bwd: grad_loss must be a floating tensor");
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == N,
              "quantize_bwd: indices must have shape (N,) = (", N, ",), got ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, "quantize_bwd: indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK(grad_quantized.device() == z.device() && grad_loss.device() == z.device() &&
                  indices.device() == z.device(),
              "quantize_bwd: all tensors must be on ", z.device(), " (grad_quantized on ",
              grad_quantized.device(), ", grad_loss on ", grad_loss.device(), ", indices on ",
              indices.device(), ")");

  const c10::cuda::CUDAGuard guard(z.device());
  // A gradient that is not needed: an empty tensor, nothing computed or launched for it.
  at::Tensor grad_z = at::empty({0}, z.options());
  at::Tensor grad_cb = at::empty({0}, codebook.options());
  if (!need_grad_z && !need_grad_codebook) return {grad_z, grad_cb};

  const at::Tensor zc = z.contiguous();
  const at::Tensor cbc = codebook.contiguous();
  if (need_grad_z) grad_z = at::empty({N, D}, zc.options());
  if (need_grad_codebook) grad_cb = at::empty({K, D}, cbc.options());
  if (N == 0 || D == 0) {
    if (need_grad_codebook) grad_cb.zero_();
    return {grad_z, grad_cb};
  }
  at::Tensor gq;
  if (need_grad_z) gq = grad_quantized.to(zc.scalar_type()).contiguous();
  const at::Tensor idx = indices.contiguous();
  const auto acc_dtype = zc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_loss.reshape({}).to(acc_dtype).contiguous();

  switch (zc.scalar_type()) {
    case at::kFloat:
      launch_backward<float>(gq, g, zc, cbc, idx, beta, need_grad_z, need_grad_codebook, rotation,
                             grad_z, grad_cb);
      break;
    case at::kDouble:
      launch_backward<double>(gq, g, zc, cbc, idx, beta, need_grad_z, need_grad_codebook, rotation,
                              grad_z, grad_cb);
      break;
    case at::kHalf:
      launch_backward<at::Half>(gq, g, zc, cbc, idx, beta, need_grad_z, need_grad_codebook, rotation,
                                grad_z, grad_cb);
      break;
    case at::kBFloat16:
      launch_backward<at::BFloat16>(gq, g, zc, cbc, idx, beta, need_grad_z,
                                    need_grad_codebook, rotation, grad_z, grad_cb);
      break;
    default:
      TORCH_CHECK(false, "quantize_bwd: unsupported dtype ", zc.scalar_type());
  }
  return {grad_z, grad_cb};
}

}  // namespace
}  // namespace vqvae_fast

TORCH_LIBRARY_IMPL(vqvae_fast, CUDA, m) {
  m.impl("nearest_code", &vqvae_fast::nearest_code_cuda);
  m.impl("quantize_fwd", &vqvae_fast::quantize_fwd_cuda);
  m.impl("quantize_bwd", &vqvae_fast::quantize_bwd_cuda);
}
