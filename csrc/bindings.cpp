// The one binding file of megatron_rl._C: registers the extension's torch ops.
// Ops are registered with TORCH_LIBRARY (callable as torch.ops.megatron_rl.*) instead of pybind11
// functions so they compose with torch.compile and autograd.Function; the Python module itself is
// empty and exists only so that `import megatron_rl._C` loads the library.
#include <Python.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace megatron_rl {

// Row-wise logsumexp of a contiguous float32 [rows, cols] tensor: the smallest real op, kept as a
// build smoke test and a check that OpenMP is linked.
at::Tensor row_logsumexp(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "row_logsumexp: expected a 2-D tensor, got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "row_logsumexp: expected float32");
  TORCH_CHECK(x.device().is_cpu(), "row_logsumexp: expected a CPU tensor");
  at::Tensor xc = x.contiguous();
  const int64_t rows = xc.size(0), cols = xc.size(1);
  at::Tensor out = at::empty({rows}, xc.options());
  const float* in = xc.data_ptr<float>();
  float* o = out.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = in + r * cols;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < cols; ++c) m = std::fmax(m, row[c]);
    if (std::isinf(m) && m < 0) { o[r] = m; continue; }
    double s = 0.0;
    for (int64_t c = 0; c < cols; ++c) s += std::exp(row[c] - m);
    o[r] = m + static_cast<float>(std::log(s));
  }
  return out;
}

bool has_cuda() {
#ifdef MEGATRON_RL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace megatron_rl

TORCH_LIBRARY(megatron_rl, m) {
  m.def("row_logsumexp(Tensor x) -> Tensor");
  m.impl("row_logsumexp", c10::DispatchKey::CPU, &megatron_rl::row_logsumexp);
}

static PyModuleDef megatron_rl_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&megatron_rl_module);
  if (m != nullptr) {
    PyModule_AddIntConstant(m, "with_cuda", megatron_rl::has_cuda() ? 1 : 0);
  }
  return m;
}
