#include "softmax_problem.h"

#include <c10/util/Exception.h>
#include <c10/core/WrapDimMinimal.h>

#include "tensor_list.h"

namespace nanops {
namespace {

at::Tensor move_dim_last(const at::Tensor& t, int64_t dim) {
  return dim == t.dim() - 1 ? t : t.movedim(dim, -1);
}

}  // namespace

SoftmaxProblem make_softmax_problem(const at::Tensor& x, int64_t dim, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), "stable_softmax: x has dtype ", x.scalar_type(),
              "; supported dtypes are float32, float16, bfloat16 and float64");
  TORCH_CHECK(x.layout() == c10::kStrided, "stable_softmax: x must be a dense (strided) tensor");
  TORCH_CHECK(x.dim() >= 1, "stable_softmax: x must have at least one dimension (got a scalar)");
  TORCH_CHECK(x.dim() <= kMaxSoftmaxDims + 1, "stable_softmax: x has ", x.dim(), " dimensions; at most ",
              kMaxSoftmaxDims + 1, " are supported");
  SoftmaxProblem p;
  p.dim = c10::maybe_wrap_dim(dim, x.dim());
  p.x = move_dim_last(x, p.dim).contiguous();
  p.len = p.x.size(-1);
  p.rows = p.len == 0 ? 0 : p.x.numel() / p.len;

  if (!mask.has_value() || !mask->defined()) {
    return p;
  }
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device() == x.device(), "stable_softmax: mask is on ", m.device(), " but x is on ", x.device());
  TORCH_CHECK(m.layout() == c10::kStrided, "stable_softmax: mask must be a dense (strided) tensor");
  TORCH_CHECK(m.scalar_type() == at::kBool || is_kernel_dtype(m.scalar_type()), "stable_softmax: mask has dtype ",
              m.scalar_type(), "; pass a bool mask (True = takes part) or a floating additive mask");
  TORCH_CHECK(m.dim() <= x.dim(), "stable_softmax: mask of shape ", m.sizes(), " has more dimensions than x of shape ",
              x.sizes());
  for (int64_t i = 1; i <= m.dim(); ++i) {
    const int64_t ms = m.size(-i), xs = x.size(-i);
    TORCH_CHECK(ms == xs || ms == 1, "stable_softmax: mask of shape ", m.sizes(),
                " does not broadcast to x of shape ", x.sizes(), " (dim ", -i, ": ", ms, " vs ", xs, ")");
  }
  // Additive masks are added in the accumulation dtype, so a -1e9 float32 mask on float16 logits
  // keeps its meaning (it is not rounded to -inf). A mask already in x's 16-bit dtype is read
  // as it is; any other dtype is converted once here (the un-broadcast mask: cheap).
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool like_x = m.scalar_type() == x.scalar_type() && x.element_size() == 2;
  if (m.scalar_type() == at::kBool) {
    p.mask_kind = MaskKind::Bool;
    p.mask = m;
  } else if (like_x) {
    p.mask_kind = MaskKind::AdditiveLikeX;
    p.mask = m;
  } else {
    p.mask_kind = MaskKind::Additive;
    p.mask = m.to(acc_dtype);
  }
  const at::Tensor view = move_dim_last(p.mask.expand(x.sizes()), p.dim);
  p.mask_index = MaskIndexer::make(view.sizes().data(), view.strides().data(), static_cast<int>(view.dim() - 1),
                                   view.stride(-1), p.rows);
  // The kernels add offsets to the mask's data pointer, which must point at element 0 of the view.
  p.mask = view;
  return p;
}

SoftmaxProblem make_softmax_backward_problem(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim,
                                             at::Tensor& y_last) {
  TORCH_CHECK(grad_y.sizes() == y.sizes(), "stable_softmax_backward: grad_y of shape ", grad_y.sizes(),
              " does not match y of shape ", y.sizes());
  TORCH_CHECK(grad_y.device() == y.device(), "stable_softmax_backward: grad_y is on ", grad_y.device(),
              " but y is on ", y.device());
  TORCH_CHECK(grad_y.scalar_type() == y.scalar_type(), "stable_softmax_backward: grad_y has dtype ",
              grad_y.scalar_type(), " but y has dtype ", y.scalar_type());
  SoftmaxProblem p = make_softmax_problem(grad_y, dim, std::nullopt);
  y_last = move_dim_last(y, p.dim).contiguous();
  return p;
}

at::Tensor restore_softmax_layout(const at::Tensor& out_last, const SoftmaxProblem& problem) {
  const int64_t last = out_last.dim() - 1;
  return problem.dim == last ? out_last : out_last.movedim(last, problem.dim).contiguous();
}

}  // namespace nanops
