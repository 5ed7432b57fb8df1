// CUDA kernels of the grad-norm ops. No host synchronisation anywhere: inv_scale, found_inf,
// the norm and the clip coefficient live on the device from start to end, so a whole clip
// step can be captured in a CUDA graph.
//
//   grad_norm_summary:        multi-tensor partials (one row per chunk) -> one-block combine
//   clip_coef_from_summaries: one thread folds the few per-device/per-rank rows into norm + coef
//   scale_tensors_:           multi-tensor in-place multiply, a no-op when coef == 1
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "cuda/block_reduce.cuh"
#include "cuda/multi_tensor_apply.cuh"
#include "norm_math.h"
#include "tensor_list.h"

namespace nanops {
namespace {

constexpr int kCombineThreads = 512;

// A one-element float32 or float64 device tensor read inside a kernel.
struct DeviceScalar {
  const void* data;  // nullptr: the value is 1
  bool is_double;

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
    __shared__ double scratch[cuda::kWarpSize];
    const double s = inv_scale.get();
    // Fast pass: direct float64 sum of |x s|^p, max, and a NaN-poisoned sentinel for non-finite values.
    double acc = 0.0, amax = 0.0, bad = 0.0;
    cuda::for_each_element(data, n, [&](T x) {
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
    amax = cuda::block_reduce(amax, cuda::MaxOp{}, 0.0, scratch);
    const bool summed = kind == NormKind::One || kind == NormKind::Two || kind == NormKind::General;
    NormPartial out{1.0, 0.0, amax, 0.0, 0.0};
    if (!nonfinite && !(summed && amax > 0.0 && !direct_sum_ok(amax, p))) {
      out.rel = cuda::block_reduce(acc, cuda::SumOp{}, 0.0, scratch);
      if (summed && out.rel == 0.0) out.scale = 0.0;
    } else {
      // Exact path (rare): flags, max over finite values, then the sum relative to that max.
      int nan = 0, inf = 0;
      double finite_max = 0.0, count = 0.0;
      cuda::for_each_element(data, n, [&](T x) {
        const double v = fabs(static_cast<double>(x) * s);
        nan |= isnan(v);
        inf |= isinf(v);
        if (isfinite(v)) finite_max = v > finite_max ? v : finite_max;
        count += v != 0.0;
      });
      out.has_nan = __syncthreads_or(nan) ? 1.0 : 0.0;
      out.has_inf = __syncthreads_or(inf) ? 1.0 : 0.0;
      out.amax = cuda::block_reduce(finite_max, cuda::MaxOp{}, 0.0, scratch);
      if (kind == NormKind::Zero) {
        out.rel = cuda::block_reduce(count, cuda::SumOp{}, 0.0, scratch);
      } else if (summed) {
        out.scale = out.amax;
        double rel = 0.0;
        if (out.amax > 0.0) {
          cuda::for_each_element(data, n, [&](T x) {
            const double v = fabs(static_cast<double>(x) * s);
            if (isfinite(v)) rel += pow_p(v / out.amax, kind, p);
          });
        }
        out.rel = cuda::block_reduce(rel, cuda::SumOp{}, 0.0, scratch);
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
  __shared__ double scratch[cuda::kWarpSize];
  double scale = 0.0, amax = 0.0;
  int nan = 0, inf = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double* r = rows + i * kSummaryFields;
    if (r[1] > 0.0 && r[0] > scale) scale = r[0];
    amax = r[2] > amax ? r[2] : amax;
    nan |= r[3] != 0.0;
    inf |= r[4] != 0.0;
  }
  scale = cuda::block_reduce(scale, cuda::MaxOp{}, 0.0, scratch);
  amax = cuda::block_reduce(amax, cuda::MaxOp{}, 0.0, scratch);
  const bool any_nan = __syncthreads_or(nan);
  const bool any_inf = __syncthreads_or(inf);
  double rel = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double* r = rows + i * kSummaryFields;
    rel += kind == NormKind::Zero ? r[1] : rescaled(r[1], r[0], scale, kind, p);
  }
  rel = cuda::block_reduce(rel, cuda::SumOp{}, 0.0, scratch);
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
    using acc_t = typename cuda::AccType<T>::type;
    const double c = *coef;
    if (c == 1.0) return;  // nothing to clip or unscale: no write traffic at all
    const acc_t factor = static_cast<acc_t>(c);
    cuda::transform_elements(data, n, [&](T x) { return static_cast<T>(static_cast<acc_t>(x) * factor); });
  }
};

DeviceScalar device_scalar(const std::optional<at::Tensor>& t, const char* op, const char* name,
                           const c10::Device& device) {
  check_scalar_tensor(t, op, name, device);
  if (!t.has_value()) return DeviceScalar{nullptr, false};
  return DeviceScalar{t->const_data_ptr(), t->scalar_type() == at::kDouble};
}

at::Tensor grad_norm_summary_cuda(at::TensorList tensors, double norm_type, const std::optional<at::Tensor>& inv_scale) {
  TORCH_CHECK(!tensors.empty(), "grad_norm_summary: empty tensor list");
  TORCH_CHECK(norm_type >= 0.0, "grad_norm_summary: norm_type must be >= 0 or inf, got ", norm_type);
  check_tensor_list(tensors, "grad_norm_summary", IntegerTensors::Reject);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const DeviceScalar s = device_scalar(inv_scale, "grad_norm_summary", "inv_scale", tensors[0].device());
  const NormKind kind = norm_kind(norm_type);
  std::vector<at::Tensor> copies;
  const std::vector<FlatView> views = flat_views(tensors, copies);
  const auto options = tensors[0].options().dtype(at::kDouble);
  const int64_t num_partials = cuda::total_chunks(views);
  at::Tensor partials = at::empty({std::max<int64_t>(num_partials, 1), kSummaryFields}, options);
  at::Tensor summary = at::empty({kSummaryFields}, options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::multi_tensor_apply(views, stream, NormPartialOp{kind, norm_type, s, partials.data_ptr<double>()});
  combine_partials_kernel<<<1, kCombineThreads, 0, stream>>>(partials.const_data_ptr<double>(), num_partials, kind,
                                                              norm_type, summary.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return summary;
}

std::tuple<at::Tensor, at::Tensor> clip_coef_from_summaries_cuda(
    const at::Tensor& summaries, double norm_type, double max_norm, const std::optional<at::Tensor>& inv_scale,
    const std::optional<at::Tensor>& found_inf, c10::ScalarType norm_dtype) {
  check_norm_summaries(summaries, kSummaryFields);
  const c10::cuda::CUDAGuard guard(summaries.device());
  const DeviceScalar s = device_scalar(inv_scale, "clip_coef_from_summaries", "inv_scale", summaries.device());
  device_scalar(found_inf, "clip_coef_from_summaries", "found_inf", summaries.device());
  float* found_f = nullptr;
  double* found_d = nullptr;
  if (found_inf.has_value()) {
    if (found_inf->scalar_type() == at::kDouble) {
      found_d = found_inf->data_ptr<double>();
    } else {
      found_f = found_inf->data_ptr<float>();
    }
  }
  const at::Tensor rows = summaries.contiguous();
  at::Tensor total_norm = at::empty({}, summaries.options().dtype(norm_dtype));
  at::Tensor coef = at::empty({}, summaries.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, norm_dtype, "clip_coef_from_summaries_cuda", [&] {
    clip_coef_kernel<scalar_t><<<1, 1, 0, stream>>>(rows.const_data_ptr<double>(), rows.size(0), norm_kind(norm_type),
                                                    norm_type, max_norm, s, found_f, found_d,
                                                    static_cast<double>(std::numeric_limits<scalar_t>::max()),
                                                    total_norm.data_ptr<scalar_t>(), coef.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {total_norm, coef};
}

void scale_tensors_cuda(at::TensorList tensors, const at::Tensor& coef) {
  if (tensors.empty()) return;
  check_tensor_list(tensors, "scale_tensors_", IntegerTensors::Reject);
  check_scale_coef(coef, tensors[0].device());
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  std::vector<at::Tensor> unused;
  std::vector<int64_t> non_dense;
  const std::vector<FlatView> views = flat_views(tensors, unused, &non_dense);
  for (const int64_t i : non_dense) tensors[i].mul_(coef);
  cuda::multi_tensor_apply(views, c10::cuda::getCurrentCUDAStream(), ScaleOp{coef.const_data_ptr<double>()});
}

}  // namespace

TORCH_LIBRARY_IMPL(nanops, CUDA, m) {
  m.impl("grad_norm_summary", &grad_norm_summary_cuda);
  m.impl("clip_coef_from_summaries", &clip_coef_from_summaries_cuda);
  m.impl("scale_tensors_", &scale_tensors_cuda);
}

}  // namespace nanops
