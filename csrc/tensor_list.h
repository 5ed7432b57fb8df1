// Host-side helpers shared by every tensor-list op, CPU and CUDA alike.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace nanops {

// One tensor of a list seen as a single dense run of memory. Element order is the
// storage order, which is all a reduction or an elementwise scale needs.
struct FlatView {
  void* data;
  int64_t numel;
  c10::ScalarType dtype;
  int64_t index;  // position in the caller's list
};

enum class IntegerTensors { Reject, CountAsFinite };

// Checks shared by the tensor-list ops: one device for the whole list, strided layout, a
// supported dtype. Messages name `op` and the offending position.
void check_tensor_list(at::TensorList tensors, const char* op, IntegerTensors integers);

// True for the dtypes the kernels read: float32, float16, bfloat16, float64.
bool is_kernel_dtype(c10::ScalarType dtype);

// Flat views over the non-empty floating tensors of `tensors`. A tensor whose memory is not
// one dense run (a strided slice, an expanded view) is copied on its own into `copies`, or,
// when `non_dense` is given, listed there and left out (in-place ops handle those apart).
std::vector<FlatView> flat_views(
    at::TensorList tensors,
    std::vector<at::Tensor>& copies,
    std::vector<int64_t>* non_dense = nullptr);

// An optional one-element float32/float64 tensor argument (inv_scale, found_inf) on `device`.
void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* op, const char* name,
                         const c10::Device& device);

// The coef argument of scale_tensors_: one float64 element on `device`.
void check_scale_coef(const at::Tensor& coef, const c10::Device& device);

// The (k, fields) float64 summaries argument of clip_coef_from_summaries.
void check_norm_summaries(const at::Tensor& summaries, int64_t fields);

}  // namespace nanops
