// The one binding file of megatron_rl._C: declares the extension's torch ops.
// Ops are registered with TORCH_LIBRARY (callable as torch.ops.megatron_rl.*) instead of pybind11
// functions so they compose with torch.compile and autograd.Function; the CPU and CUDA kernels
// register their implementations with TORCH_LIBRARY_IMPL beside the launchers
// (cpu/vocab_parallel_cpu.cpp, cuda/vocab_parallel_cuda.cpp). The Python module itself is empty
// and exists only so that `import megatron_rl._C` loads the library.
//
// The ops are the phases of the vocab-parallel log-prob / entropy / covariance computation
// on one process's block of logits columns; the TP all-reduces between them are done in Python
// (megatron_rl/ops/vocab_parallel.py). Shapes: logits [tokens, cols] (unit column stride), per-token
// vectors [tokens] in the accumulation dtype (float64 for float64 logits, float32 otherwise).
#include <Python.h>
#include <torch/library.h>

namespace megatron_rl {

bool has_cuda() {
#ifdef MEGATRON_RL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace megatron_rl

TORCH_LIBRARY(megatron_rl, m) {
  // -> [4, tokens]: max z, sum exp(z - max), sum exp(z - max) * (z - max), z[target] (0 when the
  // target id is outside [vocab_start, vocab_start + valid_cols)), all over this block's valid
  // columns, with z = logits * inv_temperature.
  m.def("logprob_stats(Tensor logits, Tensor? target, float inv_temperature, int vocab_start, "
        "int valid_cols) -> Tensor");
  // -> grad of sum(grad_logprob * logprob + grad_entropy * entropy) w.r.t. this block of logits,
  // recomputing the softmax from the logits and the global lse; logits' dtype, padding columns 0.
  m.def("logprob_entropy_backward(Tensor logits, Tensor target, Tensor lse, Tensor entropy, "
        "Tensor grad_logprob, Tensor grad_entropy, float inv_temperature, int vocab_start, "
        "int valid_cols) -> Tensor");
  // The same gradient written over the logits (for callers whose logits are dead after the
  // backward, as megatron's vocab_parallel_cross_entropy does); no [tokens, cols] allocation.
  m.def("logprob_entropy_backward_(Tensor(a!) logits, Tensor target, Tensor lse, Tensor entropy, "
        "Tensor grad_logprob, Tensor grad_entropy, float inv_temperature, int vocab_start, "
        "int valid_cols) -> ()");
  // -> [2, tokens]: this block's share of Cov_p(log p, delta) and of E_p[delta], given the global
  // lse and entropy.
  m.def("covariance_partials(Tensor logits, Tensor delta, Tensor lse, Tensor entropy, "
        "float inv_temperature, int valid_cols) -> Tensor");
}

static PyModuleDef megatron_rl_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&megatron_rl_module);
  if (m != nullptr) {
    PyModule_AddIntConstant(m, "with_cuda", megatron_rl::has_cuda() ? 1 : 0);
  }
  return m;
}
