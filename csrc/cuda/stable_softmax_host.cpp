// Host side of the CUDA stable_softmax and its backward: argument checks and shaping
// (softmax_problem.h), outputs, registration. Kernels: stable_softmax.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/host.h"
#include "softmax_problem.h"

namespace nanops {
namespace {

at::Tensor stable_softmax_cuda(const at::Tensor& x, int64_t dim, double scale, const std::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  const SoftmaxProblem p = make_softmax_problem(x, dim, mask);
  at::Tensor out = at::empty(p.x.sizes(), p.x.options());
  if (p.rows == 0) return restore_softmax_layout(out, p);
  TORCH_CHECK(cuda::softmax_rows_fit(p.rows, p.len), "stable_softmax: ", p.rows, " rows of ", p.len,
              " elements are more than one CUDA launch takes");
  C10_CUDA_CHECK(cuda::launch_softmax_forward(cuda::elem_type(p.x.scalar_type()), p.x.const_data_ptr(),
                                              out.data_ptr(), p.rows, p.len, scale, p.mask_kind,
                                              p.mask_kind == MaskKind::None ? nullptr : p.mask.const_data_ptr(),
                                              p.mask_index, c10::cuda::getCurrentCUDAStream()));
  return restore_softmax_layout(out, p);
}

at::Tensor stable_softmax_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim, double scale) {
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor y_last;
  const SoftmaxProblem p = make_softmax_backward_problem(grad_y, y, dim, y_last);
  at::Tensor grad_x = at::empty(p.x.sizes(), p.x.options());
  if (p.rows == 0) return restore_softmax_layout(grad_x, p);
  TORCH_CHECK(cuda::softmax_rows_fit(p.rows, p.len), "stable_softmax_backward: ", p.rows, " rows of ", p.len,
              " elements are more than one CUDA launch takes");
  C10_CUDA_CHECK(cuda::launch_softmax_backward(cuda::elem_type(p.x.scalar_type()), p.x.const_data_ptr(),
                                               y_last.const_data_ptr(), grad_x.data_ptr(), p.rows, p.len, scale,
                                               c10::cuda::getCurrentCUDAStream()));
  return restore_softmax_layout(grad_x, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CUDA, m) {
  m.impl("stable_softmax", &stable_softmax_cuda);
  m.impl("stable_softmax_backward", &stable_softmax_backward_cuda);
}

}  // namespace nanops
