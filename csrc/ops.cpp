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
  // 0-dim bool: True when no tensor of the list holds a NaN or an Inf (one launch on CUDA).
  m.def("all_finite(Tensor[] tensors) -> Tensor");
  // float32 (1,): 1.0 when some tensor holds a NaN or an Inf, else 0.0 (GradScaler's found_inf).
  m.def("nonfinite_flag(Tensor[] tensors) -> Tensor");

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
  // The whole clip of one device's grads: their overflow-free norm (of grads * inv_scale), the
  // coefficient min(1, max_norm / (norm + 1e-6)) * inv_scale (exactly 1 where the grads hold
  // NaN/Inf or their norm overflows; found_inf then set to 1), its float32 reciprocal (the
  // grad_scale torch's fused optimizers divide by), and, with scale_grads, grads *= coef.
  // total_norm has the promotion of the grads' dtypes (float32 for 16-bit).
  m.def(
      "clip_grad_norm_(Tensor(a!)[] grads, float max_norm, float norm_type, Tensor? inv_scale, "
      "Tensor(b!)? found_inf, bool scale_grads) -> (Tensor total_norm, Tensor coef, Tensor grad_divisor)");
  // tensors *= coef (a one-element device tensor), skipped without a write when coef == 1.
  m.def("scale_tensors_(Tensor(a!)[] tensors, Tensor coef) -> ()");
}
