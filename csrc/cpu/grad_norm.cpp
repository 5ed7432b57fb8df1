// CPU kernels of the grad-norm ops: grad_norm_summary, clip_coef_from_summaries, scale_tensors_.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/multi_tensor.h"
#include "norm_math.h"
#include "tensor_list.h"

namespace nanops {
namespace {

constexpr int kLanes = 8;  // independent accumulators: lets the compiler vectorise without reassociation

// One read of a chunk summing |x * s|^p directly in float64. Returns false when the chunk needs
// the exact path: it holds NaN/Inf, or its magnitudes are too large or small for a direct sum.
template <typename T, NormKind kKind>
bool fast_partial(const T* x, int64_t n, double p, double s, NormPartial& out) {
  double acc[kLanes] = {}, amax[kLanes] = {}, bad[kLanes] = {};
  auto visit = [&](int lane, T value) {
    const double v = std::fabs(static_cast<double>(value) * s);
    bad[lane] += v - v;  // NaN once any v is NaN or Inf
    amax[lane] = v > amax[lane] ? v : amax[lane];
    if constexpr (kKind == NormKind::Zero) {
      acc[lane] += v != 0.0;
    } else if constexpr (kKind != NormKind::Inf) {
      acc[lane] += pow_p(v, kKind, p);
    }
  };
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) visit(lane, x[i + lane]);
  }
  for (; i < n; ++i) visit(0, x[i]);
  double sum = 0.0, max = 0.0, nonfinite = 0.0;
  for (int lane = 0; lane < kLanes; ++lane) {
    sum += acc[lane];
    max = std::max(max, amax[lane]);
    nonfinite += bad[lane];
  }
  if (nonfinite != 0.0 || std::isnan(nonfinite)) return false;
  const bool needs_scaling = kKind == NormKind::One || kKind == NormKind::Two || kKind == NormKind::General;
  if (needs_scaling && max > 0.0 && !direct_sum_ok(max, p)) return false;
  out = NormPartial{sum > 0.0 ? 1.0 : 0.0, sum, max, 0.0, 0.0};
  if (kKind == NormKind::Zero || kKind == NormKind::Inf) out.scale = 1.0;
  return true;
}

// Branchy but exact: finite values only, flags for the rest, sum relative to the chunk's max.
template <typename T>
NormPartial exact_partial(const T* x, int64_t n, NormKind kind, double p, double s) {
  NormPartial out{1.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) {
    const double v = std::fabs(static_cast<double>(x[i]) * s);
    if (std::isnan(v)) {
      out.has_nan = 1.0;
    } else if (std::isinf(v)) {
      out.has_inf = 1.0;
    } else {
      out.amax = std::max(out.amax, v);
    }
    if (kind == NormKind::Zero) out.rel += v != 0.0;
  }
  if (kind == NormKind::Zero || kind == NormKind::Inf) return out;
  out.scale = out.amax;
  if (out.amax == 0.0) return out;
  for (int64_t i = 0; i < n; ++i) {
    const double v = std::fabs(static_cast<double>(x[i]) * s);
    if (std::isfinite(v)) out.rel += pow_p(v / out.amax, kind, p);
  }
  return out;
}

template <typename T>
NormPartial chunk_partial(const T* x, int64_t n, NormKind kind, double p, double s) {
  NormPartial out{};
  bool done = false;
  switch (kind) {
    case NormKind::Zero: done = fast_partial<T, NormKind::Zero>(x, n, p, s, out); break;
    case NormKind::One: done = fast_partial<T, NormKind::One>(x, n, p, s, out); break;
    case NormKind::Two: done = fast_partial<T, NormKind::Two>(x, n, p, s, out); break;
    case NormKind::Inf: done = fast_partial<T, NormKind::Inf>(x, n, p, s, out); break;
    case NormKind::General: done = fast_partial<T, NormKind::General>(x, n, p, s, out); break;
  }
  return done ? out : exact_partial(x, n, kind, p, s);
}

at::Tensor grad_norm_summary_cpu(at::TensorList tensors, double norm_type, const std::optional<at::Tensor>& inv_scale) {
  TORCH_CHECK(!tensors.empty(), "grad_norm_summary: empty tensor list");
  TORCH_CHECK(norm_type >= 0.0, "grad_norm_summary: norm_type must be >= 0 or inf, got ", norm_type);
  check_tensor_list(tensors, "grad_norm_summary", IntegerTensors::Reject);
  check_scalar_tensor(inv_scale, "grad_norm_summary", "inv_scale", tensors[0].device());
  const double s = inv_scale.has_value() ? inv_scale->item<double>() : 1.0;
  const NormKind kind = norm_kind(norm_type);
  std::vector<at::Tensor> copies;
  const std::vector<FlatView> views = flat_views(tensors, copies);
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(views);
  std::vector<double> partials(chunks.size() * kSummaryFields);
  cpu::parallel_for_chunks(chunks, [&](int64_t c) {
    const cpu::Chunk& chunk = chunks[c];
    const FlatView& view = views[chunk.view];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view.dtype, "grad_norm_summary_cpu", [&] {
      const NormPartial part = chunk_partial(static_cast<const scalar_t*>(view.data) + chunk.begin,
                                             chunk.end - chunk.begin, kind, norm_type, s);
      std::copy_n(&part.scale, kSummaryFields, &partials[c * kSummaryFields]);
    });
  });
  const NormPartial summary = combine_partials(partials.data(), static_cast<int64_t>(chunks.size()), kind, norm_type);
  at::Tensor out = at::empty({kSummaryFields}, at::TensorOptions().dtype(at::kDouble));
  std::copy_n(&summary.scale, kSummaryFields, out.data_ptr<double>());
  return out;
}

std::tuple<at::Tensor, at::Tensor> clip_coef_from_summaries_cpu(
    const at::Tensor& summaries, double norm_type, double max_norm, const std::optional<at::Tensor>& inv_scale,
    const std::optional<at::Tensor>& found_inf, c10::ScalarType norm_dtype) {
  check_norm_summaries(summaries, kSummaryFields);
  check_scalar_tensor(inv_scale, "clip_coef_from_summaries", "inv_scale", summaries.device());
  check_scalar_tensor(found_inf, "clip_coef_from_summaries", "found_inf", summaries.device());
  const NormKind kind = norm_kind(norm_type);
  const at::Tensor rows = summaries.contiguous();
  const NormPartial total = combine_partials(rows.const_data_ptr<double>(), rows.size(0), kind, norm_type);
  const double norm = norm_from_summary(total, kind, norm_type);
  const bool nonfinite = summary_nonfinite(total, norm);
  const double s = inv_scale.has_value() ? inv_scale->item<double>() : 1.0;
  if (nonfinite && found_inf.has_value()) found_inf->fill_(1.0);
  at::Tensor total_norm = at::empty({}, at::TensorOptions().dtype(norm_dtype));
  total_norm.fill_(norm);
  at::Tensor coef = at::empty({}, at::TensorOptions().dtype(at::kDouble));
  coef.fill_(clip_coef(norm, nonfinite, max_norm, s));
  return {total_norm, coef};
}

void scale_tensors_cpu(at::TensorList tensors, const at::Tensor& coef) {
  if (tensors.empty()) return;
  check_tensor_list(tensors, "scale_tensors_", IntegerTensors::Reject);
  TORCH_CHECK(coef.numel() == 1 && coef.device() == tensors[0].device(),
              "scale_tensors_: coef must be a one-element tensor on ", tensors[0].device());
  const double c = coef.item<double>();
  if (c == 1.0) return;  // nothing to clip or unscale: leave the memory untouched
  std::vector<at::Tensor> unused;
  std::vector<int64_t> non_dense;
  const std::vector<FlatView> views = flat_views(tensors, unused, &non_dense);
  for (const int64_t i : non_dense) tensors[i].mul_(c);
  const std::vector<cpu::Chunk> chunks = cpu::make_chunks(views);
  cpu::parallel_for_chunks(chunks, [&](int64_t ci) {
    const cpu::Chunk& chunk = chunks[ci];
    const FlatView& view = views[chunk.view];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view.dtype, "scale_tensors_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t factor = static_cast<acc_t>(c);
      scalar_t* x = static_cast<scalar_t*>(view.data);
      for (int64_t i = chunk.begin; i < chunk.end; ++i) x[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * factor);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CPU, m) {
  m.impl("grad_norm_summary", &grad_norm_summary_cpu);
  m.impl("clip_coef_from_summaries", &clip_coef_from_summaries_cpu);
  m.impl("scale_tensors_", &scale_tensors_cpu);
}

}  // namespace nanops
