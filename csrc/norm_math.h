// Overflow-free p-norm arithmetic shared by the CPU and CUDA grad-norm kernels.
//
// A norm is carried as a NormPartial: norm^p = scale^p * rel. Chunks whose largest magnitude
// keeps |x|^p comfortably inside float64 add |x|^p directly (scale = 1); others (float64
// grads near 1e200, large p) divide by their own max first (scale = amax). Partials of
// chunks, devices or ranks combine by rescaling to the largest scale, so no intermediate ever
// overflows or underflows to zero while the norm itself is representable.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace nanops {

#ifndef __CUDA_ARCH__
// Device code has the C names; host code gets them from <cmath>'s std overloads.
using std::isfinite;
using std::isinf;
#endif

enum class NormKind : int { Zero, One, Two, Inf, General };

constexpr int kSummaryFields = 5;  // scale, rel, amax, has_nan, has_inf

struct NormPartial {
  double scale;
  double rel;
  double amax;     // largest finite magnitude
  double has_nan;  // 0 or 1
  double has_inf;  // 0 or 1
};

NANOPS_HOST_DEVICE inline NormKind norm_kind(double p) {
  if (p == 0.0) return NormKind::Zero;
  if (p == 1.0) return NormKind::One;
  if (p == 2.0) return NormKind::Two;
  if (isinf(p)) return NormKind::Inf;
  return NormKind::General;
}

// |v|^p for v >= 0.
NANOPS_HOST_DEVICE inline double pow_p(double v, NormKind kind, double p) {
  switch (kind) {
    case NormKind::One: return v;
    case NormKind::Two: return v * v;
    default: return pow(v, p);
  }
}

// Whether a direct sum of |x|^p over one chunk, all |x| <= amax, is exact enough and finite:
// amax^p stays within [2^-600, 2^600] times chunk sizes far below 2^400.
NANOPS_HOST_DEVICE inline bool direct_sum_ok(double amax, double p) {
  return p <= 6.0 && amax >= 0x1p-100 && amax <= 0x1p100;
}

// Folds `b` into `a` (both with rel already relative to their own scale).
NANOPS_HOST_DEVICE inline double rescaled(double rel, double scale, double to_scale, NormKind kind, double p) {
  if (rel == 0.0 || to_scale == 0.0) return 0.0;
  return rel * pow_p(scale / to_scale, kind, p);
}

// The norm a summary stands for.
NANOPS_HOST_DEVICE inline double norm_from_summary(const NormPartial& s, NormKind kind, double p) {
  if (s.has_nan != 0.0) return NAN;
  switch (kind) {
    case NormKind::Zero: return s.rel;  // a count, finite even with Inf present (as torch)
    case NormKind::Inf: return s.has_inf != 0.0 ? INFINITY : s.amax;
    default:
      if (s.has_inf != 0.0) return INFINITY;
      if (s.rel == 0.0) return 0.0;
      if (kind == NormKind::One) return s.scale * s.rel;
      if (kind == NormKind::Two) return s.scale * sqrt(s.rel);
      return s.scale * pow(s.rel, 1.0 / p);
  }
}

// The multiplier the grads get: 1 where they must stay untouched (non-finite grads), else
// inv_scale * min(1, max_norm / (norm + 1e-6)) with the norm of the unscaled grads, as in
// torch.nn.utils.clip_grad_norm_.
NANOPS_HOST_DEVICE inline double clip_coef(double norm, bool nonfinite, double max_norm, double inv_scale) {
  if (nonfinite) return 1.0;
  const double coef = max_norm / (norm + 1e-6);
  return inv_scale * (coef < 1.0 ? coef : 1.0);
}

// Combines n partials stored as rows of kSummaryFields doubles (chunks, devices or ranks).
// Serial: used on the CPU, and on the GPU only for the few rows of per-device/per-rank summaries.
NANOPS_HOST_DEVICE inline NormPartial combine_partials(const double* rows, int64_t n, NormKind kind, double p) {
  NormPartial out{0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) {
    const double* r = rows + i * kSummaryFields;
    if (r[1] > 0.0 && r[0] > out.scale) out.scale = r[0];
    out.amax = r[2] > out.amax ? r[2] : out.amax;
    out.has_nan = r[3] != 0.0 ? 1.0 : out.has_nan;
    out.has_inf = r[4] != 0.0 ? 1.0 : out.has_inf;
  }
  for (int64_t i = 0; i < n; ++i) {
    const double* r = rows + i * kSummaryFields;
    out.rel += (kind == NormKind::Zero) ? r[1] : rescaled(r[1], r[0], out.scale, kind, p);
  }
  if (kind == NormKind::Zero || kind == NormKind::Inf) out.scale = 1.0;
  return out;
}

// The norm as its dtype holds it: beyond that dtype's largest value (a float32 norm of 1e38-sized
// grads) it is inf, and so non-finite below, instead of a conversion error or a silent clip.
NANOPS_HOST_DEVICE inline double norm_in_dtype(double norm, double dtype_max) {
  return norm > dtype_max ? INFINITY : norm;
}

// Whether the grads must be left as they are: they hold NaN/Inf, or their norm overflows.
NANOPS_HOST_DEVICE inline bool summary_nonfinite(const NormPartial& s, double norm) {
  return s.has_nan != 0.0 || s.has_inf != 0.0 || !isfinite(norm);
}

}  // namespace nanops
