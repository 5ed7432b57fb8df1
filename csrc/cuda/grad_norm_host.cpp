// Host side of the CUDA grad-norm ops: checks, scratch and outputs, registration.
// Kernels: grad_norm.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "cuda/host.h"
#include "norm_math.h"
#include "tensor_list.h"

namespace nanops {
namespace {

// found_inf as the kernels write it (float32 or float64), after its check.
void set_found_inf(const std::optional<at::Tensor>& found_inf, const char* op, const c10::Device& device,
                   cuda::NormOutputs& out) {
  cuda::scalar_arg(found_inf, op, "found_inf", device);
  if (!found_inf.has_value()) return;
  if (found_inf->scalar_type() == at::kDouble) {
    out.found_inf_d = found_inf->data_ptr<double>();
  } else {
    out.found_inf_f = found_inf->data_ptr<float>();
  }
}

// tensors *= coef: one multi-tensor launch over the dense ones (no write when coef is 1), the
// others by scale_non_dense.
void scale_list(at::TensorList tensors, const at::Tensor& coef) {
  std::vector<at::Tensor> unused;
  std::vector<int64_t> non_dense;
  const std::vector<cuda::DeviceView> views = cuda::device_views(tensors, unused, &non_dense);
  for (const int64_t i : non_dense) scale_non_dense(tensors[i], coef);
  C10_CUDA_CHECK(cuda::launch_scale_tensors(views, coef.const_data_ptr<double>(),
                                            c10::cuda::getCurrentCUDAStream()));
}

// The norm launch over `tensors` (checked), into `out`.
void launch_norm(at::TensorList tensors, double norm_type, const cuda::ScalarArg& inv_scale,
                 const cuda::NormOutputs& out) {
  std::vector<at::Tensor> copies;  // non-dense tensors, read through a contiguous copy
  const std::vector<cuda::DeviceView> views = cuda::device_views(tensors, copies);
  at::Tensor scratch = at::empty({cuda::grad_norm_scratch_doubles(views)}, tensors[0].options().dtype(at::kDouble));
  C10_CUDA_CHECK(cuda::launch_grad_norm(views, norm_kind(norm_type), norm_type, inv_scale,
                                        scratch.data_ptr<double>(), out, c10::cuda::getCurrentCUDAStream()));
}

at::Tensor grad_norm_summary_cuda(at::TensorList tensors, double norm_type, const std::optional<at::Tensor>& inv_scale) {
  TORCH_CHECK_VALUE(!tensors.empty(), "grad_norm_summary: empty tensor list");
  TORCH_CHECK_VALUE(norm_type >= 0.0, "grad_norm_summary: norm_type must be >= 0 or inf, got ", norm_type);
  check_tensor_list(tensors, "grad_norm_summary", IntegerTensors::Reject);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const cuda::ScalarArg s = cuda::scalar_arg(inv_scale, "grad_norm_summary", "inv_scale", tensors[0].device());
  at::Tensor summary = at::empty({kSummaryFields}, tensors[0].options().dtype(at::kDouble));
  cuda::NormOutputs out;
  out.summary = summary.data_ptr<double>();
  launch_norm(tensors, norm_type, s, out);
  return summary;
}

std::tuple<at::Tensor, at::Tensor> clip_coef_from_summaries_cuda(
    const at::Tensor& summaries, double norm_type, double max_norm, const std::optional<at::Tensor>& inv_scale,
    const std::optional<at::Tensor>& found_inf, c10::ScalarType norm_dtype) {
  check_norm_summaries(summaries, kSummaryFields);
  const c10::cuda::CUDAGuard guard(summaries.device());
  const cuda::ScalarArg s = cuda::scalar_arg(inv_scale, "clip_coef_from_summaries", "inv_scale", summaries.device());
  const at::Tensor rows = summaries.contiguous();
  at::Tensor total_norm = at::empty({}, summaries.options().dtype(norm_dtype));
  at::Tensor coef = at::empty({}, summaries.options());
  cuda::NormOutputs out;
  set_found_inf(found_inf, "clip_coef_from_summaries", summaries.device(), out);
  out.total_norm = total_norm.data_ptr();
  out.norm_type = cuda::elem_type(norm_dtype);
  out.norm_max = dtype_max(norm_dtype);
  out.max_norm = max_norm;
  out.coef = coef.data_ptr<double>();
  C10_CUDA_CHECK(cuda::launch_clip_coef(rows.const_data_ptr<double>(), rows.size(0), norm_kind(norm_type), norm_type,
                                        s, out, c10::cuda::getCurrentCUDAStream()));
  return {total_norm, coef};
}

// The whole clip of one device's grads in two launches: the norm (its last block computes the
// coefficient) and, when asked, the scale.
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_grad_norm_cuda(
    at::TensorList grads, double max_norm, double norm_type, const std::optional<at::Tensor>& inv_scale,
    const std::optional<at::Tensor>& found_inf, bool scale_grads) {
  TORCH_CHECK_VALUE(!grads.empty(), "clip_grad_norm_: empty gradient list");
  check_clip_scalars(norm_type, max_norm, "clip_grad_norm_");
  check_tensor_list(grads, "clip_grad_norm_", IntegerTensors::Reject);
  const c10::Device device = grads[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const cuda::ScalarArg s = cuda::scalar_arg(inv_scale, "clip_grad_norm_", "inv_scale", device);
  const c10::ScalarType dtype = norm_dtype(grads);
  const auto options = grads[0].options();
  at::Tensor total_norm = at::empty({}, options.dtype(dtype));
  at::Tensor coef = at::empty({}, options.dtype(at::kDouble));
  at::Tensor divisor = at::empty({}, options.dtype(at::kFloat));
  cuda::NormOutputs out;
  set_found_inf(found_inf, "clip_grad_norm_", device, out);
  out.total_norm = total_norm.data_ptr();
  out.norm_type = cuda::elem_type(dtype);
  out.norm_max = dtype_max(dtype);
  out.max_norm = max_norm;
  out.coef = coef.data_ptr<double>();
  out.divisor = divisor.data_ptr<float>();
  launch_norm(grads, norm_type, s, out);
  if (scale_grads) scale_list(grads, coef);
  return {total_norm, coef, divisor};
}

void scale_tensors_cuda(at::TensorList tensors, const at::Tensor& coef) {
  if (tensors.empty()) return;
  check_tensor_list(tensors, "scale_tensors_", IntegerTensors::Reject);
  check_scale_coef(coef, tensors[0].device());
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  scale_list(tensors, coef);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CUDA, m) {
  m.impl("grad_norm_summary", &grad_norm_summary_cuda);
  m.impl("clip_coef_from_summaries", &clip_coef_from_summaries_cuda);
  m.impl("clip_grad_norm_", &clip_grad_norm_cuda);
  m.impl("scale_tensors_", &scale_tensors_cuda);
}

}  // namespace nanops
