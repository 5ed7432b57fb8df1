// Host-side shaping of a stable_softmax call, shared by the CPU and CUDA kernels: the softmax
// dim moved last and made contiguous, and the mask kept as a broadcast view whose offset for
// any row is computed from strides (a (L, L) mask against (B, H, L, L) logits is never copied).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "softmax_mask.h"

namespace nanops {

struct SoftmaxProblem {
  at::Tensor x;  // contiguous, softmax dim last
  int64_t rows = 0;
  int64_t len = 0;
  int64_t dim = 0;  // wrapped dim of the caller's tensor
  MaskKind mask_kind = MaskKind::None;
  at::Tensor mask;  // bool, x's 16-bit dtype, or the accumulation dtype (see MaskKind)
  MaskIndexer mask_index;
};

// Checks the arguments (naming them) and shapes the problem.
SoftmaxProblem make_softmax_problem(const at::Tensor& x, int64_t dim, const std::optional<at::Tensor>& mask);

// Shapes grad_y and y of the backward the same way (both contiguous, dim last).
SoftmaxProblem make_softmax_backward_problem(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim,
                                             at::Tensor& y_last);

// Output in the caller's layout: the (rows, len) result moved back to `dim`, contiguous.
at::Tensor restore_softmax_layout(const at::Tensor& out_last, const SoftmaxProblem& problem);

}  // namespace nanops
