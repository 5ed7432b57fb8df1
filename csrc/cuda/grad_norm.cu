// CUDA kernels of the grad-norm ops. No host synchronisation anywhere: inv_scale, found_inf,
// the norm and the clip coefficient live on the device from start to end, so a whole clip
// step can be captured in a CUDA graph. Host side: grad_norm_host.cpp.
//
//   grad_norm_summary:        multi-tensor partials (one row per chunk) -> one-block combine
//   clip_coef_from_summaries: one thread folds the few per-device/per-rank rows into norm + coef
//   scale_tensors_:           multi-tensor in-place multiply, a no-op when coef == 1
#include "cuda/block_reduce.cuh"
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "norm_math.h"

namespace nanops::cuda {
namespace {

constexpr int kCombineThreads = 512;

// A ScalarArg read inside a kernel.
struct DeviceScalar {
  const void* data;  // nullptr: the value is 1
  bool is_double;

  explicit DeviceScalar(ScalarArg arg) : data(arg.data), is_double(arg.is_double) {}

  __device__ __forceinline__ double get() const {
    if (data == nullptr) return 1.0;
    return is_double ? *static_cast<const double*>(data) : static_cast<double>(*static_cast<const float*>(data));
  }
};

struct NormPartialOp {
  NormKind kind;
  double p;
  DeviceScalar inv_scale;
  double* partials;  // (num_chunks, kSummaryFields)

  template <typename T>
  __device__ void operator()(T* data, int64_t n, int64_t /*tensor_index*/, int64_t chunk_id) const {
    __shared__ double scratch[kWarpSize];
    const double s = inv_scale.get();
    // Fast pass: direct float64 sum of |x s|^p, max, and a NaN-poisoned sentinel for non-finite values.
    double acc = 0.0, amax = 0.0, bad = 0.0;
    for_each_element(data, n, [&](T x) {
      const double v = fabs(static_cast<double>(x) * s);
      bad += v - v;
      amax = v > amax ? v : amax;
      if (kind == NormKind::Zero) {
        acc += v != 0.0;
      } else if (kind != NormKind::Inf) {
        acc += pow_p(v, kind, p);
      }
    });
    const bool nonfinite = __syncthreads_or(bad != 0.0 || isnan(bad));
    amax = block_reduce(amax, MaxOp{}, 0.0, scratch);
    const bool summed = kind == NormKind::One || kind == NormKind::Two || kind == NormKind::General;
    NormPartial out{1.0, 0.0, amax, 0.0, 0.0};
    if (!nonfinite && !(summed && amax > 0.0 && !direct_sum_ok(amax, p))) {
      out.rel = block_reduce(acc, SumOp{}, 0.0, scratch);
      if (summed && out.rel == 0.0) out.scale = 0.0;
    } else {
      // Exact path (rare): flags, max over finite values, then the sum relative to that max.
      int nan = 0, inf = 0;
      double finite_max = 0.0, count = 0.0;
      for_each_element(data, n, [&](T x) {
        const double v = fabs(static_cast<double>(x) * s);
        nan |= isnan(v);
        inf |= isinf(v);
        if (isfinite(v)) finite_max = v > finite_max ? v : finite_max;
        count += v != 0.0;
      });
      out.has_nan = __syncthreads_or(nan) ? 1.0 : 0.0;
      out.has_inf = __syncthreads_or(inf) ? 1.0 : 0.0;
      out.amax = block_reduce(finite_max, MaxOp{}, 0.0, scratch);
      if (kind == NormKind::Zero) {
        out.rel = block_reduce(count, SumOp{}, 0.0, scratch);
      } else if (summed) {
        out.scale = out.amax;
        double rel = 0.0;
        if (out.amax > 0.0) {
          for_each_element(data, n, [&](T x) {
            const double v = fabs(static_cast<double>(x) * s);
            if (isfinite(v)) rel += pow_p(v / out.amax, kind, p);
          });
        }
        out.rel = block_reduce(rel, SumOp{}, 0.0, scratch);
      }
    }
    if (threadIdx.x == 0) {
      double* row = partials + chunk_id * kSummaryFields;
      row[0] = out.scale;
      row[1] = out.rel;
      row[2] = out.amax;
      row[3] = out.has_nan;
      row[4] = out.has_inf;
    }
  }
};

// One block folds all chunk partials into the (kSummaryFields,) summary.
__global__ void __launch_bounds__(kCombineThreads)
    combine_partials_kernel(const double* __restrict__ rows, int64_t n, NormKind kind, double p, double* out) {
  __shared__ double scratch[kWarpSize];
  double scale = 0.0, amax = 0.0;
  int nan = 0, inf = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double* r = rows + i * kSummaryFields;
    if (r[1] > 0.0 && r[0] > scale) scale = r[0];
    amax = r[2] > amax ? r[2] : amax;
    nan |= r[3] != 0.0;
    inf |= r[4] != 0.0;
  }
  scale = block_reduce(scale, MaxOp{}, 0.0, scratch);
  amax = block_reduce(amax, MaxOp{}, 0.0, scratch);
  const bool any_nan = __syncthreads_or(nan);
  const bool any_inf = __syncthreads_or(inf);
  double rel = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double* r = rows + i * kSummaryFields;
    rel += kind == NormKind::Zero ? r[1] : rescaled(r[1], r[0], scale, kind, p);
  }
  rel = block_reduce(rel, SumOp{}, 0.0, scratch);
  if (threadIdx.x == 0) {
    out[0] = (kind == NormKind::Zero || kind == NormKind::Inf) ? 1.0 : scale;
    out[1] = rel;
    out[2] = amax;
    out[3] = any_nan ? 1.0 : 0.0;
    out[4] = any_inf ? 1.0 : 0.0;
  }
}

template <typename norm_t>
__global__ void clip_coef_kernel(const double* __restrict__ rows, int64_t n, NormKind kind, double p,
                                 double max_norm, DeviceScalar inv_scale, float* found_inf_f, double* found_inf_d,
                                 double norm_max, norm_t* total_norm, double* coef) {
  const NormPartial total = combine_partials(rows, n, kind, p);
  const double norm = norm_in_dtype(norm_from_summary(total, kind, p), norm_max);
  const bool nonfinite = summary_nonfinite(total, norm);
  if (nonfinite && found_inf_f != nullptr) *found_inf_f = 1.0f;
  if (nonfinite && found_inf_d != nullptr) *found_inf_d = 1.0;
  *total_norm = static_cast<norm_t>(norm);
  *coef = clip_coef(norm, nonfinite, max_norm, inv_scale.get());
}

struct ScaleOp {
  const double* coef;

  template <typename T>
  __device__ void operator()(T* data, int64_t n, int64_t /*tensor_index*/, int64_t /*chunk_id*/) const {
    using acc_t = typename AccType<T>::type;
    const double c = *coef;
    if (c == 1.0) return;  // nothing to clip or unscale: no write traffic at all
    const acc_t factor = static_cast<acc_t>(c);
    transform_elements(data, n, [&](T x) { return static_cast<T>(static_cast<acc_t>(x) * factor); });
  }
};

}  // namespace

cudaError_t launch_grad_norm_summary(const std::vector<DeviceView>& views, NormKind kind, double p,
                                     ScalarArg inv_scale, double* partials, double* summary, cudaStream_t stream) {
  if (const cudaError_t err = multi_tensor_apply(views, stream, NormPartialOp{kind, p, DeviceScalar(inv_scale), partials});
      err != cudaSuccess) {
    return err;
  }
  combine_partials_kernel<<<1, kCombineThreads, 0, stream>>>(partials, total_chunks(views), kind, p, summary);
  return cudaGetLastError();
}

cudaError_t launch_clip_coef(const double* rows, int64_t n, NormKind kind, double p, double max_norm,
                             ScalarArg inv_scale, float* found_inf_f, double* found_inf_d, ElemType norm_type,
                             double norm_max, void* total_norm, double* coef, cudaStream_t stream) {
  const DeviceScalar s(inv_scale);
  switch (norm_type) {
    case ElemType::Float:
      clip_coef_kernel<<<1, 1, 0, stream>>>(rows, n, kind, p, max_norm, s, found_inf_f, found_inf_d, norm_max,
                                            static_cast<float*>(total_norm), coef);
      break;
    case ElemType::Double:
      clip_coef_kernel<<<1, 1, 0, stream>>>(rows, n, kind, p, max_norm, s, found_inf_f, found_inf_d, norm_max,
                                            static_cast<double*>(total_norm), coef);
      break;
    case ElemType::Half:
      clip_coef_kernel<<<1, 1, 0, stream>>>(rows, n, kind, p, max_norm, s, found_inf_f, found_inf_d, norm_max,
                                            static_cast<c10::Half*>(total_norm), coef);
      break;
    case ElemType::BFloat16:
      clip_coef_kernel<<<1, 1, 0, stream>>>(rows, n, kind, p, max_norm, s, found_inf_f, found_inf_d, norm_max,
                                            static_cast<c10::BFloat16*>(total_norm), coef);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_scale_tensors(const std::vector<DeviceView>& views, const double* coef, cudaStream_t stream) {
  return multi_tensor_apply(views, stream, ScaleOp{coef});
}

}  // namespace nanops::cuda
