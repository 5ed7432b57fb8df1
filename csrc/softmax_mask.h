// The mask of a stable_softmax problem as the kernels see it (no torch headers: the CUDA
// kernels include it, and nvcc spends most of a build parsing torch's headers).
#pragma once

#include <cstdint>

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

}  // namespace nanops
