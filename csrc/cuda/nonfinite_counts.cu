// CUDA kernels of nanops::nonfinite_counts, all_finite and nonfinite_flag: one multi-tensor
// launch (more only past 1152 tensors), results kept on the device. NaN/Inf are found on the
// exponent bits (an AND and a compare per element, no conversion); only a chunk that holds one
// is read a second time to tell NaN, +Inf and -Inf apart. Host side: nonfinite_counts_host.cpp.
#include "cuda/block_reduce.cuh"
#include "cuda/elem.cuh"
#include "cuda/launch.h"
#include "cuda/multi_tensor_apply.cuh"

namespace nanops::cuda {
namespace {

// The rare second read of a chunk that holds a NaN/Inf: NaN, +Inf and -Inf counted apart and
// added to the tensor's row. Out of line, so its registers do not weigh on the clean path.
template <typename T>
__device__ __noinline__ void count_chunk(const T* data, int64_t n, unsigned long long* row) {
  using B = typename Elem<T>::bits;
  int nan = 0, pos_inf = 0, neg_inf = 0;
  for_each_element(data, n, [&](T x) {
    const B b = bits_of(x);
    if ((b & Elem<T>::kExp) != Elem<T>::kExp) return;
    if ((b & Elem<T>::kMant) != 0) {
      ++nan;
    } else if ((b & Elem<T>::kSign) != 0) {
      ++neg_inf;
    } else {
      ++pos_inf;
    }
  });
  __shared__ int scratch[kWarpSize];
  nan = block_reduce(nan, SumOp{}, 0, scratch);
  pos_inf = block_reduce(pos_inf, SumOp{}, 0, scratch);
  neg_inf = block_reduce(neg_inf, SumOp{}, 0, scratch);
  if (threadIdx.x == 0) {
    if (nan) atomicAdd(row + 0, static_cast<unsigned long long>(nan));
    if (pos_inf) atomicAdd(row + 1, static_cast<unsigned long long>(pos_inf));
    if (neg_inf) atomicAdd(row + 2, static_cast<unsigned long long>(neg_inf));
  }
}

struct CountNonfinite {
  unsigned long long* counts;  // (num_tensors, 3): NaN, +Inf, -Inf

  template <typename T>
  __device__ void operator()(T* data, int64_t n, int64_t tensor_index, int64_t /*chunk_id*/) const {
    bool bad = false;
    for_each_element(data, n, [&](T x) { bad |= is_nonfinite_bits(x); });
    // Almost every chunk is clean: one block-wide vote skips the recount, reductions and atomics.
    if (!__syncthreads_or(bad)) return;
    count_chunk(data, n, counts + tensor_index * 3);
  }
};

// Any thread that meets a NaN/Inf writes the flag; all writers write the same value, so the
// race is benign and no block needs a barrier.
struct FlagNonfinite {
  FlagOut out;

  template <typename T>
  __device__ void operator()(T* data, int64_t n, int64_t /*tensor_index*/, int64_t /*chunk_id*/) const {
    bool bad = false;
    for_each_element(data, n, [&](T x) { bad |= is_nonfinite_bits(x); });
    if (!bad) return;
    if (out.as_float != nullptr) *out.as_float = 1.0f;
    if (out.as_bool != nullptr) *out.as_bool = false;
  }
};

}  // namespace

int64_t total_chunks(const std::vector<DeviceView>& views) {
  int64_t total = 0;
  for (const DeviceView& v : views) total += num_chunks(v);
  return total;
}

int64_t launch_count(const std::vector<DeviceView>& views) { return multi_tensor_launch_count<Tables::All>(views); }

cudaError_t launch_nonfinite_counts(const std::vector<DeviceView>& views, unsigned long long* counts,
                                    cudaStream_t stream) {
  return multi_tensor_apply<Tables::All>(views, stream, CountNonfinite{counts});
}

cudaError_t launch_nonfinite_flag(const std::vector<DeviceView>& views, FlagOut out, cudaStream_t stream) {
  return multi_tensor_apply<Tables::All>(views, stream, FlagNonfinite{out});
}

}  // namespace nanops::cuda
