// Warp and block reductions shared by the CUDA kernels.
#pragma once

#include <cuda_runtime.h>

namespace nanops::cuda {

constexpr int kWarpSize = 32;

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

struct MaxOp {
  // fmax-style for floats would drop NaN; the callers track NaN separately, so a plain max is enough.
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// Reduces over groups of kWidth lanes (a power of two up to 32); every lane of the warp must
// take part, each group gets its own result.
template <int kWidth = kWarpSize, typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T value, Op op) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) {
    value = op(value, __shfl_xor_sync(0xffffffffu, value, offset, kWidth));
  }
  return value;
}

// Reduces `value` over the block; every thread gets the result. `scratch` holds kWarpSize
// elements in shared memory. blockDim.x must be a multiple of kWarpSize. The leading barrier
// lets callers reuse one scratch buffer for consecutive reductions.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T value, Op op, T identity, T* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  value = warp_reduce(value, op);
  __syncthreads();
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x / kWarpSize;
    value = warp_reduce(lane < num_warps ? scratch[lane] : identity, op);
    if (lane == 0) scratch[0] = value;
  }
  __syncthreads();
  return scratch[0];
}

}  // namespace nanops::cuda
