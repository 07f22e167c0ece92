// What the CPU kernels' files share: element conversions, a strided 2-D view, the input checks,
// and the kernels each file defines for nearest_code.cpp to register.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

namespace vqvae_fast {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The least work (elements touched) worth a task of at::parallel_for; less runs inline. A
// parallel region wakes every thread and joins them all: on a busy machine a woken thread can
// wait a scheduler time slice for its core, so each region of a call can cost milliseconds
// whatever its size (2 threads, another process busy: 4-6 regions per forward made it 3-4x
// slower than 1 thread at N = 8192, K = 4096, D = 64; benchmarks/RESULTS.md, "Threads on a busy machine").
constexpr int64_t kMinParallelWork = int64_t{1} << 20;

// Grain of an at::parallel_for over items of `work_per_item` elements each.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinParallelWork / std::max<int64_t>(1, work_per_item));
}

inline std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

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
  explicit View2D(const at::Tensor& t)
      : data(t.const_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), cols(t.size(1)) {}
  T operator()(int64_t i, int64_t j) const { return data[i * s0 + j * s1]; }
};

// The checks every op makes of z (N, D) and codebook (K, D): shapes, one supported floating dtype, CPU.
void check_z_codebook(const char* op, const at::Tensor& z, const at::Tensor& codebook);

// quantize_bwd.cpp (registered with the forward ops in nearest_code.cpp).
std::tuple<at::Tensor, at::Tensor> quantize_bwd_cpu(const at::Tensor& grad_quantized, const at::Tensor& grad_loss,
                                                    const at::Tensor& z, const at::Tensor& codebook,
                                                    const at::Tensor& indices, double beta, bool need_grad_z,
                                                    bool need_grad_codebook, bool rotation);

}  // namespace vqvae_fast
