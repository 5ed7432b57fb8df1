// CPU counterpart of csrc/cuda/multi_tensor_apply.cuh: a tensor list cut into fixed-size
// chunks, processed in parallel, so one big tensor and a thousand small ones both spread
// over all cores.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tensor_list.h"

namespace nanops::cpu {

// Small enough to balance a list of mid-sized grads over the cores, large enough that
// per-chunk overhead vanishes against the memory traffic.
constexpr int64_t kChunkSize = 32768;

struct Chunk {
  int32_t view;  // index into the FlatView vector
  int64_t begin;
  int64_t end;
};

inline std::vector<Chunk> make_chunks(const std::vector<FlatView>& views, int64_t chunk_size = kChunkSize) {
  std::vector<Chunk> chunks;
  for (size_t v = 0; v < views.size(); ++v) {
    for (int64_t begin = 0; begin < views[v].numel; begin += chunk_size) {
      chunks.push_back(Chunk{static_cast<int32_t>(v), begin, std::min(views[v].numel, begin + chunk_size)});
    }
  }
  return chunks;
}

enum class ChunkOrder { Forward, Reverse };

// Calls fn(chunk_index) for every chunk, spread over the intra-op thread pool. Each thread gets
// the same contiguous range of chunks on every call, so a second pass over the same list in
// Reverse order starts on the chunks that thread read last, still in its caches.
template <typename Fn>
void parallel_for_chunks(const std::vector<Chunk>& chunks, const Fn& fn, ChunkOrder order = ChunkOrder::Forward) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    if (order == ChunkOrder::Forward) {
      for (int64_t c = begin; c < end; ++c) fn(c);
    } else {
      for (int64_t c = end - 1; c >= begin; --c) fn(c);
    }
  });
}

}  // namespace nanops::cpu
