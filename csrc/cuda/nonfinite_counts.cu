// CUDA kernel of nanops::nonfinite_counts: one multi-tensor launch (more only when the list
// overflows the parameter tables), counts kept on the device. Host side: nonfinite_counts_host.cpp.
#include "cuda/block_reduce.cuh"
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"

namespace nanops::cuda {
namespace {

struct CountNonfinite {
  unsigned long long* counts;  // (num_tensors, 3): NaN, +Inf, -Inf

  template <typename T>
  __device__ void operator()(T* data, int64_t n, int64_t tensor_index, int64_t /*chunk_id*/) const {
    using acc_t = typename AccType<T>::type;
    int nan = 0, pos_inf = 0, neg_inf = 0;
    for_each_element(data, n, [&](T x) {
      const acc_t v = static_cast<acc_t>(x);
      nan += isnan(v);
      pos_inf += isinf(v) && v > 0;
      neg_inf += isinf(v) && v < 0;
    });
    // Almost every chunk is clean: one block-wide vote skips the three reductions and atomics.
    if (!__syncthreads_or(nan | pos_inf | neg_inf)) return;
    __shared__ int scratch[kWarpSize];
    nan = block_reduce(nan, SumOp{}, 0, scratch);
    pos_inf = block_reduce(pos_inf, SumOp{}, 0, scratch);
    neg_inf = block_reduce(neg_inf, SumOp{}, 0, scratch);
    if (threadIdx.x == 0) {
      unsigned long long* row = counts + tensor_index * 3;
      if (nan) atomicAdd(row + 0, static_cast<unsigned long long>(nan));
      if (pos_inf) atomicAdd(row + 1, static_cast<unsigned long long>(pos_inf));
      if (neg_inf) atomicAdd(row + 2, static_cast<unsigned long long>(neg_inf));
    }
  }
};

}  // namespace

int64_t total_chunks(const std::vector<DeviceView>& views) {
  int64_t total = 0;
  for (const DeviceView& v : views) total += num_chunks(v);
  return total;
}

cudaError_t launch_nonfinite_counts(const std::vector<DeviceView>& views, unsigned long long* counts,
                                    cudaStream_t stream) {
  return multi_tensor_apply(views, stream, CountNonfinite{counts});
}

}  // namespace nanops::cuda
