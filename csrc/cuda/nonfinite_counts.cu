// CUDA kernel of nanops::nonfinite_counts: one multi-tensor launch (more only when the list
// overflows the parameter tables), counts kept on the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/block_reduce.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "tensor_list.h"

namespace nanops {
namespace {

struct CountNonfinite {
  unsigned long long* counts;  // (num_tensors, 3): NaN, +Inf, -Inf

  template <typename T>
  __device__ void operator()(T* data, int64_t n, int64_t tensor_index, int64_t /*chunk_id*/) const {
    using acc_t = typename cuda::AccType<T>::type;
    int nan = 0, pos_inf = 0, neg_inf = 0;
    cuda::for_each_element(data, n, [&](T x) {
      const acc_t v = static_cast<acc_t>(x);
      nan += isnan(v);
      pos_inf += isinf(v) && v > 0;
      neg_inf += isinf(v) && v < 0;
    });
    // Almost every chunk is clean: one block-wide vote skips the three reductions and atomics.
    if (!__syncthreads_or(nan | pos_inf | neg_inf)) return;
    __shared__ int scratch[cuda::kWarpSize];
    nan = cuda::block_reduce(nan, cuda::SumOp{}, 0, scratch);
    pos_inf = cuda::block_reduce(pos_inf, cuda::SumOp{}, 0, scratch);
    neg_inf = cuda::block_reduce(neg_inf, cuda::SumOp{}, 0, scratch);
    if (threadIdx.x == 0) {
      unsigned long long* row = counts + tensor_index * 3;
      if (nan) atomicAdd(row + 0, static_cast<unsigned long long>(nan));
      if (pos_inf) atomicAdd(row + 1, static_cast<unsigned long long>(pos_inf));
      if (neg_inf) atomicAdd(row + 2, static_cast<unsigned long long>(neg_inf));
    }
  }
};

at::Tensor nonfinite_counts_cuda(at::TensorList tensors) {
  check_tensor_list(tensors, "nonfinite_counts", IntegerTensors::CountAsFinite);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  at::Tensor out = at::zeros({static_cast<int64_t>(tensors.size()), 3}, tensors[0].options().dtype(at::kLong));
  std::vector<at::Tensor> copies;  // non-dense tensors only; freed stream-ordered after the launch
  const std::vector<FlatView> views = flat_views(tensors, copies);
  auto* counts = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  cuda::multi_tensor_apply(views, c10::cuda::getCurrentCUDAStream(), CountNonfinite{counts});
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CUDA, m) {
  m.impl("nonfinite_counts", &nonfinite_counts_cuda);
}

}  // namespace nanops
