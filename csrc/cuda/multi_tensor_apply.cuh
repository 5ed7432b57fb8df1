// One launch over a whole tensor list (apex / ATen multi_tensor_apply style, our own code).
//
// The list is cut into fixed-size chunks; each CUDA block handles one chunk. The tensor table
// travels in the kernel's parameter block (no host-to-device copy, so launches can be captured
// in a CUDA graph). CUDA 12.1+ on Volta and newer takes 32764 bytes of parameters, so a table
// holds 1152 tensors and any number of chunks: a block finds its tensor by a binary search over
// the tensors' first chunk numbers. yolov5s's 182 grads and a 1e9-element tensor are one launch
// each; only lists longer than 1152 tensors take more. The NaN checks also have 64- and 256-entry
// tables (see Tables), so the driver copies 1.5 KB (6.4 KB for yolov5s's 182 grads) of parameters
// per launch instead of 28 KB: the launch's host time grows with the parameter block. Tensors of different dtypes
// share a launch: each slot carries its dtype, switched on once per block.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "cuda/elem.cuh"
#include "cuda/launch.h"

namespace nanops::cuda {

constexpr int64_t kChunkSize = 65536;  // elements per block
constexpr int kBlockThreads = 512;
// Four blocks of 512 threads fill an SM (2048 threads): at most 32 registers per thread. Turing
// (sm_75) holds 1024 threads per SM: two blocks there (as torch's C10_MIN_BLOCKS_PER_SM does).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 750
constexpr int kMinBlocksPerSM = 2;
#else
constexpr int kMinBlocksPerSM = 4;
#endif
constexpr int kMaxKernelParamBytes = 32764;  // CUDA >= 12.1, compute capability >= 7.0
constexpr int kSmallTable = 64;
constexpr int kMidTable = 256;
constexpr int kLargeTable = 1152;

template <int kCapacity>
struct TensorListMeta {
  void* data[kCapacity];
  int64_t numel[kCapacity];
  int32_t first_chunk[kCapacity + 1];  // chunk (within this launch) where each tensor starts; [n] = total
  int32_t index[kCapacity];            // position in the caller's list
  ElemType type[kCapacity];
  int32_t num_tensors;
  int64_t first_chunk_id;  // global number of this launch's chunk 0 (rows of partial buffers)
};

inline int64_t num_chunks(const DeviceView& view) { return (view.numel + kChunkSize - 1) / kChunkSize; }

// The slot whose chunks contain `chunk`: the last s with first_chunk[s] <= chunk. Every thread
// of the block computes the same answer from the same constant-bank words.
template <int kCapacity>
__device__ __forceinline__ int find_slot(const TensorListMeta<kCapacity>& meta, int32_t chunk) {
  int lo = 0, hi = meta.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta.first_chunk[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Op must provide: template <typename T> __device__ void operator()(T* chunk, int64_t n,
// int64_t tensor_index, int64_t chunk_id) const, called by all threads of the block, with T one
// of float, double, __half, __nv_bfloat16.
template <int kCapacity, typename Op>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    multi_tensor_kernel(const __grid_constant__ TensorListMeta<kCapacity> meta, const __grid_constant__ Op op) {
  const int32_t chunk = static_cast<int32_t>(blockIdx.x);
  const int slot = find_slot(meta, chunk);
  const int64_t begin = static_cast<int64_t>(chunk - meta.first_chunk[slot]) * kChunkSize;
  const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
  const int64_t index = meta.index[slot];
  const int64_t chunk_id = meta.first_chunk_id + chunk;
  switch (meta.type[slot]) {
    case ElemType::Float: op(static_cast<float*>(meta.data[slot]) + begin, n, index, chunk_id); break;
    case ElemType::Half: op(static_cast<__half*>(meta.data[slot]) + begin, n, index, chunk_id); break;
    case ElemType::BFloat16: op(static_cast<__nv_bfloat16*>(meta.data[slot]) + begin, n, index, chunk_id); break;
    case ElemType::Double: op(static_cast<double*>(meta.data[slot]) + begin, n, index, chunk_id); break;
  }
}

template <int kCapacity, typename Op>
cudaError_t multi_tensor_launches(const std::vector<DeviceView>& views, cudaStream_t stream, const Op& op) {
  static_assert(sizeof(TensorListMeta<kCapacity>) + sizeof(Op) <= kMaxKernelParamBytes,
                "kernel parameter block too large");
  TensorListMeta<kCapacity> meta;  // only the first n slots are filled; the driver copies the whole block
  meta.first_chunk_id = 0;
  int n = 0;
  int64_t chunks = 0;
  auto launch = [&] {
    meta.first_chunk[n] = static_cast<int32_t>(chunks);
    meta.num_tensors = n;
    multi_tensor_kernel<kCapacity, Op><<<static_cast<unsigned>(chunks), kBlockThreads, 0, stream>>>(meta, op);
    meta.first_chunk_id += chunks;
    n = 0;
    chunks = 0;
    return cudaGetLastError();
  };
  for (const DeviceView& view : views) {
    const int64_t c = num_chunks(view);
    if (n == kCapacity || chunks + c > int64_t{0x7fffffff}) {
      if (const cudaError_t err = launch(); err != cudaSuccess) return err;
    }
    meta.data[n] = view.data;
    meta.numel[n] = view.numel;
    meta.first_chunk[n] = static_cast<int32_t>(chunks);
    meta.index[n] = static_cast<int32_t>(view.index);
    meta.type[n] = view.type;
    ++n;
    chunks += c;
  }
  return n > 0 ? launch() : cudaSuccess;
}

// Which launch tables an op is built with. All: 64, 256 and 1152 entries, for ops whose launch is
// host-bound on short lists (the NaN checks: the driver copies 1.5 KB or 6.4 KB of parameters
// instead of 28 KB). Large: 1152 only, for the heavy norm kernels (each table is one more
// instantiation of every kernel: compile time on every architecture).
enum class Tables { All, Large };

// Launches multi_tensor_kernel over every chunk of `views` (empty views must be left out by the
// caller), in as few launches as the table allows. Chunk ids run 0 .. total_chunks(views)-1 in
// list order. Returns the first launch error (later launches are not made).
template <Tables kTables = Tables::All, typename Op>
cudaError_t multi_tensor_apply(const std::vector<DeviceView>& views, cudaStream_t stream, const Op& op) {
  if constexpr (kTables == Tables::All) {
    if (views.size() <= static_cast<size_t>(kSmallTable)) return multi_tensor_launches<kSmallTable>(views, stream, op);
    if (views.size() <= static_cast<size_t>(kMidTable)) return multi_tensor_launches<kMidTable>(views, stream, op);
  }
  return multi_tensor_launches<kLargeTable>(views, stream, op);
}

// Number of launches multi_tensor_apply<kTables> makes for `views` (reported by the benchmarks).
template <Tables kTables = Tables::All>
inline int64_t multi_tensor_launch_count(const std::vector<DeviceView>& views) {
  int64_t capacity = kLargeTable;
  if (kTables == Tables::All && views.size() <= static_cast<size_t>(kSmallTable)) capacity = kSmallTable;
  else if (kTables == Tables::All && views.size() <= static_cast<size_t>(kMidTable)) capacity = kMidTable;
  return views.empty() ? 0 : (static_cast<int64_t>(views.size()) + capacity - 1) / capacity;
}

// Visits the n elements of a chunk, each thread a strided share: 16-byte loads when the chunk is
// aligned for them (chunks start at multiples of kChunkSize, so only the tensor's base address
// decides), kUnroll of them issued before any is used; then a scalar tail. At four 512-thread
// blocks per SM, two loads per thread in flight already cover the memory latency. kWrite: each
// element is replaced by fn's result (data[i] = fn(data[i])); else fn only reads it.
template <bool kWrite, int kUnroll, typename T, typename Fn>
__device__ __forceinline__ void visit_elements(T* data, int64_t n, Fn&& fn) {
  using Value = std::remove_const_t<T>;
  constexpr int kVec = 16 / sizeof(Value);
  const auto apply = [&](Pack<Value, kVec>& pack, T* at) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if constexpr (kWrite) {
        pack.v[j] = fn(pack.v[j]);
      } else {
        fn(pack.v[j]);
      }
    }
    if constexpr (kWrite) store_pack<Value, kVec>(at, pack);
  };
  int64_t tail_begin = 0;
  if (reinterpret_cast<uintptr_t>(data) % 16 == 0) {
    const int64_t num_packs = n / kVec;
    const int64_t stride = blockDim.x;
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * stride < num_packs; i += kUnroll * stride) {
      Pack<Value, kVec> packs[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) packs[u] = load_pack<Value, kVec>(data + (i + u * stride) * kVec);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) apply(packs[u], data + (i + u * stride) * kVec);
    }
    for (; i < num_packs; i += stride) {
      Pack<Value, kVec> pack = load_pack<Value, kVec>(data + i * kVec);
      apply(pack, data + i * kVec);
    }
    tail_begin = num_packs * kVec;
  }
  for (int64_t i = tail_begin + threadIdx.x; i < n; i += blockDim.x) {
    if constexpr (kWrite) {
      data[i] = fn(data[i]);
    } else {
      fn(data[i]);
    }
  }
}

template <int kUnroll = 4, typename T, typename Fn>
__device__ __forceinline__ void for_each_element(const T* data, int64_t n, Fn&& fn) {
  visit_elements<false, kUnroll>(data, n, fn);
}

template <typename T, typename Fn>
__device__ __forceinline__ void transform_elements(T* data, int64_t n, Fn&& fn) {
  visit_elements<true, 4>(data, n, fn);
}

}  // namespace nanops::cuda
