// Host-side helpers of the CUDA ops (C++ compiler, torch headers): tensors to the plain views
// and scalars of cuda/launch.h. Launch errors are checked with C10_CUDA_CHECK.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>

#include <optional>
#include <vector>

#include "cuda/launch.h"
#include "tensor_list.h"

namespace nanops::cuda {

inline ElemType elem_type(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float: return ElemType::Float;
    case c10::ScalarType::Half: return ElemType::Half;
    case c10::ScalarType::BFloat16: return ElemType::BFloat16;
    case c10::ScalarType::Double: return ElemType::Double;
    default: TORCH_CHECK(false, "nanops CUDA kernels: unsupported dtype ", dtype);
  }
}

// The launch views of `tensors` (see for_each_flat), built in one pass: no FlatView list first.
inline std::vector<DeviceView> device_views(at::TensorList tensors, std::vector<at::Tensor>& copies,
                                            std::vector<int64_t>* non_dense = nullptr) {
  std::vector<DeviceView> out;
  out.reserve(tensors.size());
  for_each_flat(tensors, copies, non_dense, [&](const at::Tensor& t, int64_t index) {
    out.push_back(DeviceView{t.data_ptr(), t.numel(), index, elem_type(t.scalar_type())});
  });
  return out;
}

// An optional inv_scale / found_inf argument, checked (naming it) and seen as a ScalarArg.
inline ScalarArg scalar_arg(const std::optional<at::Tensor>& t, const char* op, const char* name,
                            const c10::Device& device) {
  check_scalar_tensor(t, op, name, device);
  if (!t.has_value()) return ScalarArg{nullptr, false};
  return ScalarArg{t->const_data_ptr(), t->scalar_type() == at::kDouble};
}

}  // namespace nanops::cuda
