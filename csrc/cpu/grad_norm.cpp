// CPU kernels of the grad-norm ops: grad_norm_summary, clip_coef_from_summaries, scale_tensors_.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "cpu/grad_norm_variants.h"
#include "cpu/multi_tensor.h"
#include "norm_math.h"
#include "tensor_list.h"

namespace nanops {
namespace {

NormPartial summarise(at::TensorList tensors, double norm_type, double s) {
  const NormKind kind = norm_kind(norm_type);
  std::vector<at::Tensor> copies;
  const std::vector<FlatView> views = flat_views(tensors, copies);
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(views);
  std::vector<double> partials(chunks.size() * kSummaryFields);
  NANOPS_CPU_DISPATCH(norm_partials, views, chunks, kind, norm_type, s, partials.data());
  return combine_partials(partials.data(), static_cast<int64_t>(chunks.size()), kind, norm_type);
}

double scalar_value(const std::optional<at::Tensor>& t) { return t.has_value() ? t->item<double>() : 1.0; }

at::Tensor grad_norm_summary_cpu(at::TensorList tensors, double norm_type, const std::optional<at::Tensor>& inv_scale) {
  TORCH_CHECK_VALUE(!tensors.empty(), "grad_norm_summary: empty tensor list");
  TORCH_CHECK_VALUE(norm_type >= 0.0, "grad_norm_summary: norm_type must be >= 0 or inf, got ", norm_type);
  check_tensor_list(tensors, "grad_norm_summary", IntegerTensors::Reject);
  check_scalar_tensor(inv_scale, "grad_norm_summary", "inv_scale", tensors[0].device());
  const NormPartial summary = summarise(tensors, norm_type, scalar_value(inv_scale));
  at::Tensor out = at::empty({kSummaryFields}, at::TensorOptions().dtype(at::kDouble));
  std::copy_n(&summary.scale, kSummaryFields, out.data_ptr<double>());
  return out;
}

// The norm a summary stands for in `dtype`, and the coefficient; sets found_inf.
std::tuple<at::Tensor, at::Tensor> norm_and_coef(const NormPartial& total, double norm_type, double max_norm,
                                                 double s, const std::optional<at::Tensor>& found_inf,
                                                 c10::ScalarType dtype) {
  const double norm = norm_in_dtype(norm_from_summary(total, norm_kind(norm_type), norm_type), dtype_max(dtype));
  const bool nonfinite = summary_nonfinite(total, norm);
  if (nonfinite && found_inf.has_value()) found_inf->fill_(1.0);
  at::Tensor total_norm = at::empty({}, at::TensorOptions().dtype(dtype));
  total_norm.fill_(norm);
  at::Tensor coef = at::empty({}, at::TensorOptions().dtype(at::kDouble));
  coef.fill_(clip_coef(norm, nonfinite, max_norm, s));
  return {total_norm, coef};
}

std::tuple<at::Tensor, at::Tensor> clip_coef_from_summaries_cpu(
    const at::Tensor& summaries, double norm_type, double max_norm, const std::optional<at::Tensor>& inv_scale,
    const std::optional<at::Tensor>& found_inf, c10::ScalarType norm_dtype) {
  check_norm_summaries(summaries, kSummaryFields);
  check_scalar_tensor(inv_scale, "clip_coef_from_summaries", "inv_scale", summaries.device());
  check_scalar_tensor(found_inf, "clip_coef_from_summaries", "found_inf", summaries.device());
  const at::Tensor rows = summaries.contiguous();
  const NormPartial total = combine_partials(rows.const_data_ptr<double>(), rows.size(0), norm_kind(norm_type),
                                             norm_type);
  return norm_and_coef(total, norm_type, max_norm, scalar_value(inv_scale), found_inf, norm_dtype);
}

// tensors *= c: the dense ones chunk by chunk in parallel, the others by scale_non_dense.
void scale_list(at::TensorList tensors, const at::Tensor& coef) {
  const double c = *coef.const_data_ptr<double>();
  if (c == 1.0) return;  // nothing to clip or unscale: leave the memory untouched
  std::vector<at::Tensor> unused;
  std::vector<int64_t> non_dense;
  const std::vector<FlatView> views = flat_views(tensors, unused, &non_dense);
  for (const int64_t i : non_dense) scale_non_dense(tensors[i], coef);
  NANOPS_CPU_DISPATCH(scale_chunks, views, cpu::make_chunks(views), c);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_grad_norm_cpu(
    at::TensorList grads, double max_norm, double norm_type, const std::optional<at::Tensor>& inv_scale,
    const std::optional<at::Tensor>& found_inf, bool scale_grads) {
  TORCH_CHECK_VALUE(!grads.empty(), "clip_grad_norm_: empty gradient list");
  check_clip_scalars(norm_type, max_norm, "clip_grad_norm_");
  check_tensor_list(grads, "clip_grad_norm_", IntegerTensors::Reject);
  check_scalar_tensor(inv_scale, "clip_grad_norm_", "inv_scale", grads[0].device());
  check_scalar_tensor(found_inf, "clip_grad_norm_", "found_inf", grads[0].device());
  const double s = scalar_value(inv_scale);
  auto [total_norm, coef] = norm_and_coef(summarise(grads, norm_type, s), norm_type, max_norm, s, found_inf,
                                          norm_dtype(grads));
  at::Tensor divisor = at::empty({}, at::TensorOptions().dtype(at::kFloat));
  divisor.fill_(1.0 / *coef.const_data_ptr<double>());
  if (scale_grads) scale_list(grads, coef);
  return {total_norm, coef, divisor};
}

void scale_tensors_cpu(at::TensorList tensors, const at::Tensor& coef) {
  if (tensors.empty()) return;
  check_tensor_list(tensors, "scale_tensors_", IntegerTensors::Reject);
  check_scale_coef(coef, tensors[0].device());
  scale_list(tensors, coef);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CPU, m) {
  m.impl("grad_norm_summary", &grad_norm_summary_cpu);
  m.impl("clip_coef_from_summaries", &clip_coef_from_summaries_cpu);
  m.impl("clip_grad_norm_", &clip_grad_norm_cpu);
  m.impl("scale_tensors_", &scale_tensors_cpu);
}

}  // namespace nanops
