// CPU kernel of nanops::nonfinite_counts: per-tensor NaN / +Inf / -Inf counts.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "cpu/multi_tensor.h"
#include "tensor_list.h"

namespace nanops {
namespace {

// x - x is 0 for every finite x and NaN for NaN and +-Inf; NaN survives the running sums, so
// a clean run costs one vector subtract-add per element and a single compare at the end.
// Four independent accumulators keep the adds from serialising on their latency.
template <typename T>
bool run_is_finite(const T* p, int64_t n) {
  using acc_t = at::opmath_type<T>;
  using AccVec = at::vec::Vectorized<acc_t>;
  constexpr int kAcc = 4;
  AccVec acc[kAcc] = {AccVec(acc_t(0)), AccVec(acc_t(0)), AccVec(acc_t(0)), AccVec(acc_t(0))};
  int64_t i = 0;
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; i + kAcc * Vec::size() <= n; i += kAcc * Vec::size()) {
      for (int a = 0; a < kAcc; ++a) {
        auto [lo, hi] = at::vec::convert_to_float<T>(Vec::loadu(p + i + a * Vec::size()));
        acc[a] = acc[a] + (lo - lo) + (hi - hi);
      }
    }
  } else {
    for (; i + kAcc * AccVec::size() <= n; i += kAcc * AccVec::size()) {
      for (int a = 0; a < kAcc; ++a) {
        const AccVec v = AccVec::loadu(p + i + a * AccVec::size());
        acc[a] = acc[a] + (v - v);
      }
    }
  }
  std::array<acc_t, AccVec::size()> lanes;
  ((acc[0] + acc[1]) + (acc[2] + acc[3])).store(lanes.data());
  acc_t total = 0;
  for (const acc_t lane : lanes) total += lane;
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(p[i]);
    total += v - v;
  }
  return total == acc_t(0);
}

template <typename T>
std::array<int64_t, 3> count_run(const T* p, int64_t n) {
  std::array<int64_t, 3> counts{0, 0, 0};
  if (run_is_finite(p, n)) {
    return counts;
  }
  using acc_t = at::opmath_type<T>;
  constexpr acc_t inf = std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(p[i]);
    counts[0] += std::isnan(v);
    counts[1] += v == inf;
    counts[2] += v == -inf;
  }
  return counts;
}

at::Tensor nonfinite_counts_cpu(at::TensorList tensors) {
  check_tensor_list(tensors, "nonfinite_counts", IntegerTensors::CountAsFinite);
  at::Tensor out = at::zeros({static_cast<int64_t>(tensors.size()), 3}, at::TensorOptions().dtype(at::kLong));
  std::vector<at::Tensor> copies;
  const std::vector<FlatView> views = flat_views(tensors, copies);
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(views);
  std::vector<std::array<int64_t, 3>> chunk_counts(chunks.size());
  cpu::parallel_for_chunks(chunks, [&](int64_t c) {
    const cpu::Chunk& chunk = chunks[c];
    const FlatView& view = views[chunk.view];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view.dtype, "nonfinite_counts_cpu", [&] {
      chunk_counts[c] = count_run(static_cast<const scalar_t*>(view.data) + chunk.begin, chunk.end - chunk.begin);
    });
  });
  int64_t* out_data = out.data_ptr<int64_t>();
  for (size_t c = 0; c < chunks.size(); ++c) {
    const int64_t row = views[chunks[c].view].index;
    for (int k = 0; k < 3; ++k) out_data[row * 3 + k] += chunk_counts[c][k];
  }
  return out;
}

// Whether every floating tensor of the list is free of NaN/Inf, chunks checked in parallel.
bool list_is_finite(at::TensorList tensors, const char* op) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": empty tensor list");
  check_tensor_list(tensors, op, IntegerTensors::CountAsFinite);
  std::vector<at::Tensor> copies;
  const std::vector<FlatView> views = flat_views(tensors, copies);
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(views);
  std::vector<char> chunk_finite(chunks.size(), 1);
  cpu::parallel_for_chunks(chunks, [&](int64_t c) {
    const cpu::Chunk& chunk = chunks[c];
    const FlatView& view = views[chunk.view];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view.dtype, "all_finite_cpu", [&] {
      chunk_finite[c] = run_is_finite(static_cast<const scalar_t*>(view.data) + chunk.begin, chunk.end - chunk.begin);
    });
  });
  return std::all_of(chunk_finite.begin(), chunk_finite.end(), [](char f) { return f != 0; });
}

at::Tensor all_finite_cpu(at::TensorList tensors) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kBool));
  *out.data_ptr<bool>() = list_is_finite(tensors, "all_finite");
  return out;
}

at::Tensor nonfinite_flag_cpu(at::TensorList tensors) {
  at::Tensor out = at::empty({1}, at::TensorOptions().dtype(at::kFloat));
  *out.data_ptr<float>() = list_is_finite(tensors, "nonfinite_flag") ? 0.0f : 1.0f;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CPU, m) {
  m.impl("nonfinite_counts", &nonfinite_counts_cpu);
  m.impl("all_finite", &all_finite_cpu);
  m.impl("nonfinite_flag", &nonfinite_flag_cpu);
}

}  // namespace nanops
