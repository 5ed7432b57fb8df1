#include "tensor_list.h"

#include <c10/util/Exception.h>

namespace nanops {

bool is_kernel_dtype(c10::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble;
}

void check_tensor_list(at::TensorList tensors, const char* op, IntegerTensors integers) {
  if (tensors.empty()) {
    return;
  }
  const c10::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": tensors[", i, "] is undefined (pass None only to the Python wrapper)");
    TORCH_CHECK(t.device() == device, op, ": all tensors must be on one device, but tensors[0] is on ",
                device, " and tensors[", i, "] is on ", t.device());
    TORCH_CHECK(t.layout() == c10::kStrided, op, ": tensors[", i, "] has layout ", t.layout(),
                "; only dense (strided) tensors are supported, call .to_dense() first");
    const auto dtype = t.scalar_type();
    if (is_kernel_dtype(dtype)) {
      continue;
    }
    const bool integral = c10::isIntegralType(dtype, /*includeBool=*/true);
    TORCH_CHECK(integral && integers == IntegerTensors::CountAsFinite, op, ": tensors[", i,
                "] has dtype ", dtype, "; supported dtypes are float32, float16, bfloat16 and float64");
  }
}

std::vector<FlatView> flat_views(
    at::TensorList tensors, std::vector<at::Tensor>& copies, std::vector<int64_t>* non_dense) {
  std::vector<FlatView> views;
  views.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0 || !is_kernel_dtype(t.scalar_type())) {
      continue;
    }
    // A permuted or transposed tensor still covers [data_ptr, data_ptr + numel) exactly
    // (torch strides are never negative), so it needs no copy.
    const at::Tensor* source = &t;
    if (!t.is_non_overlapping_and_dense()) {
      if (non_dense != nullptr) {
        non_dense->push_back(static_cast<int64_t>(i));
        continue;
      }
      copies.push_back(t.contiguous());
      source = &copies.back();
    }
    views.push_back(FlatView{source->data_ptr(), source->numel(), source->scalar_type(), static_cast<int64_t>(i)});
  }
  return views;
}

void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* op, const char* name,
                         const c10::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must hold exactly one element, got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t->scalar_type());
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), " but the tensors are on ", device);
}

void check_scale_coef(const at::Tensor& coef, const c10::Device& device) {
  TORCH_CHECK(coef.numel() == 1 && coef.scalar_type() == at::kDouble && coef.device() == device,
              "scale_tensors_: coef must be a one-element float64 tensor on ", device, ", got ", coef.scalar_type(),
              " of shape ", coef.sizes(), " on ", coef.device());
}

void check_norm_summaries(const at::Tensor& summaries, int64_t fields) {
  TORCH_CHECK(summaries.dim() == 2 && summaries.size(1) == fields && summaries.scalar_type() == at::kDouble,
              "clip_coef_from_summaries: summaries must be float64 of shape (k, ", fields, "), got ",
              summaries.scalar_type(), " ", summaries.sizes());
}

}  // namespace nanops
