// The instruction-set variants of the CPU softmax row kernels (see softmax_rows.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "softmax_problem.h"

namespace nanops::cpu {

#define NANOPS_DECLARE_SOFTMAX_ROWS(variant)                                                              \
  namespace variant {                                                                                     \
  void softmax_forward_rows(const SoftmaxProblem& p, double scale, at::Tensor& out);                      \
  void softmax_backward_rows(const SoftmaxProblem& p, const at::Tensor& y_last, double scale, at::Tensor& grad_x); \
  }

NANOPS_DECLARE_SOFTMAX_ROWS(base)
#if defined(__x86_64__)
NANOPS_DECLARE_SOFTMAX_ROWS(avx2)
#endif
#undef NANOPS_DECLARE_SOFTMAX_ROWS

// AVX2 + FMA (+ F16C, present on every AVX2 x86 CPU): ATen's 256-bit vectors and Sleef's exp.
inline bool cpu_has_avx2() {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace nanops::cpu
