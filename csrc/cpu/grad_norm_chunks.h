// Per-chunk p-norm partials of the CPU grad-norm kernel, compiled once per instruction set:
// included by grad_norm_chunks_base.cpp and grad_norm_chunks_avx2.cpp after they pick the ISA,
// chosen at run time in grad_norm.cpp. NANOPS_CPU_VARIANT names the namespace of this copy.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>  // convert_to_float / convert_from_float for 16-bit types
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>

#include "cpu/grad_norm_variants.h"

namespace nanops::cpu::NANOPS_CPU_VARIANT {
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

// Fastest path, p in {1, 2} on float32/16-bit chunks whose magnitudes lie in [2^-50, 2^50] (so
// |x|^p cannot overflow or underflow float32): float32 vector arithmetic, flushed into float64
// every kFlushVectors vectors so the sum's rounding stays near float64's. Returns false (and the
// chunk takes the float64 path) for anything else: NaN/Inf, out-of-range magnitudes, float64 data.
constexpr int kFlushVectors = 16;

template <typename T, NormKind kKind>
bool float_partial(const T* x, int64_t n, double s_in, NormPartial& out) {
  if constexpr (std::is_same_v<T, double> || (kKind != NormKind::One && kKind != NormKind::Two)) {
    return false;
  } else {
    using Vec = at::vec::Vectorized<float>;
    if (!(s_in >= 0x1p-60 && s_in <= 0x1p60)) return false;
    const Vec s(static_cast<float>(s_in));
    Vec acc(0.0f), vmax(0.0f), bad(0.0f);
    double total = 0.0;
    int pending = 0;
    auto flush = [&] {
      std::array<float, Vec::size()> lanes;
      acc.store(lanes.data());
      for (const float lane : lanes) total += lane;
      acc = Vec(0.0f);
      pending = 0;
    };
    auto visit = [&](Vec v) {
      v = (v * s).abs();
      bad = bad + (v - v);  // NaN once any value is NaN or Inf
      vmax = at::vec::maximum(vmax, v);
      acc = kKind == NormKind::Two ? at::vec::fmadd(v, v, acc) : acc + v;
      if (++pending == kFlushVectors) flush();
    };
    int64_t i = 0;
    if constexpr (at::vec::is_reduced_floating_point_v<T>) {
      using HalfVec = at::vec::Vectorized<T>;
      for (; i + HalfVec::size() <= n; i += HalfVec::size()) {
        auto [lo, hi] = at::vec::convert_to_float<T>(HalfVec::loadu(x + i));
        visit(lo);
        visit(hi);
      }
    } else {
      for (; i + Vec::size() <= n; i += Vec::size()) visit(Vec::loadu(x + i));
    }
    flush();
    std::array<float, Vec::size()> lanes;
    bad.store(lanes.data());
    float nonfinite = 0.0f;
    for (const float lane : lanes) nonfinite += lane;
    vmax.store(lanes.data());
    double amax = 0.0;
    for (const float lane : lanes) amax = std::max(amax, static_cast<double>(lane));
    for (; i < n; ++i) {
      const double v = std::fabs(static_cast<double>(x[i]) * s_in);
      nonfinite += static_cast<float>(v - v);
      amax = std::max(amax, v);
      total += kKind == NormKind::Two ? v * v : v;
    }
    if (nonfinite != 0.0f || std::isnan(nonfinite)) return false;
    if (amax > 0.0 && !(amax >= 0x1p-50 && amax <= 0x1p50)) return false;
    out = NormPartial{total > 0.0 ? 1.0 : 0.0, total, amax, 0.0, 0.0};
    return true;
  }
}

template <typename T>
NormPartial chunk_partial(const T* x, int64_t n, NormKind kind, double p, double s) {
  NormPartial out{};
  bool done = false;
  switch (kind) {
    case NormKind::Zero: done = fast_partial<T, NormKind::Zero>(x, n, p, s, out); break;
    case NormKind::One:
      done = float_partial<T, NormKind::One>(x, n, s, out) || fast_partial<T, NormKind::One>(x, n, p, s, out);
      break;
    case NormKind::Two:
      done = float_partial<T, NormKind::Two>(x, n, s, out) || fast_partial<T, NormKind::Two>(x, n, p, s, out);
      break;
    case NormKind::Inf: done = fast_partial<T, NormKind::Inf>(x, n, p, s, out); break;
    case NormKind::General: done = fast_partial<T, NormKind::General>(x, n, p, s, out); break;
  }
  return done ? out : exact_partial(x, n, kind, p, s);
}

// x[0:n] *= factor in x's dtype, the product formed in the accumulation dtype (float32 for
// 16-bit x), vectorised.
template <typename T>
void scale_chunk(T* x, int64_t n, at::opmath_type<T> factor) {
  using Acc = at::opmath_type<T>;
  using AccVec = at::vec::Vectorized<Acc>;
  const AccVec f(factor);
  int64_t i = 0;
  if constexpr (at::vec::is_reduced_floating_point_v<T>) {
    using Vec = at::vec::Vectorized<T>;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(Vec::loadu(x + i));
      at::vec::convert_from_float<T>(lo * f, hi * f).store(x + i);
    }
  } else {
    for (; i + AccVec::size() <= n; i += AccVec::size()) (AccVec::loadu(x + i) * f).store(x + i);
  }
  for (; i < n; ++i) x[i] = static_cast<T>(static_cast<Acc>(x[i]) * factor);
}

}  // namespace

void scale_chunks(const std::vector<FlatView>& views, const std::vector<Chunk>& chunks, double coef) {
  // Reverse: the norm pass just read these chunks in forward order, so each thread starts on
  // the ones it read last, still in cache (the yolov5s grads, 29 MB, nearly fit a 32 MB L3).
  parallel_for_chunks(chunks, [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const FlatView& view = views[chunk.view];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view.dtype, "scale_tensors_cpu", [&] {
      scale_chunk(static_cast<scalar_t*>(view.data) + chunk.begin, chunk.end - chunk.begin,
                  static_cast<at::opmath_type<scalar_t>>(coef));
    });
  }, ChunkOrder::Reverse);
}

void norm_partials(const std::vector<FlatView>& views, const std::vector<Chunk>& chunks, NormKind kind,
                   double p, double s, double* partials) {
  parallel_for_chunks(chunks, [&](int64_t c) {
    const Chunk& chunk = chunks[c];
    const FlatView& view = views[chunk.view];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, view.dtype, "grad_norm_summary_cpu", [&] {
      const NormPartial part =
          chunk_partial(static_cast<const scalar_t*>(view.data) + chunk.begin, chunk.end - chunk.begin, kind, p, s);
      std::copy_n(&part.scale, kSummaryFields, partials + c * kSummaryFields);
    });
  });
}

}  // namespace nanops::cpu::NANOPS_CPU_VARIANT
