// One launch over a whole tensor list (apex / ATen multi_tensor_apply style, our own code).
//
// The list is cut into fixed-size chunks; each CUDA block handles one chunk. Chunk and tensor
// tables travel in the kernel's parameter block (no host-to-device copy, so the launches can
// be captured in a CUDA graph); when a table fills up, that launch goes out and the next one
// continues where it stopped. Tensors of different dtypes share a launch: each tensor slot
// carries its dtype and the kernel switches on it once per block.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/launch.h"

namespace nanops::cuda {

constexpr int64_t kChunkSize = 65536;  // elements per block
constexpr int kBlockThreads = 512;
// Sized so that TensorListMeta stays under the classic 4 KB kernel-parameter limit.
constexpr int kMaxTensorsPerLaunch = 64;
constexpr int kMaxChunksPerLaunch = 320;

struct TensorListMeta {
  void* data[kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  int32_t index[kMaxTensorsPerLaunch];  // position in the caller's list
  ElemType type[kMaxTensorsPerLaunch];
  int16_t chunk_slot[kMaxChunksPerLaunch];      // tensor slot of each block's chunk
  int32_t chunk_in_tensor[kMaxChunksPerLaunch];  // chunk number within that tensor
  int64_t first_chunk_id;  // global number of this launch's first chunk (for partial buffers)
};
static_assert(sizeof(TensorListMeta) <= 4096, "kernel parameter block too large");

inline int64_t num_chunks(const DeviceView& view) { return (view.numel + kChunkSize - 1) / kChunkSize; }

// Op must provide: template <typename T> __device__ void operator()(T* chunk, int64_t n,
// int64_t tensor_index, int64_t chunk_id) const, called by all threads of the block.
template <typename Op>
__global__ void __launch_bounds__(kBlockThreads) multi_tensor_kernel(TensorListMeta meta, Op op) {
  const int slot = meta.chunk_slot[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.chunk_in_tensor[blockIdx.x]) * kChunkSize;
  const int64_t n = min(kChunkSize, meta.numel[slot] - begin);
  const int64_t index = meta.index[slot];
  const int64_t chunk_id = meta.first_chunk_id + blockIdx.x;
  switch (meta.type[slot]) {
    case ElemType::Float:
      op(static_cast<float*>(meta.data[slot]) + begin, n, index, chunk_id);
      break;
    case ElemType::Half:
      op(static_cast<c10::Half*>(meta.data[slot]) + begin, n, index, chunk_id);
      break;
    case ElemType::BFloat16:
      op(static_cast<c10::BFloat16*>(meta.data[slot]) + begin, n, index, chunk_id);
      break;
    case ElemType::Double:
      op(static_cast<double*>(meta.data[slot]) + begin, n, index, chunk_id);
      break;
  }
}

// Launches multi_tensor_kernel over every chunk of `views`, as few launches as the parameter
// tables allow. Chunk ids run 0 .. total_chunks(views)-1 in list order. Returns the first
// launch error (later launches are not made).
template <typename Op>
cudaError_t multi_tensor_apply(const std::vector<DeviceView>& views, cudaStream_t stream, const Op& op) {
  TensorListMeta meta;
  meta.first_chunk_id = 0;
  int num_tensors = 0;
  int num_chunks_in_launch = 0;
  auto launch = [&] {
    multi_tensor_kernel<<<num_chunks_in_launch, kBlockThreads, 0, stream>>>(meta, op);
    meta.first_chunk_id += num_chunks_in_launch;
    num_tensors = 0;
    num_chunks_in_launch = 0;
    return cudaGetLastError();
  };
  for (const DeviceView& view : views) {
    int slot = -1;
    const int64_t chunks = num_chunks(view);
    for (int64_t c = 0; c < chunks; ++c) {
      const bool tables_full = num_chunks_in_launch == kMaxChunksPerLaunch ||
                               (slot < 0 && num_tensors == kMaxTensorsPerLaunch);
      if (tables_full) {
        if (const cudaError_t err = launch(); err != cudaSuccess) return err;
        slot = -1;  // a tensor split across launches takes a fresh slot in the next one
      }
      if (slot < 0) {
        slot = num_tensors++;
        meta.data[slot] = view.data;
        meta.numel[slot] = view.numel;
        meta.index[slot] = static_cast<int32_t>(view.index);
        meta.type[slot] = view.type;
      }
      meta.chunk_slot[num_chunks_in_launch] = static_cast<int16_t>(slot);
      meta.chunk_in_tensor[num_chunks_in_launch] = static_cast<int32_t>(c);
      ++num_chunks_in_launch;
    }
  }
  return num_chunks_in_launch > 0 ? launch() : cudaSuccess;
}

// Visits the n elements of a chunk, each thread a strided share, with 16-byte loads when the
// chunk is aligned for them (chunks start at multiples of kChunkSize, so only the tensor's
// base address decides).
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_element(const T* data, int64_t n, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(T);
  struct alignas(16) Pack {
    T v[kVec];
  };
  int64_t tail_begin = 0;
  if (reinterpret_cast<uintptr_t>(data) % 16 == 0) {
    const Pack* packs = reinterpret_cast<const Pack*>(data);
    const int64_t num_packs = n / kVec;
    for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x) {
      const Pack pack = packs[i];
#pragma unroll
      for (int j = 0; j < kVec; ++j) fn(pack.v[j]);
    }
    tail_begin = num_packs * kVec;
  }
  for (int64_t i = tail_begin + threadIdx.x; i < n; i += blockDim.x) fn(data[i]);
}

// Same traversal, writing back: data[i] = fn(data[i]).
template <typename T, typename Fn>
__device__ __forceinline__ void transform_elements(T* data, int64_t n, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(T);
  struct alignas(16) Pack {
    T v[kVec];
  };
  int64_t tail_begin = 0;
  if (reinterpret_cast<uintptr_t>(data) % 16 == 0) {
    Pack* packs = reinterpret_cast<Pack*>(data);
    const int64_t num_packs = n / kVec;
    for (int64_t i = threadIdx.x; i < num_packs; i += blockDim.x) {
      Pack pack = packs[i];
#pragma unroll
      for (int j = 0; j < kVec; ++j) pack.v[j] = fn(pack.v[j]);
      packs[i] = pack;
    }
    tail_begin = num_packs * kVec;
  }
  for (int64_t i = tail_begin + threadIdx.x; i < n; i += blockDim.x) data[i] = fn(data[i]);
}

// float for the 16-bit types and float32, double for float64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

}  // namespace nanops::cuda
