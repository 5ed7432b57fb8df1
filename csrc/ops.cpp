// The one list of what nanops is: every operator schema lives here.
// Kernels register themselves per device in csrc/cpu/*.cpp and csrc/cuda/*.cu.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing nanops._C runs the static TORCH_LIBRARY registrations below; the
// module itself exposes nothing (ops are reached through torch.ops.nanops).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(nanops, m) {
  // Per tensor of the list: counts of NaN, +Inf, -Inf as an int64 (len(tensors), 3) tensor.
  m.def("nonfinite_counts(Tensor[] tensors) -> Tensor");

  // y = softmax(scale * x + mask) along dim; fully masked rows give 0, +inf logits share the mass.
  m.def("stable_softmax(Tensor x, int dim, float scale, Tensor? mask) -> Tensor");
  // grad_x = scale * y * (grad_y - sum(grad_y * y)) along dim.
  m.def("stable_softmax_backward(Tensor grad_y, Tensor y, int dim, float scale) -> Tensor");

  // Overflow-free p-norm summary of a tensor list (optionally of tensors * inv_scale):
  // float64 (5,) = [scale, rel_sum, amax, has_nan, has_inf], norm = scale * rel_sum^(1/p).
  m.def("grad_norm_summary(Tensor[] tensors, float norm_type, Tensor? inv_scale) -> Tensor");
  // Combines (k, 5) summaries (devices or ranks) into the total norm and the coefficient to
  // multiply the grads with (exactly 1 where they must stay untouched); sets found_inf to 1
  // when the norm is non-finite.
  m.def(
      "clip_coef_from_summaries(Tensor summaries, float norm_type, float max_norm, Tensor? inv_scale, "
      "Tensor(a!)? found_inf, ScalarType norm_dtype) -> (Tensor total_norm, Tensor coef)");
  // tensors *= coef (a one-element device tensor), skipped without a write when coef == 1.
  m.def("scale_tensors_(Tensor(a!)[] tensors, Tensor coef) -> ()");
}
