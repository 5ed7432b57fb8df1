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

// Unsigned division by a run-time constant as a multiply-high and a shift (Granlund and
// Montgomery, as torch's IntDivider): a row's mask offset costs no integer division.
struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 0;
  uint32_t shift = 0;

  FastDivmod() = default;
  // divisor in [1, 2^31].
  explicit FastDivmod(uint32_t d) : divisor(d) {
    while (shift < 31 && (uint32_t{1} << shift) < d) ++shift;
    const uint64_t one = 1;
    multiplier = static_cast<uint32_t>(((one << 32) * ((one << shift) - d)) / d + 1);
  }

  NANOPS_HOST_DEVICE uint32_t div(uint32_t n) const {
#ifdef __CUDA_ARCH__
    const uint32_t high = __umulhi(n, multiplier);
#else
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> 32);
#endif
    return static_cast<uint32_t>((static_cast<uint64_t>(high) + n) >> shift);
  }
};

// Maps a row of the (rows, len) problem to the start of its mask row. The leading dims are
// collapsed on the host (size-1 dims dropped, neighbours merged where their strides allow: a
// (L, L) mask broadcast over (B, H, L, L) logits leaves one dim of size L), so most masks need
// one or two multiply-high divisions per row, none per element.
struct MaskIndexer {
  int ndim = 0;  // collapsed leading dims, outermost first
  int64_t sizes[kMaxSoftmaxDims] = {};
  int64_t strides[kMaxSoftmaxDims] = {};
  FastDivmod divs[kMaxSoftmaxDims] = {};
  bool fast = false;         // rows < 2^32 and every size <= 2^31: the 32-bit divisions apply
  int64_t inner_stride = 0;  // along the softmax dim: 1, 0 when the mask broadcasts there, or a transposed mask's

  // From the broadcast mask view's leading sizes/strides (ndim of them) and its stride along the
  // softmax dim, for a problem of `rows` rows.
  static MaskIndexer make(const int64_t* view_sizes, const int64_t* view_strides, int view_ndim, int64_t inner,
                          int64_t rows) {
    MaskIndexer m;
    m.inner_stride = inner;
    for (int d = 0; d < view_ndim; ++d) {
      if (view_sizes[d] == 1) continue;
      if (m.ndim > 0 && m.strides[m.ndim - 1] == view_strides[d] * view_sizes[d]) {
        m.sizes[m.ndim - 1] *= view_sizes[d];  // the outer dim steps exactly over the inner one
        m.strides[m.ndim - 1] = view_strides[d];
        continue;
      }
      m.sizes[m.ndim] = view_sizes[d];
      m.strides[m.ndim] = view_strides[d];
      ++m.ndim;
    }
    m.fast = rows < (int64_t{1} << 32);
    for (int d = 0; d < m.ndim; ++d) m.fast = m.fast && m.sizes[d] <= (int64_t{1} << 31);
    if (m.fast) {
      for (int d = 0; d < m.ndim; ++d) m.divs[d] = FastDivmod(static_cast<uint32_t>(m.sizes[d]));
    }
    return m;
  }

  NANOPS_HOST_DEVICE int64_t row_offset(int64_t row) const {
    if (ndim == 0) return 0;
    int64_t offset = 0;
    if (fast) {
      uint32_t r = static_cast<uint32_t>(row);
      for (int d = ndim - 1; d > 0; --d) {
        const uint32_t q = divs[d].div(r);
        offset += static_cast<int64_t>(r - q * divs[d].divisor) * strides[d];
        r = q;
      }
      return offset + static_cast<int64_t>(r) * strides[0];  // r < sizes[0]: no modulo
    }
    for (int d = ndim - 1; d > 0; --d) {
      offset += (row % sizes[d]) * strides[d];
      row /= sizes[d];
    }
    return offset + row * strides[0];
  }
};

}  // namespace nanops
