// CPU kernels of nanops::stable_softmax and its backward: rows spread over threads, each row
// computed in the accumulation dtype (float32 for 16-bit inputs) in a cache-resident buffer.
// The row loops live in softmax_rows.h, compiled per instruction set and picked here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu/softmax_rows_variants.h"
#include "softmax_problem.h"

namespace nanops {
namespace {

at::Tensor stable_softmax_cpu(const at::Tensor& x, int64_t dim, double scale, const std::optional<at::Tensor>& mask) {
  const SoftmaxProblem p = make_softmax_problem(x, dim, mask);
  at::Tensor out = at::empty(p.x.sizes(), p.x.options());
  if (p.rows > 0) NANOPS_CPU_DISPATCH(softmax_forward_rows, p, scale, out);
  return restore_softmax_layout(out, p);
}

at::Tensor stable_softmax_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim, double scale) {
  at::Tensor y_last;
  const SoftmaxProblem p = make_softmax_backward_problem(grad_y, y, dim, y_last);
  at::Tensor grad_x = at::empty(p.x.sizes(), p.x.options());
  if (p.rows > 0) NANOPS_CPU_DISPATCH(softmax_backward_rows, p, y_last, scale, grad_x);
  return restore_softmax_layout(grad_x, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CPU, m) {
  m.impl("stable_softmax", &stable_softmax_cpu);
  m.impl("stable_softmax_backward", &stable_softmax_backward_cpu);
}

}  // namespace nanops
