// CPU kernels of vqvae_fast::nearest_code, quantize_fwd and quantize_bwd
// (schemas in csrc/ops.cpp).
//
// Forward, for z (N, D) and codebook (K, D):
//   1. Centre everything on the codebook mean mu (double, per column over its finite
//      entries): a shared offset (say all vectors near +1000) would otherwise be lost to
//      cancellation in ||z||^2 - 2 z.e + ||e||^2. Codes with a NaN/Inf entry are never chosen
//      (unless every code has one) and do not change the centre.
//   2. For blocks of R rows, score every code with one float32 GEMM:
//        s_k = ||e_k - mu||^2 - 2 (z_i - mu).(e_k - mu)     (= ||z_i - e_k||^2 - const_i)
//      into a per-thread R x K buffer that stays in cache (nothing is N x K).
//   3. Re-score exactly, in double from the original values, every code whose float
//      score is within a rigorous error bound of the row's best float score, and keep
//      the smallest exact distance (ties -> lowest index). The chosen code therefore has
//      the true minimum distance up to double rounding, and its exact distance is the
//      row's term of the loss.
// Rows whose float scores could overflow, or with NaN/Inf, are scanned exactly over all
// finite codes; if no distance compares smaller than +inf (all NaN/Inf) the index is 0.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace vqvae_fast {
namespace {

using at::Tensor;

// Size of the per-thread float work tile (R rows of scores and of centred z).
constexpr int64_t kTileFloats = 128 * 1024;  // 512 KiB

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
  int64_t s0, s1;
  explicit View2D(const Tensor& t) : data(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)) {}
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

// Exact (double) squared Euclidean distance between two rows of length D.
inline double sq_dist(const double* a, const double* b, int64_t D) {
  double s = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double t = a[d] - b[d];
    s += t * t;
  }
  return s;
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

// Fills indices (N,) and, unless quantized is null, quantized (N, D, contiguous); returns
// sum_i ||z_i - e_{idx_i}||^2.
template <typename scalar_t>
double nearest_code_kernel(const Tensor& z, const Tensor& codebook, int64_t* indices,
                           scalar_t* quantized) {
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  const View2D<scalar_t> Z(z), E(codebook);

  // Codebook: exact values in double; mu = per-column mean of the finite entries.
  std::vector<double> e64(K * D);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t d = 0; d < D; ++d) e64[k * D + d] = to_double(E(k, d));
  std::vector<double> mu(D, 0.0), count(D, 0.0);
  std::vector<char> code_finite(K, 1);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t d = 0; d < D; ++d) {
      const double v = e64[k * D + d];
      if (std::isfinite(v)) {
        mu[d] += v;
        count[d] += 1.0;
      } else {
        code_finite[k] = 0;
      }
    }
  }
  for (int64_t d = 0; d < D; ++d) mu[d] = count[d] > 0 ? mu[d] / count[d] : 0.0;

  // Centred float copy scaled by -2 (exact), norms; non-finite codes score +inf.
  Tensor ec_m2 = at::empty({K, D}, z.options().dtype(at::kFloat));
  float* ecp = ec_m2.data_ptr<float>();
  std::vector<float> e_norm(K);
  double max_norm2 = 0.0;
  bool norms_finite = true;
  for (int64_t k = 0; k < K; ++k) {
    double n2 = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const float c = code_finite[k] ? static_cast<float>(e64[k * D + d] - mu[d]) : 0.0f;
      ecp[k * D + d] = -2.0f * c;
      n2 += static_cast<double>(c) * c;
    }
    if (!code_finite[k]) {
      e_norm[k] = std::numeric_limits<float>::infinity();
      continue;
    }
    e_norm[k] = static_cast<float>(n2);
    norms_finite = norms_finite && std::isfinite(n2) && std::isfinite(e_norm[k]);
    max_norm2 = std::max(max_norm2, n2);
  }
  // M2 = max over finite codes of ||e_k - mu||^2; +inf sends every row to the exact scan.
  const double M2 = norms_finite ? max_norm2 : std::numeric_limits<double>::infinity();
  const double M = std::sqrt(M2);
  const Tensor ecT = ec_m2.t();  // (D, K)

  // Float score error (one code) <= ~(D + 2) * u * (M2 + 2 ||zc|| M) from the GEMM, the
  // norms and the centring; two codes and a factor 2 of safety give the tolerance below.
  // Underflow adds at most (D + 1) * 2^-149 per score.
  const double unit = std::ldexp(1.0, -24);
  const double rel_tol = 4.0 * static_cast<double>(D + 4) * unit;
  const double abs_tol = static_cast<double>(D + 4) * std::ldexp(1.0, -147);
  const double overflow_guard = 1e38;  // < FLT_MAX / 3: no float score can overflow

  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t R = std::clamp<int64_t>(kTileFloats / (K + D), 16, 4096);
  R = std::max<int64_t>(1, std::min(R, ceil_div(N, nthreads)));
  const int64_t nblocks = ceil_div(N, R);

  std::vector<double> row_err(N);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    Tensor zc = at::empty({R, D}, z.options().dtype(at::kFloat));
    Tensor dots = at::empty({R, K}, z.options().dtype(at::kFloat));
    float* zcp = zc.data_ptr<float>();
    const float* dp = dots.const_data_ptr<float>();
    std::vector<double> z64(R * D);
    std::vector<double> zc_norm2(R);

    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * R, r = std::min(R, N - i0);
      for (int64_t t = 0; t < r; ++t) {
        double n2 = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const double v = to_double(Z(i0 + t, d));
          const float c = static_cast<float>(v - mu[d]);
          z64[t * D + d] = v;
          zcp[t * D + d] = c;
          n2 += static_cast<double>(c) * c;
        }
        zc_norm2[t] = n2;
      }
      Tensor out = dots.narrow(0, 0, r);
      at::mm_out(out, zc.narrow(0, 0, r), ecT);  // -2 (z - mu).(e - mu)

      for (int64_t t = 0; t < r; ++t) {
        const int64_t i = i0 + t;
        const double* zr = z64.data() + t * D;
        const float* row = dp + t * K;
        int64_t best = -1;
        double best_dist = std::numeric_limits<double>::infinity();
        auto recheck = [&](int64_t k) {
          const double dist = sq_dist(zr, e64.data() + k * D, D);
          if (dist < best_dist) {
            best_dist = dist;
            best = k;
          }
        };
        const double bound = M2 + 2.0 * std::sqrt(zc_norm2[t]) * M;
        if (bound < overflow_guard) {  // false for NaN/Inf
          const float s_min = min_score(row, e_norm.data(), K);
          const double threshold = static_cast<double>(s_min) + rel_tol * bound + abs_tol;
          for (int64_t k = 0; k < K; ++k) {
            if (static_cast<double>(e_norm[k] + row[k]) <= threshold) recheck(k);
          }
        } else {
          for (int64_t k = 0; k < K; ++k) recheck(k);
        }
        if (best < 0) {  // every distance NaN or +inf
          best = 0;
          best_dist = sq_dist(zr, e64.data(), D);
        }
        indices[i] = best;
        row_err[i] = best_dist;
        if (quantized != nullptr) {
          scalar_t* q = quantized + i * D;
          for (int64_t d = 0; d < D; ++d) q[d] = E(best, d);
        }
      }
    }
  });

  double sum = 0.0;  // in row order: independent of the thread count
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

}  // namespace

TORCH_LIBRARY_IMPL(vqvae_fast, CPU, m) {
  m.impl("nearest_code", &nearest_code_cpu);
  m.impl("quantize_fwd", &quantize_fwd_cpu);
  m.impl("quantize_bwd", &quantize_bwd_cpu);
}

}  // namespace vqvae_fast
