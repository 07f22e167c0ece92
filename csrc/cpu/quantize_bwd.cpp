// CPU kernel of vqvae_fast::quantize_bwd (schema in csrc/ops.cpp; registered in nearest_code.cpp):
// the straight-through (or rotation trick) gradient of z and the gradient of the codebook, in double.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace vqvae_fast {

using at::Tensor;

namespace {

// The rotation trick (Fifty et al., 2024) applied to one row's incoming gradient g, in place:
// g <- lam * (g - 2 w (w . g) + 2 u (q . g)) with u = z / |z|, q = e / |e|, lam = |e| / |z|,
// w = (u + q) / |u + q|. Guards as in vqvae_fast/reference.py: g is left as it is (straight
// through) when lam is outside [1e-6, 1e6] or NaN (a NaN entry), and w = 0 (a reflection) when
// |u + q| <= 1e-6.
constexpr double kRotationMaxScale = 1e6;
constexpr double kRotationMinSum = 1e-6;

void rotate_gradient(double* g, const double* z, const double* e, int64_t D) {
  // z and e are read scaled by one power of two, their largest finite entry to [0.5, 1)
  // (exact): the result depends only on their directions and norms' ratio, but |z|^2 would
  // underflow below ~1e-162 and overflow beyond ~1e154. Clamped: 2^1074 would overflow.
  double peak = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    if (std::isfinite(z[d])) peak = std::max(peak, std::abs(z[d]));
    if (std::isfinite(e[d])) peak = std::max(peak, std::abs(e[d]));
  }
  int exponent = 0;
  std::frexp(peak, &exponent);
  const double s = std::ldexp(1.0, -std::clamp(exponent, -1000, 1000));
  double zz = 0.0, ee = 0.0, gz = 0.0, ge = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double zd = z[d] * s, ed = e[d] * s;
    zz += zd * zd;
    ee += ed * ed;
    gz += g[d] * zd;
    ge += g[d] * ed;
  }
  const double nz = std::sqrt(zz), ne = std::sqrt(ee);
  if (!(nz > 0.0 && nz * kRotationMaxScale >= ne && ne * kRotationMaxScale >= nz)) return;
  double ss = 0.0;  // |u + q|^2, summed directly: 2 + 2 u.q cancels when z points away from e
  for (int64_t d = 0; d < D; ++d) {
    const double v = z[d] * s / nz + e[d] * s / ne;
    ss += v * v;
  }
  const double ns = std::sqrt(ss);
  const bool reflect = !(ns > kRotationMinSum);
  const double wg = reflect ? 0.0 : (gz / nz + ge / ne) / ns;  // w . g
  const double qg = ge / ne, lam = ne / nz;
  for (int64_t d = 0; d < D; ++d) {
    const double u = z[d] * s / nz;
    const double w = reflect ? 0.0 : (u + e[d] * s / ne) / ns;
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
    at::parallel_for(0, N, grain_for(D), [&](int64_t i0, int64_t i1) {
      std::vector<double> g(D), zi(D), e(D);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k = idx[i];
        for (int64_t d = 0; d < D; ++d) {
          g[d] = to_double(GQ(i, d));
          zi[d] = to_double(Z(i, d));
          e[d] = to_double(E(k, d));
        }
        if (rotation) rotate_gradient(g.data(), zi.data(), e.data(), D);
        for (int64_t d = 0; d < D; ++d) {  // scale_z = 0 (an unused loss) adds nothing, not 0 * NaN
          grad_z[i * D + d] = from_double<scalar_t>(scale_z == 0.0 ? g[d] : g[d] + scale_z * (zi[d] - e[d]));
        }
      }
    });
  }
  if (grad_codebook == nullptr || scale == 0.0) return;  // zeros, not 0 * NaN for a code with a NaN entry

  // grad_codebook[k] = scale * sum_{i: idx_i = k} (codebook[k] - z_i). Each thread owns a
  // range of codes and scans all rows in order: the result does not depend on threading.
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  // Every task reads all N rows: one task (inline) unless that is real work.
  at::parallel_for(0, K, N * D < kMinParallelWork ? K : ceil_div(K, nthreads), [&](int64_t k0, int64_t k1) {
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

}  // namespace

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

}  // namespace vqvae_fast
