// Host side of the CUDA NaN/Inf checks: nonfinite_counts, all_finite, nonfinite_flag (checks,
// outputs, registration). Kernels: nonfinite_counts.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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
  const std::vector<cuda::DeviceView> views = cuda::device_views(tensors, copies);
  auto* counts = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  C10_CUDA_CHECK(cuda::launch_nonfinite_counts(views, counts, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// One flag for the whole list: `initial` bytes set by a memset (no kernel), then one
// multi-tensor launch that writes only where a NaN/Inf is met.
at::Tensor nonfinite_flag_into(at::TensorList tensors, const char* op, c10::ScalarType dtype,
                               c10::IntArrayRef shape, int initial_byte) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": empty tensor list");
  check_tensor_list(tensors, op, IntegerTensors::CountAsFinite);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty(shape, tensors[0].options().dtype(dtype));
  C10_CUDA_CHECK(cudaMemsetAsync(out.data_ptr(), initial_byte, out.nbytes(), stream));
  std::vector<at::Tensor> copies;
  const std::vector<cuda::DeviceView> views = cuda::device_views(tensors, copies);
  cuda::FlagOut flag{nullptr, nullptr};
  if (dtype == at::kBool) {
    flag.as_bool = out.data_ptr<bool>();
  } else {
    flag.as_float = out.data_ptr<float>();
  }
  C10_CUDA_CHECK(cuda::launch_nonfinite_flag(views, flag, stream));
  return out;
}

at::Tensor all_finite_cuda(at::TensorList tensors) {
  return nonfinite_flag_into(tensors, "all_finite", at::kBool, {}, 1);  // true until a NaN/Inf is met
}

at::Tensor nonfinite_flag_cuda(at::TensorList tensors) {
  return nonfinite_flag_into(tensors, "nonfinite_flag", at::kFloat, {1}, 0);  // 0.0f, 1.0f once one is met
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CUDA, m) {
  m.impl("nonfinite_counts", &nonfinite_counts_cuda);
  m.impl("all_finite", &all_finite_cuda);
  m.impl("nonfinite_flag", &nonfinite_flag_cuda);
}

}  // namespace nanops
