// Host-side shaping of a stable_softmax call, shared by the CPU and CUDA kernels: the softmax
// dim moved last and made contiguous, and the mask kept as a broadcast view whose offset for
// any row is computed from strides (a (L, L) mask against (B, H, L, L) logits is never copied).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "host_device.h"

namespace nanops {

constexpr int kMaxSoftmaxDims = 8;  // leading (row) dims of the mask indexer

// Additive: a floating mask stored in the accumulation dtype (float32; float64 for float64 x).
// AdditiveLikeX: a float16/bfloat16 mask on x of the same dtype, read as it is and widened in
// the kernel (exact), which saves converting a (L, L) mask on every call.
enum class MaskKind { None, Bool, Additive, AdditiveLikeX };

// Maps a row of the (rows, len) problem to the start of its mask row.
struct MaskIndexer {
  int ndim = 0;  // number of leading dims
  int64_t sizes[kMaxSoftmaxDims] = {};
  int64_t strides[kMaxSoftmaxDims] = {};
  int64_t inner_stride = 0;  // along the softmax dim: 1, or 0 when the mask broadcasts there

  NANOPS_HOST_DEVICE int64_t row_offset(int64_t row) const {
    int64_t offset = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      offset += (row % sizes[d]) * strides[d];
      row /= sizes[d];
    }
    return offset;
  }
};

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
