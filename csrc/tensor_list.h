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

// True for the dtypes the kernels read: float32, float16, bfloat16, float64.
bool is_kernel_dtype(c10::ScalarType dtype);

// Checks shared by the tensor-list ops: one device for the whole list, strided layout, a
// supported dtype. Messages name `op` and the offending position.
void check_tensor_list(at::TensorList tensors, const char* op, IntegerTensors integers);


// Calls view(t, i) with each non-empty floating tensor of `tensors` as one dense run of memory,
// i its position in the list. A tensor whose memory is not one dense run (a strided slice, an
// expanded view) is copied on its own into `copies`, or, when `non_dense` is given, listed there
// and left out (in-place ops handle those apart).
template <typename View>
void for_each_flat(at::TensorList tensors, std::vector<at::Tensor>& copies, std::vector<int64_t>* non_dense,
                   View&& view) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0 || !is_kernel_dtype(t.scalar_type())) {
      continue;
    }
    // A permuted or transposed tensor still covers [data_ptr, data_ptr + numel) exactly
    // (torch strides are never negative), so it needs no copy.
    if (!t.is_non_overlapping_and_dense()) {
      if (non_dense != nullptr) {
        non_dense->push_back(static_cast<int64_t>(i));
        continue;
      }
      copies.push_back(t.contiguous());
      view(copies.back(), static_cast<int64_t>(i));
      continue;
    }
    view(t, static_cast<int64_t>(i));
  }
}

// for_each_flat's tensors as FlatViews.
std::vector<FlatView> flat_views(
    at::TensorList tensors,
    std::vector<at::Tensor>& copies,
    std::vector<int64_t>* non_dense = nullptr);

// An optional one-element float32/float64 tensor argument (inv_scale, found_inf) on `device`.
void check_scalar_tensor(const std::optional<at::Tensor>& t, const char* op, const char* name,
                         const c10::Device& device);

// The coef argument of scale_tensors_: one float64 element on `device`.
void check_scale_coef(const at::Tensor& coef, const c10::Device& device);

// The dtype of the total norm of `tensors`: the promotion of all their dtypes (whatever their
// order), float32 where that is a 16-bit type (a float16 norm would overflow where the grads do not).
c10::ScalarType norm_dtype(at::TensorList tensors);

// The largest finite value of a floating dtype (a norm beyond it is reported inf).
double dtype_max(c10::ScalarType dtype);

// t *= coef (one float64 element) for a tensor the flat kernels skip (not one dense run of
// memory), with the product formed as the kernels form it: in float32 for 16-bit t, so a
// non-dense grad gets exactly the dense result.
void scale_non_dense(const at::Tensor& t, const at::Tensor& coef);

// The scalar arguments of the fused clip: norm_type >= 0 (inf allowed), max_norm >= 0 (inf allowed).
void check_clip_scalars(double norm_type, double max_norm, const char* op);

// The (k, fields) float64 summaries argument of clip_coef_from_summaries.
void check_norm_summaries(const at::Tensor& summaries, int64_t fields);

}  // namespace nanops
