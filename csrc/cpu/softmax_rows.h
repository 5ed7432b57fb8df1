// Row kernels of the CPU stable_softmax, compiled once per instruction set: included by
// softmax_rows_base.cpp and softmax_rows_avx2.cpp after they pick the ISA (ATen's
// CPU_CAPABILITY scheme), and chosen at run time in stable_softmax.cpp.
// NANOPS_CPU_VARIANT names the namespace of this copy.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/softmax_rows_variants.h"

namespace nanops::cpu::NANOPS_CPU_VARIANT {
namespace {

template <typename T>
using Acc = at::opmath_type<T>;

// Rows per parallel task: a few hundred microseconds of work for L ~ 400.
int64_t grain_rows(int64_t len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)); }

// y[0:n] = z[0:n] * factor, converted to T in the same pass.
template <typename T>
void from_acc_scaled(const Acc<T>* z, int64_t n, Acc<T> factor, T* y) {
  using AccVec = at::vec::Vectorized<Acc<T>>;
  const AccVec f(factor);
  int64_t j = 0;
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      at::vec::convert_from_float<T>(AccVec::loadu(z + j) * f, AccVec::loadu(z + j + AccVec::size()) * f).store(y + j);
    }
  } else {
    for (; j + AccVec::size() <= n; j += AccVec::size()) (AccVec::loadu(z + j) * f).store(y + j);
  }
  for (; j < n; ++j) y[j] = static_cast<T>(z[j] * factor);
}

// Calls fn(j, v) for every full vector v = x[j : j + size] converted to the accumulation
// dtype; returns the index where the scalar tail starts.
template <typename T, typename Fn>
int64_t for_each_acc_vec(const T* x, int64_t n, Fn&& fn) {
  using AccVec = at::vec::Vectorized<Acc<T>>;
  int64_t j = 0;
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(Vec::loadu(x + j));
      fn(j, lo);
      fn(j + AccVec::size(), hi);
    }
  } else {
    for (; j + AccVec::size() <= n; j += AccVec::size()) fn(j, AccVec::loadu(x + j));
  }
  return j;
}

// z[0:n] = x[0:n] in the accumulation dtype, vectorised.
template <typename T>
void to_acc(const T* x, int64_t n, Acc<T>* z) {
  int64_t j = for_each_acc_vec(x, n, [z](int64_t at, at::vec::Vectorized<Acc<T>> v) { v.store(z + at); });
  for (; j < n; ++j) z[j] = static_cast<Acc<T>>(x[j]);
}

// Pass 1: z = scale * x + mask (masked-out bool positions at -inf); returns max(z), NaN if
// any z is NaN. No mask, or an additive mask contiguous along the row, is fused into the
// vector loop; other masks (broadcast along the row, bool) take a scalar pass.
template <typename T>
Acc<T> load_logits_max(const T* x, int64_t len, Acc<T> scale, MaskKind kind, const void* mask_row,
                       int64_t mask_stride, Acc<T>* z) {
  using acc_t = Acc<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t* add = kind == MaskKind::Additive ? static_cast<const acc_t*>(mask_row) : nullptr;
  const bool fused = kind == MaskKind::None || (add != nullptr && mask_stride == 1);
  Vec vmax(neg_inf);
  int64_t vec_end = 0;  // z[0:vec_end] is done and folded into vmax
  if (fused) {
    vec_end = for_each_acc_vec(x, len, [&](int64_t at, Vec v) {
      v = add ? at::vec::fmadd(v, Vec(scale), Vec::loadu(add + at)) : v * Vec(scale);
      v.store(z + at);
      vmax = at::vec::maximum(vmax, v);
    });
    for (int64_t j = vec_end; j < len; ++j) z[j] = scale * static_cast<acc_t>(x[j]) + (add ? add[j] : acc_t(0));
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const acc_t v = scale * static_cast<acc_t>(x[j]);
      if (add != nullptr) {
        z[j] = v + add[j * mask_stride];
      } else {
        z[j] = static_cast<const bool*>(mask_row)[j * mask_stride] ? v : neg_inf;
      }
    }
  }
  std::array<acc_t, Vec::size()> lanes;
  vmax.store(lanes.data());
  bool nan = false;
  acc_t max = neg_inf;
  for (const acc_t lane : lanes) {
    nan |= std::isnan(lane);
    max = std::max(max, lane);
  }
  for (int64_t j = vec_end; j < len; ++j) {
    nan |= std::isnan(z[j]);
    max = std::max(max, z[j]);
  }
  return nan ? std::numeric_limits<acc_t>::quiet_NaN() : max;
}

// Passes 2 and 3: probabilities from logits z with row max `max`, written to y. Rows whose
// max is -inf (all masked) become zeros; rows holding +inf share the mass equally among the
// +inf positions; a NaN anywhere in the row makes the row NaN (the input was already broken,
// and hiding it would be worse).
template <typename T>
void softmax_row_store(Acc<T>* z, int64_t len, Acc<T> max, T* y) {
  using acc_t = Acc<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  if (std::isnan(max)) {
    std::fill(y, y + len, static_cast<T>(std::numeric_limits<acc_t>::quiet_NaN()));
    return;
  }
  if (max == -inf) {
    std::fill(y, y + len, static_cast<T>(0));
    return;
  }
  if (max == inf) {
    int64_t count = 0;
    for (int64_t j = 0; j < len; ++j) count += z[j] == inf;
    const acc_t share = acc_t(1) / static_cast<acc_t>(count);
    for (int64_t j = 0; j < len; ++j) y[j] = static_cast<T>(z[j] == inf ? share : acc_t(0));
    return;
  }
  Vec vsum(acc_t(0));
  int64_t j = 0;
  for (; j + Vec::size() <= len; j += Vec::size()) {
    const Vec e = (Vec::loadu(z + j) - Vec(max)).exp();
    e.store(z + j);
    vsum = vsum + e;
  }
  std::array<acc_t, Vec::size()> lanes;
  vsum.store(lanes.data());
  acc_t sum = 0;
  for (const acc_t lane : lanes) sum += lane;
  for (; j < len; ++j) {
    z[j] = std::exp(z[j] - max);
    sum += z[j];
  }
  from_acc_scaled(z, len, acc_t(1) / sum, y);
}

}  // namespace

void softmax_forward_rows(const SoftmaxProblem& p, double scale, at::Tensor& out) {
  const int64_t len = p.len;
  const int64_t mask_elem = p.mask_kind == MaskKind::None ? 0 : p.mask.element_size();
  const char* mask_base = p.mask_kind == MaskKind::None ? nullptr : static_cast<const char*>(p.mask.const_data_ptr());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "stable_softmax_cpu", [&] {
    using acc_t = Acc<scalar_t>;
    const scalar_t* xs = p.x.const_data_ptr<scalar_t>();
    scalar_t* ys = out.data_ptr<scalar_t>();
    at::parallel_for(0, p.rows, grain_rows(len), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(len);
      for (int64_t r = begin; r < end; ++r) {
        const void* mask_row = mask_base ? mask_base + p.mask_index.row_offset(r) * mask_elem : nullptr;
        const acc_t max = load_logits_max(xs + r * len, len, static_cast<acc_t>(scale), p.mask_kind, mask_row,
                                          p.mask_index.inner_stride, z.data());
        softmax_row_store(z.data(), len, max, ys + r * len);
      }
    });
  });
}

namespace {

// grad_x = s * y * (g - <g, y>) for rows [begin, end).
template <typename T>
void backward_row_range(const T* gs, const T* ys, T* out, int64_t begin, int64_t end, int64_t len, Acc<T> s) {
  using acc_t = Acc<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  auto grad_x = [s](acc_t dot) { return [s, dot](Vec gv, Vec yv) { return Vec(s) * yv * (gv - Vec(dot)); }; };
  auto dot_of = [](const acc_t* a, const acc_t* b, int64_t n) {
    return at::vec::map2_reduce_all<acc_t>([](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; },
                                           a, b, n);
  };
  if constexpr (std::is_same_v<T, acc_t>) {
    // No conversion needed: one dot pass and one write pass straight over the rows.
    for (int64_t r = begin; r < end; ++r) {
      at::vec::map2(grad_x(dot_of(gs + r * len, ys + r * len, len)), out + r * len, gs + r * len, ys + r * len, len);
    }
  } else {
    std::vector<acc_t> g(len), yy(len);
    for (int64_t r = begin; r < end; ++r) {
      to_acc(gs + r * len, len, g.data());
      to_acc(ys + r * len, len, yy.data());
      at::vec::map2(grad_x(dot_of(g.data(), yy.data(), len)), g.data(), g.data(), yy.data(), len);
      from_acc_scaled(g.data(), len, Acc<T>(1), out + r * len);
    }
  }
}

}  // namespace

void softmax_backward_rows(const SoftmaxProblem& p, const at::Tensor& y_last, double scale, at::Tensor& grad_x) {
  const int64_t len = p.len;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "stable_softmax_backward_cpu", [&] {
    const scalar_t* gs = p.x.const_data_ptr<scalar_t>();
    const scalar_t* ys = y_last.const_data_ptr<scalar_t>();
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    const auto s = static_cast<Acc<scalar_t>>(scale);
    at::parallel_for(0, p.rows, grain_rows(len), [&](int64_t begin, int64_t end) {
      backward_row_range(gs, ys, out, begin, end, len, s);
    });
  });
}

}  // namespace nanops::cpu::NANOPS_CPU_VARIANT
