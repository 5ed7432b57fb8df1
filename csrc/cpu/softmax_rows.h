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
#include <tuple>
#include <vector>

#include "cpu/softmax_rows_variants.h"

namespace nanops::cpu::NANOPS_CPU_VARIANT {
namespace {

template <typename T>
using Acc = at::opmath_type<T>;

template <typename T>
using AccVec = at::vec::Vectorized<Acc<T>>;

// Every row loop steps by two accumulation vectors: one Vectorized<T> for 16-bit T (widened to
// float in registers), two plain loads otherwise, so one loop body serves every dtype and the
// two halves give two independent accumulator chains.
template <typename T>
constexpr int64_t kStep = 2 * AccVec<T>::size();

template <typename T>
std::tuple<AccVec<T>, AccVec<T>> load_acc_pair(const T* x) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    return at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(x));
  } else {
    return {AccVec<T>::loadu(x), AccVec<T>::loadu(x + AccVec<T>::size())};
  }
}

template <typename T>
void store_acc_pair(T* y, AccVec<T> lo, AccVec<T> hi) {
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    at::vec::convert_from_float<T>(lo, hi).store(y);
  } else {
    lo.store(y);
    hi.store(y + AccVec<T>::size());
  }
}

template <typename A, typename Op>
A reduce_lanes(at::vec::Vectorized<A> v, A init, Op op) {
  std::array<A, at::vec::Vectorized<A>::size()> lanes;
  v.store(lanes.data());
  for (const A lane : lanes) init = op(init, lane);
  return init;
}

// Rows per parallel task: a few hundred microseconds of work for L ~ 400.
int64_t grain_rows(int64_t len) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(len, 1)); }

// One row's mask. An additive mask is stored either in the accumulation dtype or in x's own
// 16-bit dtype (M); both are widened as they are read, so neither needs a converted copy.
template <typename M>
struct MaskRow {
  MaskKind kind = MaskKind::None;
  const void* data = nullptr;  // start of this row's mask
  int64_t stride = 0;          // along the row: 1, or 0 when the mask broadcasts there

  const M* additive() const {
    return kind == MaskKind::Additive || kind == MaskKind::AdditiveLikeX ? static_cast<const M*>(data) : nullptr;
  }
  const bool* keep() const { return static_cast<const bool*>(data); }
};

// scale * x plus an additive mask entry; -inf masks the position even where the logit is +inf or
// NaN (inf + -inf would be NaN), as False does in a bool mask.
template <typename acc_t>
inline acc_t masked_logit(acc_t scaled, acc_t add) {
  return add == -std::numeric_limits<acc_t>::infinity() ? add : scaled + add;
}

// Pass 1: z = scale * x + mask (masked-out bool positions at -inf); returns max(z), NaN if
// any z is NaN. No mask, or an additive mask contiguous along the row, is fused into the
// vector loop; other masks (broadcast along the row, bool) take a scalar pass.
template <typename T, typename M>
Acc<T> load_logits_max(const T* x, int64_t len, Acc<T> scale, const MaskRow<M>& mask, Acc<T>* z) {
  using acc_t = Acc<T>;
  using Vec = AccVec<T>;
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const M* add = mask.additive();
  const bool fused = mask.kind == MaskKind::None || (add != nullptr && mask.stride == 1);
  const Vec vscale(scale);
  const Vec vneg_inf(neg_inf);
  Vec vmax0(neg_inf), vmax1(neg_inf);
  int64_t vec_end = 0;  // z[0:vec_end] is done and folded into vmax0/vmax1
  if (fused) {
    vec_end = len - len % kStep<T>;
    for (int64_t j = 0; j < vec_end; j += kStep<T>) {
      auto [v0, v1] = load_acc_pair(x + j);
      if (add != nullptr) {
        const auto [m0, m1] = load_acc_pair(add + j);
        // A -inf mask entry means "masked", whatever the logit (+inf or NaN included), as a bool mask.
        v0 = Vec::blendv(at::vec::fmadd(v0, vscale, m0), vneg_inf, m0 == vneg_inf);
        v1 = Vec::blendv(at::vec::fmadd(v1, vscale, m1), vneg_inf, m1 == vneg_inf);
      } else {
        v0 = v0 * vscale;
        v1 = v1 * vscale;
      }
      v0.store(z + j);
      v1.store(z + j + Vec::size());
      vmax0 = at::vec::maximum(vmax0, v0);
      vmax1 = at::vec::maximum(vmax1, v1);
    }
    for (int64_t j = vec_end; j < len; ++j) {
      z[j] = masked_logit(scale * static_cast<acc_t>(x[j]), add != nullptr ? static_cast<acc_t>(add[j]) : acc_t(0));
    }
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const acc_t v = scale * static_cast<acc_t>(x[j]);
      z[j] = add != nullptr ? masked_logit(v, static_cast<acc_t>(add[j * mask.stride]))
                            : (mask.keep()[j * mask.stride] ? v : neg_inf);
    }
  }
  // at::vec::maximum propagates NaN, so any NaN lane survives into this reduction.
  bool nan = false;
  acc_t max = reduce_lanes<acc_t>(at::vec::maximum(vmax0, vmax1), neg_inf, [&nan](acc_t m, acc_t lane) {
    nan |= std::isnan(lane);
    return std::max(m, lane);
  });
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
  using Vec = AccVec<T>;
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
  // Here every z - max lies in [-inf, 0]. exp_u20 (ATen's inline polynomial exp, no Sleef call)
  // is within a few float32 ulp there and maps -inf to 0; it is what makes this kernel faster
  // than torch.softmax, whose row loop is bound by Sleef's exp.
  const int64_t vec_end = len - len % kStep<T>;
  const Vec vmax(max);
  Vec sum0(acc_t(0)), sum1(acc_t(0));
  for (int64_t j = 0; j < vec_end; j += kStep<T>) {
    const Vec e0 = (Vec::loadu(z + j) - vmax).exp_u20();
    const Vec e1 = (Vec::loadu(z + j + Vec::size()) - vmax).exp_u20();
    e0.store(z + j);
    e1.store(z + j + Vec::size());
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
  }
  acc_t sum = reduce_lanes<acc_t>(sum0 + sum1, acc_t(0), [](acc_t a, acc_t b) { return a + b; });
  for (int64_t j = vec_end; j < len; ++j) {
    z[j] = std::exp(z[j] - max);
    sum += z[j];
  }
  const acc_t inv_sum = acc_t(1) / sum;
  const Vec vinv(inv_sum);
  for (int64_t j = 0; j < vec_end; j += kStep<T>) {
    store_acc_pair(y + j, Vec::loadu(z + j) * vinv, Vec::loadu(z + j + Vec::size()) * vinv);
  }
  for (int64_t j = vec_end; j < len; ++j) y[j] = static_cast<T>(z[j] * inv_sum);
}

// All rows of the forward, with the mask (if additive) stored as M.
template <typename T, typename M>
void forward_rows(const SoftmaxProblem& p, Acc<T> scale, const T* xs, T* ys) {
  const int64_t len = p.len;
  const bool has_mask = p.mask_kind != MaskKind::None;
  const char* mask_base = has_mask ? static_cast<const char*>(p.mask.const_data_ptr()) : nullptr;
  const int64_t mask_elem = has_mask ? p.mask.element_size() : 0;
  at::parallel_for(0, p.rows, grain_rows(len), [&](int64_t begin, int64_t end) {
    std::vector<Acc<T>> z(len);
    MaskRow<M> mask{p.mask_kind, nullptr, p.mask_index.inner_stride};
    for (int64_t r = begin; r < end; ++r) {
      if (has_mask) mask.data = mask_base + p.mask_index.row_offset(r) * mask_elem;
      const Acc<T> max = load_logits_max(xs + r * len, len, scale, mask, z.data());
      softmax_row_store(z.data(), len, max, ys + r * len);
    }
  });
}

// One row of the backward, grad_x = s * y * (g - <g, y>): a dot pass and a write pass straight
// over the row (cache-resident), 16-bit values widened in registers, two accumulators.
template <typename T>
void backward_row(const T* g, const T* y, T* out, int64_t len, Acc<T> s) {
  using acc_t = Acc<T>;
  using Vec = AccVec<T>;
  const int64_t vec_end = len - len % kStep<T>;
  Vec dot0(acc_t(0)), dot1(acc_t(0));
  for (int64_t j = 0; j < vec_end; j += kStep<T>) {
    const auto [g0, g1] = load_acc_pair(g + j);
    const auto [y0, y1] = load_acc_pair(y + j);
    dot0 = at::vec::fmadd(g0, y0, dot0);
    dot1 = at::vec::fmadd(g1, y1, dot1);
  }
  acc_t dot = reduce_lanes<acc_t>(dot0 + dot1, acc_t(0), [](acc_t a, acc_t b) { return a + b; });
  for (int64_t j = vec_end; j < len; ++j) dot += static_cast<acc_t>(g[j]) * static_cast<acc_t>(y[j]);

  const Vec vdot(dot), vs(s);
  for (int64_t j = 0; j < vec_end; j += kStep<T>) {
    const auto [g0, g1] = load_acc_pair(g + j);
    const auto [y0, y1] = load_acc_pair(y + j);
    store_acc_pair(out + j, vs * y0 * (g0 - vdot), vs * y1 * (g1 - vdot));
  }
  for (int64_t j = vec_end; j < len; ++j) {
    out[j] = static_cast<T>(s * static_cast<acc_t>(y[j]) * (static_cast<acc_t>(g[j]) - dot));
  }
}

}  // namespace

void softmax_forward_rows(const SoftmaxProblem& p, double scale, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "stable_softmax_cpu", [&] {
    using acc_t = Acc<scalar_t>;
    const scalar_t* xs = p.x.const_data_ptr<scalar_t>();
    scalar_t* ys = out.data_ptr<scalar_t>();
    if (p.mask_kind == MaskKind::AdditiveLikeX) {
      forward_rows<scalar_t, scalar_t>(p, static_cast<acc_t>(scale), xs, ys);
    } else {
      forward_rows<scalar_t, acc_t>(p, static_cast<acc_t>(scale), xs, ys);
    }
  });
}

void softmax_backward_rows(const SoftmaxProblem& p, const at::Tensor& y_last, double scale, at::Tensor& grad_x) {
  const int64_t len = p.len;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "stable_softmax_backward_cpu", [&] {
    const scalar_t* gs = p.x.const_data_ptr<scalar_t>();
    const scalar_t* ys = y_last.const_data_ptr<scalar_t>();
    scalar_t* out = grad_x.data_ptr<scalar_t>();
    const auto s = static_cast<Acc<scalar_t>>(scale);
    at::parallel_for(0, p.rows, grain_rows(len), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) backward_row(gs + r * len, ys + r * len, out + r * len, len, s);
    });
  });
}

}  // namespace nanops::cpu::NANOPS_CPU_VARIANT
