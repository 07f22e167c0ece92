// Op schemas of the `vqvae_fast` library, and the Python module `vqvae_fast._C`.
//
// The schemas and what their arguments mean are written once, in SCHEMAS of
// vqvae_fast/ops/registration.py; the strings below must be those (tests/test_op_schemas.py
// compares every registered schema with it). The kernels are added in their own file with
// TORCH_LIBRARY_IMPL(vqvae_fast, <DispatchKey>, m):
//   csrc/cpu/nearest_code.cpp   CPU (the GPU kernels are Triton: vqvae_fast/ops/)
// csrc/cpu/nearest_code.cpp also defines cpu_forward_path (no tensors, so no dispatch).
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

TORCH_LIBRARY(vqvae_fast, m) {  // SCHEMAS in vqvae_fast/ops/registration.py, verbatim
  m.def("nearest_code(Tensor z, Tensor codebook) -> Tensor");
  m.def("quantize_fwd(Tensor z, Tensor codebook, float beta, bool rotation=False) -> "
        "(Tensor quantized, Tensor indices, Tensor loss)");
  m.def("quantize_bwd(Tensor grad_quantized, Tensor grad_loss, Tensor z, Tensor codebook, Tensor indices, "
        "float beta, bool need_grad_z, bool need_grad_codebook, bool rotation=False) -> "
        "(Tensor grad_z, Tensor grad_codebook)");
}
