// Op schemas of the `vqvae_fast` library, and the Python module `vqvae_fast._C`.
//
// The schemas are declared here, once. The kernels are added in their own file with
// TORCH_LIBRARY_IMPL(vqvae_fast, <DispatchKey>, m):
//   csrc/cpu/nearest_code.cpp   CPU (the GPU kernels are Triton: vqvae_fast/ops/)
// csrc/cpu/nearest_code.cpp also defines cpu_forward_path(int D=256, ScalarType? dtype=None,
// int K=1024) -> str (no tensors, so no dispatch).
// Fake (meta) implementations and the autograd formula are registered from Python
// (vqvae_fast/ops/registration.py).

#include <Python.h>

#include <torch/library.h>

// `import vqvae_fast._C` only has to load this shared library: the static
// registrations below run at load time. The module itself is empty (no pybind11).
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "Registers the vqvae_fast::* operators (see torch.ops.vqvae_fast).",
      -1,    // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vqvae_fast, m) {
  // z (N, D), codebook (K, D) -> indices int64 (N,) of the nearest codes (no gather, no loss).
  m.def("nearest_code(Tensor z, Tensor codebook) -> Tensor");
  // -> quantized = codebook[indices] (N, D), indices int64 (N,),
  //    loss = (1 + beta) * mean((z - quantized)^2), a 0-dim tensor in z's dtype.
  //    `rotation` is only handed to the backward (the autograd formula reads the inputs).
  m.def("quantize_fwd(Tensor z, Tensor codebook, float beta, bool rotation=False) -> "
        "(Tensor quantized, Tensor indices, Tensor loss)");
  // Gradients of (quantized, loss) with respect to (z, codebook); one that is not needed
  // (need_grad_* false) is returned as an empty tensor and not computed. quantized passes its
  // gradient to z straight through, or with rotation=True by the rotation trick (Fifty et
  // al. 2024; vqvae_fast/reference.py rotation_gradient has the formula and its guards).
  m.def("quantize_bwd(Tensor grad_quantized, Tensor grad_loss, Tensor z, Tensor codebook, Tensor indices, "
        "float beta, bool need_grad_z, bool need_grad_codebook, bool rotation=False) -> "
        "(Tensor grad_z, Tensor grad_codebook)");
}
