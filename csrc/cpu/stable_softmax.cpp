// CPU kernels of nanops::stable_softmax and its backward: rows spread over threads, each row
// computed in the accumulation dtype (float32 for 16-bit inputs) in a cache-resident buffer.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "softmax_problem.h"

namespace nanops {
namespace {

// Rows per parallel task: keeps tasks around a few hundred microseconds for L ~ 400.
int64_t grain_rows(int64_t len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)); }

// z = scale * x + mask, with masked-out (bool False) positions at -inf.
template <typename T, typename acc_t>
void load_logits(const T* x, int64_t len, acc_t scale, MaskKind kind, const void* mask_row, int64_t mask_stride,
                 acc_t* z) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  if (kind == MaskKind::None) {
    for (int64_t j = 0; j < len; ++j) z[j] = scale * static_cast<acc_t>(x[j]);
  } else if (kind == MaskKind::Bool) {
    const bool* m = static_cast<const bool*>(mask_row);
    for (int64_t j = 0; j < len; ++j) z[j] = m[j * mask_stride] ? scale * static_cast<acc_t>(x[j]) : neg_inf;
  } else {
    const acc_t* m = static_cast<const acc_t*>(mask_row);
    for (int64_t j = 0; j < len; ++j) z[j] = scale * static_cast<acc_t>(x[j]) + m[j * mask_stride];
  }
}

// Turns logits z into probabilities in place. Rows whose max is -inf (all masked) become
// zeros; rows holding +inf share the mass equally among the +inf positions; a NaN anywhere
// in the row makes the row NaN (the input was already broken, and hiding it would be worse).
template <typename acc_t>
void softmax_row_inplace(acc_t* z, int64_t len) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  const acc_t max = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, z, len);
  if (max == -inf) {
    std::fill(z, z + len, acc_t(0));
    return;
  }
  if (max == inf) {
    int64_t count = 0;
    for (int64_t j = 0; j < len; ++j) count += z[j] == inf;
    const acc_t share = acc_t(1) / static_cast<acc_t>(count);
    for (int64_t j = 0; j < len; ++j) z[j] = z[j] == inf ? share : acc_t(0);
    return;
  }
  at::vec::map([max](Vec v) { return (v - Vec(max)).exp(); }, z, z, len);
  const acc_t sum = at::vec::reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, z, len);
  const acc_t inv = acc_t(1) / sum;
  at::vec::map([inv](Vec v) { return v * Vec(inv); }, z, z, len);
}

at::Tensor stable_softmax_cpu(const at::Tensor& x, int64_t dim, double scale, const std::optional<at::Tensor>& mask) {
  const SoftmaxProblem p = make_softmax_problem(x, dim, mask);
  at::Tensor out = at::empty(p.x.sizes(), p.x.options());
  if (p.rows == 0) return restore_softmax_layout(out, p);
  const int64_t len = p.len;
  const int64_t mask_elem = p.mask_kind == MaskKind::None ? 0 : p.mask.element_size();
  const char* mask_base = p.mask_kind == MaskKind::None ? nullptr : static_cast<const char*>(p.mask.data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "stable_softmax_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xs = p.x.const_data_ptr<scalar_t>();
    scalar_t* ys = out.data_ptr<scalar_t>();
    at::parallel_for(0, p.rows, grain_rows(len), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(len);
      for (int64_t r = begin; r < end; ++r) {
        const void* mask_row = mask_base ? mask_base + p.mask_index.row_offset(r) * mask_elem : nullptr;
        load_logits(xs + r * len, len, static_cast<acc_t>(scale), p.mask_kind, mask_row, p.mask_index.inner_stride,
                    z.data());
        softmax_row_inplace(z.data(), len);
        scalar_t* y = ys + r * len;
        for (int64_t j = 0; j < len; ++j) y[j] = static_cast<scalar_t>(z[j]);
      }
    });
  });
  return restore_softmax_layout(out, p);
}

at::Tensor stable_softmax_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, int64_t dim, double scale) {
  at::Tensor y_last;
  const SoftmaxProblem p = make_softmax_backward_problem(grad_y, y, dim, y_last);
  at::Tensor grad_x = at::empty(p.x.sizes(), p.x.options());
  if (p.rows == 0) return restore_softmax_layout(grad_x, p);
  const int64_t len = p.len;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "stable_softmax_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using Vec = at::vec::Vectorized<acc_t>;
    const scalar_t* gs = p.x.const_data_ptr<scalar_t>();
    const scalar_t* ys = y_last.const_data_ptr<scalar_t>();
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, p.rows, grain_rows(len), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> g(len), yy(len);
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t j = 0; j < len; ++j) {
          g[j] = static_cast<acc_t>(gs[r * len + j]);
          yy[j] = static_cast<acc_t>(ys[r * len + j]);
        }
        const acc_t dot = at::vec::map2_reduce_all<acc_t>(
            [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, g.data(), yy.data(), len);
        const acc_t s = static_cast<acc_t>(scale);
        scalar_t* o = out + r * len;
        for (int64_t j = 0; j < len; ++j) o[j] = static_cast<scalar_t>(s * yy[j] * (g[j] - dot));
      }
    });
  });
  return restore_softmax_layout(grad_x, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CPU, m) {
  m.impl("stable_softmax", &stable_softmax_cpu);
  m.impl("stable_softmax_backward", &stable_softmax_backward_cpu);
}

}  // namespace nanops
