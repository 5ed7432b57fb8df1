#include "tensor_list.h"

#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace nanops {

bool is_kernel_dtype(c10::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble;
}

// ValueError (not RuntimeError) for every argument problem: the Python wrappers tell a list the
// op refuses (and another path takes) from a kernel's failure (out of memory, a device fault),
// which must never be retried.
void check_tensor_list(at::TensorList tensors, const char* op, IntegerTensors integers) {
  if (tensors.empty()) {
    return;
  }
  const c10::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), op, ": tensors[", i, "] is undefined (pass None only to the Python wrapper)");
    TORCH_CHECK_VALUE(t.device() == device, op, ": all tensors must be on one device, but tensors[0] is on ",
                      device, " and tensors[", i, "] is on ", t.device());
    TORCH_CHECK_VALUE(t.layout() == c10::kStrided, op, ": tensors[", i, "] has layout ", t.layout(),
                      "; only dense (strided) tensors are supported, call .to_dense() first");
    const auto dtype = t.scalar_type();
    if (is_kernel_dtype(dtype)) {
      continue;
    }
    const bool integral = c10::isIntegralType(dtype, /*includeBool=*/true);
    TORCH_CHECK_VALUE(integral && integers == IntegerTensors::CountAsFinite, op, ": tensors[", i,
                      "] has dtype ", dtype, "; supported dtypes are float32, float16, bfloat16 and float64");
  }
}

std::vector<FlatView> flat_views(
    at::TensorList tensors, std::vector<at::Tensor>& copies, std::vector<int64_t>* non_dense) {
  std::vector<FlatView> views;
  views.reserve(tensors.size());
  for_each_flat(tensors, copies, non_dense, [&](const at::Tensor& t, int64_t index) {
    views.push_back(FlatView{t.data_ptr(), t.numel(), t.scalar_type(), index});
  });
  return views;
}

void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* op, const char* name,
                         const c10::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->numel() == 1, op, ": ", name, " must hold exactly one element, got shape ", t->sizes());
  TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": ", name,
                    " must be float32 or float64, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == device, op, ": ", name, " is on ", t->device(), " but the tensors are on ", device);
}

void check_scale_coef(const at::Tensor& coef, const c10::Device& device) {
  TORCH_CHECK(coef.numel() == 1 && coef.scalar_type() == at::kDouble && coef.device() == device,
              "scale_tensors_: coef must be a one-element float64 tensor on ", device, ", got ", coef.scalar_type(),
              " of shape ", coef.sizes(), " on ", coef.device());
}

c10::ScalarType norm_dtype(at::TensorList tensors) {
  c10::ScalarType dtype = tensors[0].scalar_type();
  for (const at::Tensor& t : tensors) dtype = c10::promoteTypes(dtype, t.scalar_type());
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

double dtype_max(c10::ScalarType dtype) {
  double out = INFINITY;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dtype_max", [&] {
    out = static_cast<double>(std::numeric_limits<scalar_t>::max());
  });
  return out;
}

void scale_non_dense(const at::Tensor& t, const at::Tensor& coef) {
  if (t.element_size() == 2) {
    t.copy_(t.to(at::kFloat).mul_(coef.to(at::kFloat)));
  } else {
    t.mul_(coef.to(t.scalar_type()));
  }
}

void check_clip_scalars(double norm_type, double max_norm, const char* op) {
  TORCH_CHECK_VALUE(norm_type >= 0.0, op, ": norm_type must be >= 0 or inf, got ", norm_type);
  TORCH_CHECK_VALUE(max_norm >= 0.0, op, ": max_norm must be >= 0 (inf allowed), got ", max_norm);
}

void check_norm_summaries(const at::Tensor& summaries, int64_t fields) {
  TORCH_CHECK(summaries.dim() == 2 && summaries.size(1) == fields && summaries.scalar_type() == at::kDouble,
              "clip_coef_from_summaries: summaries must be float64 of shape (k, ", fields, "), got ",
              summaries.scalar_type(), " ", summaries.sizes());
}

}  // namespace nanops
