// Host side of the CUDA grad-norm ops: checks, scratch and outputs, registration.
// Kernels: grad_norm.cu.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cuda/host.h"
#include "norm_math.h"
#include "tensor_list.h"

namespace nanops {
namespace {

at::Tensor grad_norm_summary_cuda(at::TensorList tensors, double norm_type, const std::optional<at::Tensor>& inv_scale) {
  TORCH_CHECK(!tensors.empty(), "grad_norm_summary: empty tensor list");
  TORCH_CHECK(norm_type >= 0.0, "grad_norm_summary: norm_type must be >= 0 or inf, got ", norm_type);
  check_tensor_list(tensors, "grad_norm_summary", IntegerTensors::Reject);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cuda::ScalarArg s = cuda::scalar_arg(inv_scale, "grad_norm_summary", "inv_scale", tensors[0].device());
  std::vector<at::Tensor> copies;
  const std::vector<cuda::DeviceView> views = cuda::device_views(flat_views(tensors, copies));
  const auto options = tensors[0].options().dtype(at::kDouble);
  at::Tensor partials = at::empty({std::max<int64_t>(cuda::total_chunks(views), 1), kSummaryFields}, options);
  at::Tensor summary = at::empty({kSummaryFields}, options);
  C10_CUDA_CHECK(cuda::launch_grad_norm_summary(views, norm_kind(norm_type), norm_type, s, partials.data_ptr<double>(),
                                                summary.data_ptr<double>(), c10::cuda::getCurrentCUDAStream()));
  return summary;
}

std::tuple<at::Tensor, at::Tensor> clip_coef_from_summaries_cuda(
    const at::Tensor& summaries, double norm_type, double max_norm, const std::optional<at::Tensor>& inv_scale,
    const std::optional<at::Tensor>& found_inf, c10::ScalarType norm_dtype) {
  check_norm_summaries(summaries, kSummaryFields);
  const c10::cuda::CUDAGuard guard(summaries.device());
  const cuda::ScalarArg s = cuda::scalar_arg(inv_scale, "clip_coef_from_summaries", "inv_scale", summaries.device());
  cuda::scalar_arg(found_inf, "clip_coef_from_summaries", "found_inf", summaries.device());
  float* found_f = nullptr;
  double* found_d = nullptr;
  if (found_inf.has_value()) {
    if (found_inf->scalar_type() == at::kDouble) {
      found_d = found_inf->data_ptr<double>();
    } else {
      found_f = found_inf->data_ptr<float>();
    }
  }
  const at::Tensor rows = summaries.contiguous();
  at::Tensor total_norm = at::empty({}, summaries.options().dtype(norm_dtype));
  at::Tensor coef = at::empty({}, summaries.options());
  double norm_max = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, norm_dtype, "clip_coef_from_summaries_cuda", [&] {
    norm_max = static_cast<double>(std::numeric_limits<scalar_t>::max());
  });
  C10_CUDA_CHECK(cuda::launch_clip_coef(rows.const_data_ptr<double>(), rows.size(0), norm_kind(norm_type), norm_type,
                                        max_norm, s, found_f, found_d, cuda::elem_type(norm_dtype), norm_max,
                                        total_norm.data_ptr(), coef.data_ptr<double>(),
                                        c10::cuda::getCurrentCUDAStream()));
  return {total_norm, coef};
}

void scale_tensors_cuda(at::TensorList tensors, const at::Tensor& coef) {
  if (tensors.empty()) return;
  check_tensor_list(tensors, "scale_tensors_", IntegerTensors::Reject);
  check_scale_coef(coef, tensors[0].device());
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> unused;
  std::vector<int64_t> non_dense;
  const std::vector<FlatView> views = flat_views(tensors, unused, &non_dense);
  for (const int64_t i : non_dense) tensors[i].mul_(coef);
  C10_CUDA_CHECK(cuda::launch_scale_tensors(cuda::device_views(views), coef.const_data_ptr<double>(),
                                            c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CUDA, m) {
  m.impl("grad_norm_summary", &grad_norm_summary_cuda);
  m.impl("clip_coef_from_summaries", &clip_coef_from_summaries_cuda);
  m.impl("scale_tensors_", &scale_tensors_cuda);
}

}  // namespace nanops
