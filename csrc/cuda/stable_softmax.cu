// CUDA kernels of nanops::stable_softmax and its backward. Host side: stable_softmax_host.cpp.
//
// Rows up to 1024 long: one warp per row, the row held in registers, so every element is read
// once and written once. Longer rows: one block per row, an online max/sum pass and a write
// pass (the second read mostly hits L2). Scale and mask are applied as the logits are loaded.
#include <algorithm>
#include <type_traits>

#include "cuda/block_reduce.cuh"
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "softmax_mask.h"

namespace nanops::cuda {
namespace {

constexpr int kRowsPerWarpBlock = 4;
constexpr int kWarpBlockThreads = kRowsPerWarpBlock * kWarpSize;
constexpr int kMaxWarpRowLen = 1024;
constexpr int kRowBlockThreads = 512;
constexpr int64_t kMaxRowBlocks = 1 << 20;

template <typename acc_t>
__device__ __forceinline__ acc_t infinity() {
  return static_cast<acc_t>(INFINITY);
}

// scale * x, then the mask: additive (stored as acc_t, or as T itself), or -inf where a bool
// mask is False.
template <typename T, typename acc_t>
struct MaskedLogits {
  acc_t scale;
  MaskKind kind;
  const void* mask;
  MaskIndexer index;

  __device__ __forceinline__ acc_t operator()(acc_t x, int64_t mask_row, int64_t j) const {
    const acc_t z = scale * x;
    if (kind == MaskKind::None) return z;
    const int64_t at = mask_row + j * index.inner_stride;
    if (kind == MaskKind::Bool) return static_cast<const bool*>(mask)[at] ? z : -infinity<acc_t>();
    const acc_t add = kind == MaskKind::AdditiveLikeX ? static_cast<acc_t>(static_cast<const T*>(mask)[at])
                                                      : static_cast<const acc_t*>(mask)[at];
    // -inf masks the position even where the logit is +inf or NaN, as False in a bool mask.
    return add == -infinity<acc_t>() ? add : z + add;
  }
};

// How a row's probabilities are formed once its max, NaN flag and +inf count are known.
template <typename acc_t>
struct RowRule {
  bool nan;
  acc_t max;
  int pos_inf;
  acc_t inv_sum;  // for the ordinary case

  __device__ __forceinline__ acc_t operator()(acc_t z) const {
    if (nan) return static_cast<acc_t>(NAN);
    // Before the max test: the block kernel's max covers finite logits only.
    if (pos_inf > 0) return z == infinity<acc_t>() ? acc_t(1) / pos_inf : acc_t(0);
    if (max == -infinity<acc_t>()) return acc_t(0);  // nothing takes part
    return exp(z - max) * inv_sum;
  }
};

template <typename T, int kPerThread>
__global__ void __launch_bounds__(kWarpBlockThreads)
    softmax_forward_warp(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int len,
                         MaskedLogits<T, typename AccType<T>::type> logits) {
  using acc_t = typename AccType<T>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerWarpBlock + threadIdx.x / kWarpSize;
  if (row >= rows) return;  // uniform per warp
  const int lane = threadIdx.x % kWarpSize;
  const T* xr = x + row * len;
  const int64_t mask_row = logits.kind == MaskKind::None ? 0 : logits.index.row_offset(row);
  acc_t z[kPerThread];
  acc_t max = -infinity<acc_t>();
  int nan = 0, pos_inf = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int j = lane + i * kWarpSize;
    z[i] = j < len ? logits(static_cast<acc_t>(xr[j]), mask_row, j) : -infinity<acc_t>();
    nan |= isnan(z[i]);
    pos_inf += z[i] == infinity<acc_t>();
    max = z[i] > max ? z[i] : max;
  }
  RowRule<acc_t> rule{__any_sync(0xffffffffu, nan) != 0, warp_reduce(max, MaxOp{}),
                      warp_reduce(pos_inf, SumOp{}), acc_t(0)};
  if (!rule.nan && rule.pos_inf == 0 && rule.max != -infinity<acc_t>()) {
    acc_t sum = 0;
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) sum += exp(z[i] - rule.max);  // padding lanes add exp(-inf) = 0
    rule.inv_sum = acc_t(1) / warp_reduce(sum, SumOp{});
  }
  T* yr = y + row * len;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int j = lane + i * kWarpSize;
    if (j < len) yr[j] = static_cast<T>(rule(z[i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowBlockThreads)
    softmax_forward_block(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t len,
                          MaskedLogits<T, typename AccType<T>::type> logits) {
  using acc_t = typename AccType<T>::type;
  __shared__ acc_t scratch[kWarpSize];
  __shared__ int int_scratch[kWarpSize];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * len;
    const int64_t mask_row = logits.kind == MaskKind::None ? 0 : logits.index.row_offset(row);
    // Online max and rescaled sum over the finite logits; +inf and NaN are counted apart.
    acc_t max = -infinity<acc_t>(), sum = 0;
    int nan = 0, pos_inf = 0;
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
      const acc_t z = logits(static_cast<acc_t>(xr[j]), mask_row, j);
      if (isnan(z)) {
        nan = 1;
      } else if (z == infinity<acc_t>()) {
        ++pos_inf;
      } else if (z > max) {
        sum = sum * exp(max - z) + acc_t(1);
        max = z;
      } else if (z != -infinity<acc_t>()) {
        sum += exp(z - max);
      }
    }
    RowRule<acc_t> rule{__syncthreads_or(nan) != 0, block_reduce(max, MaxOp{}, -infinity<acc_t>(), scratch),
                        block_reduce(pos_inf, SumOp{}, 0, int_scratch), acc_t(0)};
    const acc_t my_share = max == -infinity<acc_t>() ? acc_t(0) : sum * exp(max - rule.max);
    const acc_t total = block_reduce(my_share, SumOp{}, acc_t(0), scratch);
    rule.inv_sum = acc_t(1) / total;
    T* yr = y + row * len;
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
      yr[j] = static_cast<T>(rule(logits(static_cast<acc_t>(xr[j]), mask_row, j)));
    }
  }
}

template <typename T, int kPerThread>
__global__ void __launch_bounds__(kWarpBlockThreads)
    softmax_backward_warp(const T* __restrict__ grad_y, const T* __restrict__ y, T* __restrict__ grad_x,
                          int64_t rows, int len, typename AccType<T>::type scale) {
  using acc_t = typename AccType<T>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerWarpBlock + threadIdx.x / kWarpSize;
  if (row >= rows) return;
  const int lane = threadIdx.x % kWarpSize;
  acc_t g[kPerThread], p[kPerThread];
  acc_t dot = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int j = lane + i * kWarpSize;
    g[i] = j < len ? static_cast<acc_t>(grad_y[row * len + j]) : acc_t(0);
    p[i] = j < len ? static_cast<acc_t>(y[row * len + j]) : acc_t(0);
    dot += g[i] * p[i];
  }
  dot = warp_reduce(dot, SumOp{});
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int j = lane + i * kWarpSize;
    if (j < len) grad_x[row * len + j] = static_cast<T>(scale * p[i] * (g[i] - dot));
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowBlockThreads)
    softmax_backward_block(const T* __restrict__ grad_y, const T* __restrict__ y, T* __restrict__ grad_x,
                           int64_t rows, int64_t len, typename AccType<T>::type scale) {
  using acc_t = typename AccType<T>::type;
  __shared__ acc_t scratch[kWarpSize];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * len;
    acc_t dot = 0;
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
      dot += static_cast<acc_t>(grad_y[base + j]) * static_cast<acc_t>(y[base + j]);
    }
    dot = block_reduce(dot, SumOp{}, acc_t(0), scratch);
    for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
      const acc_t p = static_cast<acc_t>(y[base + j]);
      grad_x[base + j] = static_cast<T>(scale * p * (static_cast<acc_t>(grad_y[base + j]) - dot));
    }
  }
}

// Smallest per-lane register count that covers the row: 1, 2, 4, ... 32.
int warp_elems_per_lane(int64_t len) {
  int k = 1;
  while (k * kWarpSize < len) k *= 2;
  return k;
}

// Calls launch(std::integral_constant<int, K>) for the K that covers len.
template <typename Launch>
void with_elems_per_lane(int64_t len, Launch&& launch) {
  switch (warp_elems_per_lane(len)) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    case 8: launch(std::integral_constant<int, 8>{}); break;
    case 16: launch(std::integral_constant<int, 16>{}); break;
    default: launch(std::integral_constant<int, 32>{}); break;
  }
}

unsigned warp_grid(int64_t rows) { return static_cast<unsigned>((rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock); }
unsigned block_grid(int64_t rows) { return static_cast<unsigned>(std::min(rows, kMaxRowBlocks)); }

template <typename T>
void softmax_forward(const void* x, void* y, int64_t rows, int64_t len, double scale, MaskKind mask_kind,
                     const void* mask, const MaskIndexer& mask_index, cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const MaskedLogits<T, acc_t> logits{static_cast<acc_t>(scale), mask_kind, mask, mask_index};
  const T* xs = static_cast<const T*>(x);
  T* ys = static_cast<T*>(y);
  if (len <= kMaxWarpRowLen) {
    with_elems_per_lane(len, [&](auto k) {
      softmax_forward_warp<T, decltype(k)::value><<<warp_grid(rows), kWarpBlockThreads, 0, stream>>>(
          xs, ys, rows, static_cast<int>(len), logits);
    });
  } else {
    softmax_forward_block<T><<<block_grid(rows), kRowBlockThreads, 0, stream>>>(xs, ys, rows, len, logits);
  }
}

template <typename T>
void softmax_backward(const void* grad_y, const void* y, void* grad_x, int64_t rows, int64_t len, double scale,
                      cudaStream_t stream) {
  using acc_t = typename AccType<T>::type;
  const T* gs = static_cast<const T*>(grad_y);
  const T* ys = static_cast<const T*>(y);
  T* out = static_cast<T*>(grad_x);
  if (len <= kMaxWarpRowLen) {
    with_elems_per_lane(len, [&](auto k) {
      softmax_backward_warp<T, decltype(k)::value><<<warp_grid(rows), kWarpBlockThreads, 0, stream>>>(
          gs, ys, out, rows, static_cast<int>(len), static_cast<acc_t>(scale));
    });
  } else {
    softmax_backward_block<T><<<block_grid(rows), kRowBlockThreads, 0, stream>>>(gs, ys, out, rows, len,
                                                                                 static_cast<acc_t>(scale));
  }
}

// Calls fn(T{}) with the C++ type of `type`.
template <typename Fn>
void with_elem_type(ElemType type, Fn&& fn) {
  switch (type) {
    case ElemType::Float: fn(float{}); break;
    case ElemType::Double: fn(double{}); break;
    case ElemType::Half: fn(c10::Half{}); break;
    case ElemType::BFloat16: fn(c10::BFloat16{}); break;
  }
}

}  // namespace

bool softmax_rows_fit(int64_t rows) {
  return rows >= 0 && (rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock <= int64_t{0x7fffffff};
}

cudaError_t launch_softmax_forward(ElemType type, const void* x, void* y, int64_t rows, int64_t len, double scale,
                                   MaskKind mask_kind, const void* mask, const MaskIndexer& mask_index,
                                   cudaStream_t stream) {
  with_elem_type(type, [&](auto t) {
    softmax_forward<decltype(t)>(x, y, rows, len, scale, mask_kind, mask, mask_index, stream);
  });
  return cudaGetLastError();
}

cudaError_t launch_softmax_backward(ElemType type, const void* grad_y, const void* y, void* grad_x, int64_t rows,
                                    int64_t len, double scale, cudaStream_t stream) {
  with_elem_type(type, [&](auto t) { softmax_backward<decltype(t)>(grad_y, y, grad_x, rows, len, scale, stream); });
  return cudaGetLastError();
}

}  // namespace nanops::cuda
