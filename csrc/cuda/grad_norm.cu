// CUDA kernels of the grad-norm ops. No host synchronisation anywhere: inv_scale, found_inf,
// the norm and the clip coefficient live on the device from start to end, so a whole clip
// step can be captured in a CUDA graph. Host side: grad_norm_host.cpp.
//
//   launch_grad_norm: one multi-tensor launch; each block writes its chunk's partial, and the
//                     last block to finish (a completion counter) folds them all and writes the
//                     summary or the clip results: no combine launch, no <<<1,1>>> launch
//   launch_clip_coef: the few per-device/per-rank summaries of a sharded norm -> norm + coef
//   launch_scale_tensors: multi-tensor in-place multiply, a no-op when coef == 1
//
// Partials of float32/float16/bfloat16 chunks are summed in float32 per thread (each thread
// sees at most 128 elements of a chunk) and in float64 across the block; a chunk whose largest
// magnitude lies outside [2^-50, 2^50] (where float32 squares could overflow or lose the
// small terms) is summed again relative to that magnitude in float64, so a finite norm is
// never reported inf. NaN/Inf are found on the exponent bits; p = 0, 1, 2 and inf need no pow.
#include <type_traits>

#include "cuda/block_reduce.cuh"
#include "cuda/elem.cuh"
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"
#include "norm_math.h"

namespace nanops::cuda {
namespace {

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

// Block-wide {sum, max} in one pass of barriers; every thread gets both.
struct SumMax {
  double sum;
  double max;
};

__device__ __forceinline__ SumMax block_sum_max(SumMax v, SumMax* scratch) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v.sum += __shfl_xor_sync(0xffffffffu, v.sum, offset);
    v.max = fmax(v.max, __shfl_xor_sync(0xffffffffu, v.max, offset));
  }
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int num_warps = blockDim.x / kWarpSize;
    v = lane < num_warps ? scratch[lane] : SumMax{0.0, 0.0};
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      v.sum += __shfl_xor_sync(0xffffffffu, v.sum, offset);
      v.max = fmax(v.max, __shfl_xor_sync(0xffffffffu, v.max, offset));
    }
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

template <NormKind kKind>
__device__ __forceinline__ bool float_sum_ok(float amax) {
  if constexpr (kKind == NormKind::Zero || kKind == NormKind::Inf) {
    return amax <= 3.4e38f;  // only the max matters: it must not have overflowed in float32
  } else {
    return amax == 0.0f || (amax >= 0x1p-50f && amax <= 0x1p50f);
  }
}

// A chunk's NaN/Inf flags (second read; only for chunks that hold one).
template <typename T>
__device__ __noinline__ void nonfinite_flags(const T* data, int64_t n, NormPartial& out) {
  using B = typename Elem<T>::bits;
  int nan = 0, inf = 0;
  for_each_element(data, n, [&](T x) {
    const B b = bits_of(x);
    const bool nonfinite = (b & Elem<T>::kExp) == Elem<T>::kExp;
    nan |= nonfinite && (b & Elem<T>::kMant) != 0;
    inf |= nonfinite && (b & Elem<T>::kMant) == 0;
  });
  out.has_nan = __syncthreads_or(nan) ? 1.0 : 0.0;
  out.has_inf = __syncthreads_or(inf) ? 1.0 : 0.0;
}

// float64 path (float64 chunks, general p, and float32 chunks of extreme magnitude): a direct
// sum of |x s|^p when the chunk's max allows it, else the sum relative to that max.
template <NormKind kKind, typename T>
__device__ __noinline__ NormPartial exact_partial(const T* data, int64_t n, double p, double s, SumMax* scratch) {
  double acc = 0.0, amax = 0.0;
  for_each_element(data, n, [&](T x) {
    const double v = fabs(static_cast<double>(Elem<T>::widen(x)) * s);
    amax = isfinite(v) ? fmax(amax, v) : amax;
    if constexpr (kKind == NormKind::Zero) {
      acc += (bits_of(x) & ~Elem<T>::kSign) != 0 ? 1.0 : 0.0;  // NaN counts, as torch
    } else if constexpr (kKind != NormKind::Inf) {
      acc += isfinite(v) ? pow_p(v, kKind, p) : 0.0;
    }
  });
  const SumMax direct = block_sum_max(SumMax{acc, amax}, scratch);
  NormPartial out{1.0, direct.sum, direct.max, 0.0, 0.0};
  constexpr bool kSummed = kKind == NormKind::One || kKind == NormKind::Two || kKind == NormKind::General;
  if constexpr (kSummed) {
    if (direct.max > 0.0 && !direct_sum_ok(direct.max, p)) {
      const double inv_max = 1.0 / direct.max;
      double rel = 0.0;
      for_each_element(data, n, [&](T x) {
        const double v = fabs(static_cast<double>(Elem<T>::widen(x)) * s);
        rel += isfinite(v) ? pow_p(v * inv_max, kKind, p) : 0.0;
      });
      out.scale = direct.max;
      out.rel = block_sum_max(SumMax{rel, 0.0}, scratch).sum;
    } else if (direct.sum == 0.0) {
      out.scale = 0.0;
    }
  }
  return out;
}

template <NormKind kKind, typename T>
__device__ NormPartial chunk_partial(const T* data, int64_t n, double p, double s, SumMax* scratch) {
  constexpr bool kFloatPath = !std::is_same_v<T, double> && kKind != NormKind::General;
  bool bad = false;
  if constexpr (kFloatPath) {
    const float fs = static_cast<float>(s);
    float acc = 0.0f, amax = 0.0f;
    for_each_element<2>(data, n, [&](T x) {
      bad |= is_nonfinite_bits(x);
      const float v = fabsf(Elem<T>::widen(x) * fs);
      amax = fmaxf(amax, v);  // a NaN v is dropped here; `bad` has it
      if constexpr (kKind == NormKind::Zero) {
        acc += (bits_of(x) & ~Elem<T>::kSign) != 0 ? 1.0f : 0.0f;
      } else if constexpr (kKind == NormKind::One) {
        acc += v;
      } else if constexpr (kKind == NormKind::Two) {
        acc = fmaf(v, v, acc);
      }
    });
    const bool nonfinite = __syncthreads_or(bad);
    const SumMax total = block_sum_max(SumMax{static_cast<double>(acc), static_cast<double>(amax)}, scratch);
    if (nonfinite) {
      // The norm is NaN or Inf whatever the other values are; only p = 0 still counts them.
      NormPartial out{1.0, kKind == NormKind::Zero ? total.sum : 0.0, 0.0, 0.0, 0.0};
      nonfinite_flags(data, n, out);
      return out;
    }
    const bool s_ok = s >= 0x1p-60 && s <= 0x1p60;
    if (s_ok && float_sum_ok<kKind>(static_cast<float>(total.max))) {
      NormPartial out{1.0, total.sum, total.max, 0.0, 0.0};
      if ((kKind == NormKind::One || kKind == NormKind::Two) && total.sum == 0.0) out.scale = 0.0;
      return out;
    }
    return exact_partial<kKind>(data, n, p, s, scratch);
  } else {
    for_each_element<2>(data, n, [&](T x) { bad |= is_nonfinite_bits(x); });
    if (__syncthreads_or(bad)) {
      NormPartial out{1.0, 0.0, 0.0, 0.0, 0.0};
      if constexpr (kKind == NormKind::Zero) out.rel = exact_partial<kKind>(data, n, p, s, scratch).rel;
      nonfinite_flags(data, n, out);
      return out;
    }
    return exact_partial<kKind>(data, n, p, s, scratch);
  }
}

// The fold of `n` partial rows, by the block (the last one of the norm launch).
template <NormKind kKind>
__device__ __noinline__ NormPartial block_combine(const double* rows, int64_t n, double p, SumMax* scratch) {
  double scale = 0.0, amax = 0.0;
  int nan = 0, inf = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double* r = rows + i * kSummaryFields;
    const double rel = __ldcg(r + 1), row_scale = __ldcg(r + 0);
    if (rel > 0.0 && row_scale > scale) scale = row_scale;
    amax = fmax(amax, __ldcg(r + 2));
    nan |= __ldcg(r + 3) != 0.0;
    inf |= __ldcg(r + 4) != 0.0;
  }
  const SumMax scale_max = block_sum_max(SumMax{0.0, scale}, scratch);
  const SumMax amax_max = block_sum_max(SumMax{0.0, amax}, scratch);
  NormPartial out{scale_max.max, 0.0, amax_max.max, __syncthreads_or(nan) ? 1.0 : 0.0,
                  __syncthreads_or(inf) ? 1.0 : 0.0};
  double rel = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double* r = rows + i * kSummaryFields;
    rel += kKind == NormKind::Zero ? __ldcg(r + 1) : rescaled(__ldcg(r + 1), __ldcg(r + 0), out.scale, kKind, p);
  }
  out.rel = block_sum_max(SumMax{rel, 0.0}, scratch).sum;
  if (kKind == NormKind::Zero || kKind == NormKind::Inf) out.scale = 1.0;
  return out;
}

// Thread 0 of the finishing block: the summary, or the norm and the clip coefficient.
template <NormKind kKind>
__device__ __noinline__ void write_outputs(const NormPartial& total, double p, double inv_scale, const NormOutputs& out) {
  if (out.summary != nullptr) {
    out.summary[0] = total.scale;
    out.summary[1] = total.rel;
    out.summary[2] = total.amax;
    out.summary[3] = total.has_nan;
    out.summary[4] = total.has_inf;
    return;
  }
  const double norm = norm_in_dtype(norm_from_summary(total, kKind, p), out.norm_max);
  const bool nonfinite = summary_nonfinite(total, norm);
  if (nonfinite && out.found_inf_f != nullptr) *out.found_inf_f = 1.0f;
  if (nonfinite && out.found_inf_d != nullptr) *out.found_inf_d = 1.0;
  switch (out.norm_type) {
    case ElemType::Float: *static_cast<float*>(out.total_norm) = static_cast<float>(norm); break;
    case ElemType::Double: *static_cast<double*>(out.total_norm) = norm; break;
    case ElemType::Half: *static_cast<__half*>(out.total_norm) = __double2half(norm); break;
    case ElemType::BFloat16: *static_cast<__nv_bfloat16*>(out.total_norm) = __double2bfloat16(norm); break;
  }
  const double coef = clip_coef(norm, nonfinite, out.max_norm, inv_scale);
  *out.coef = coef;
  if (out.divisor != nullptr) *out.divisor = static_cast<float>(1.0 / coef);
}

template <NormKind kKind>
struct NormPartialOp {
  double p;
  DeviceScalar inv_scale;
  double* partials;    // (total_chunks, kSummaryFields)
  unsigned* finished;  // chunks done so far; zeroed before the launch
  int64_t total_chunks;
  NormOutputs out;

  template <typename T>
  __device__ void operator()(T* data, int64_t n, int64_t /*tensor_index*/, int64_t chunk_id) const {
    __shared__ SumMax scratch[kWarpSize];
    __shared__ bool last;
    const double s = inv_scale.get();
    const NormPartial part = chunk_partial<kKind>(data, n, p, s, scratch);
    if (threadIdx.x == 0) {
      double* row = partials + chunk_id * kSummaryFields;
      row[0] = part.scale;
      row[1] = part.rel;
      row[2] = part.amax;
      row[3] = part.has_nan;
      row[4] = part.has_inf;
      __threadfence();  // the row is visible device-wide before the counter says so
      last = atomicAdd(finished, 1u) == static_cast<unsigned>(total_chunks - 1);
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    const NormPartial total = block_combine<kKind>(partials, total_chunks, p, scratch);
    if (threadIdx.x == 0) write_outputs<kKind>(total, p, s, out);
  }
};

// The norm of an empty list (every tensor has zero elements): the finishing step alone.
template <NormKind kKind>
__global__ void __launch_bounds__(kBlockThreads) empty_norm_kernel(double p, DeviceScalar inv_scale, NormOutputs out) {
  if (threadIdx.x == 0) write_outputs<kKind>(NormPartial{0.0, 0.0, 0.0, 0.0, 0.0}, p, inv_scale.get(), out);
}

template <NormKind kKind>
__global__ void clip_coef_kernel(const double* __restrict__ rows, int64_t n, double p, DeviceScalar inv_scale,
                                 NormOutputs out) {
  write_outputs<kKind>(combine_partials(rows, n, kKind, p), p, inv_scale.get(), out);
}

template <typename Fn>
void with_norm_kind(NormKind kind, Fn&& fn) {
  switch (kind) {
    case NormKind::Zero: fn(std::integral_constant<NormKind, NormKind::Zero>{}); break;
    case NormKind::One: fn(std::integral_constant<NormKind, NormKind::One>{}); break;
    case NormKind::Two: fn(std::integral_constant<NormKind, NormKind::Two>{}); break;
    case NormKind::Inf: fn(std::integral_constant<NormKind, NormKind::Inf>{}); break;
    case NormKind::General: fn(std::integral_constant<NormKind, NormKind::General>{}); break;
  }
}

struct ScaleOp {
  const double* coef;

  template <typename T>
  __device__ void operator()(T* data, int64_t n, int64_t /*tensor_index*/, int64_t /*chunk_id*/) const {
    const double c = *coef;
    if (c == 1.0) return;  // nothing to clip or unscale: no write traffic at all
    const acc_t<T> factor = static_cast<acc_t<T>>(c);
    transform_elements(data, n, [&](T x) { return Elem<T>::narrow(Elem<T>::widen(x) * factor); });
  }
};

}  // namespace

int64_t grad_norm_scratch_doubles(const std::vector<DeviceView>& views) {
  return total_chunks(views) * kSummaryFields + 1;  // + the counter (one double's room)
}

cudaError_t launch_grad_norm(const std::vector<DeviceView>& views, NormKind kind, double p, ScalarArg inv_scale,
                             double* scratch, const NormOutputs& out, cudaStream_t stream) {
  const int64_t chunks = total_chunks(views);
  cudaError_t err = cudaSuccess;
  with_norm_kind(kind, [&](auto k) {
    constexpr NormKind kKind = decltype(k)::value;
    if (chunks == 0) {
      empty_norm_kernel<kKind><<<1, kWarpSize, 0, stream>>>(p, DeviceScalar(inv_scale), out);
      err = cudaGetLastError();
      return;
    }
    unsigned* finished = reinterpret_cast<unsigned*>(scratch + chunks * kSummaryFields);
    if ((err = cudaMemsetAsync(finished, 0, sizeof(unsigned), stream)) != cudaSuccess) return;
    err = multi_tensor_apply<Tables::Large>(views, stream,
                             NormPartialOp<kKind>{p, DeviceScalar(inv_scale), scratch, finished, chunks, out});
  });
  return err;
}

cudaError_t launch_clip_coef(const double* rows, int64_t n, NormKind kind, double p, ScalarArg inv_scale,
                             const NormOutputs& out, cudaStream_t stream) {
  with_norm_kind(kind, [&](auto k) {
    clip_coef_kernel<decltype(k)::value><<<1, 1, 0, stream>>>(rows, n, p, DeviceScalar(inv_scale), out);
  });
  return cudaGetLastError();
}

cudaError_t launch_scale_tensors(const std::vector<DeviceView>& views, const double* coef, cudaStream_t stream) {
  return multi_tensor_apply<Tables::Large>(views, stream, ScaleOp{coef});
}

}  // namespace nanops::cuda
