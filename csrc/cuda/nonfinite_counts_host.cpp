// Host side of the CUDA nonfinite_counts: checks, output, registration. Kernel: nonfinite_counts.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/host.h"
#include "tensor_list.h"

namespace nanops {
namespace {

at::Tensor nonfinite_counts_cuda(at::TensorList tensors) {
  check_tensor_list(tensors, "nonfinite_counts", IntegerTensors::CountAsFinite);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  at::Tensor out = at::zeros({static_cast<int64_t>(tensors.size()), 3}, tensors[0].options().dtype(at::kLong));
  std::vector<at::Tensor> copies;  // non-dense tensors only; freed stream-ordered after the launch
  const std::vector<FlatView> views = flat_views(tensors, copies);
  auto* counts = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  C10_CUDA_CHECK(cuda::launch_nonfinite_counts(cuda::device_views(views), counts, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CUDA, m) {
  m.impl("nonfinite_counts", &nonfinite_counts_cuda);
}

}  // namespace nanops
