#pragma once
// stable_softmax's block kernels: one block per row, any length, float64 too.
// Included by stable_softmax.cu alone (an anonymous namespace: one copy per launch TU).
#include "cuda/block_reduce.cuh"
#include "cuda/elem.cuh"
#include "cuda/softmax_row.cuh"
#include "softmax_mask.h"

namespace nanops::cuda {
namespace {

constexpr int kRowBlockThreads = 512;
constexpr int64_t kMaxRowBlocks = 1 << 20;  // past it, blocks stride over the rows

// ---------------------------------------------------------------------------------------------
// Block kernels: one block per row (grid-stride past 2^20 rows), any length, float64 too.
// ---------------------------------------------------------------------------------------------

// Shared-memory cache of a row's packs in the accumulation type: chunk c (16 bytes) of pack p at
// chunk index c * packs + p, so a thread's 16-byte accesses to consecutive packs are consecutive
// across the warp (no bank conflicts; a 32-byte float pack of 16-bit x is two such chunks).
template <typename A, int kVec>
struct PackCache {
  static constexpr int kPerChunk = 16 / static_cast<int>(sizeof(A));
  static constexpr int kChunks = kVec / kPerChunk;
  A* base;
  int packs;

  __device__ __forceinline__ void put(int pack, const A (&v)[kVec]) const {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      Pack<A, kPerChunk> chunk;
#pragma unroll
      for (int k = 0; k < kPerChunk; ++k) chunk.v[k] = v[c * kPerChunk + k];
      store_pack<A, kPerChunk>(base + (static_cast<int64_t>(c) * packs + pack) * kPerChunk, chunk);
    }
  }
  __device__ __forceinline__ void get(int pack, A (&v)[kVec]) const {
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const Pack<A, kPerChunk> chunk = load_pack<A, kPerChunk>(base + (static_cast<int64_t>(c) * packs + pack) * kPerChunk);
#pragma unroll
      for (int k = 0; k < kPerChunk; ++k) v[c * kPerChunk + k] = chunk.v[k];
    }
  }
};

template <typename T>
constexpr int64_t cache_bytes_per_pack() {
  return pack_elems<T>() * static_cast<int64_t>(sizeof(acc_t<T>));
}

// cached: the row's logits live in shared memory (count * kVec accumulators); x is read once
// and exp taken once per element. Without it (rows past shared memory): an online max/sum pass
// over x, a write pass. A run-time flag, uniform over the launch: one kernel per type and mask kind.
template <typename T, MaskKind kKind>
__global__ void __launch_bounds__(kRowBlockThreads)
    softmax_forward_block(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int len, acc_t<T> scale_log2,
                          const void* __restrict__ mask, const MaskIndexer index, bool y_aligned, bool mask_vec,
                          bool cached) {
  using A = acc_t<T>;
  using M = typename MaskElem<kKind, T>::type;
  using R = RowPacks<T>;
  constexpr int V = R::kVec;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ A scratch[kWarpSize];
  __shared__ int int_scratch[kWarpSize];

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * len;
    T* yr = y + row * len;
    const R packs{misalignment(xr), len};
    const int count = packs.count();
    const PackCache<A, V> cache{reinterpret_cast<A*>(shared_raw), count};
    const M* mrow = nullptr;
    if constexpr (kKind != MaskKind::None) mrow = static_cast<const M*>(mask) + index.row_offset(row);
    auto logits = [&](int pack, A (&z)[V]) {
      Pack<T, V> xp[1];
      Pack<M, V> mp[1] = {};
      load_full_packs<T, 1>(packs, xr, pack, 0, true, true, xp);
      if constexpr (kKind != MaskKind::None) load_full_packs<T, 1, false>(packs, mrow, pack, 0, true, mask_vec, mp);
      load_partial_packs<T, 1>(packs, xr, pack, 0, true, true, xp);
      if constexpr (kKind != MaskKind::None) {
        load_partial_packs<T, 1>(packs, mrow, pack, 0, true, mask_vec, mp, index.inner_stride);
      }
      A one[1][V];
      logits_of<kKind>(packs, pack, 0, xp, mp, scale_log2, false, one);
#pragma unroll
      for (int k = 0; k < V; ++k) z[k] = one[0][k];
    };
    // A pack's logits once the first pass is done: from the cache, or formed again from x.
    auto stored_logits = [&](int pack, A (&z)[V]) {
      if (cached) {
        cache.get(pack, z);
      } else {
        logits(pack, z);
      }
    };

    A mine = -infinity<A>();
    A online_sum = 0;  // uncached: relative to `mine`, over its finite logits
    for (int pack = threadIdx.x; pack < count; pack += blockDim.x) {
      A z[V];
      logits(pack, z);
      if (cached) {
        cache.put(pack, z);
#pragma unroll
        for (int k = 0; k < V; ++k) mine = max_nan(mine, z[k]);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A next = max_nan(mine, z[k]);
          if (next == next && next != infinity<A>() && next != -infinity<A>()) {
            online_sum = online_sum * exp_domain(mine - next) + exp_domain(z[k] - next);  // exp(-inf) = 0
          }
          mine = next;
        }
      }
    }
    const A max_z = block_reduce(mine, MaxNanOp{}, -infinity<A>(), scratch);
    const bool ordinary = ordinary_max(max_z);
    A inv_sum = A(0);
    int pos_inf = 0;
    if (ordinary) {
      A part = 0;
      if (cached) {
        for (int pack = threadIdx.x; pack < count; pack += blockDim.x) {  // the packs this thread cached
          A z[V];
          cache.get(pack, z);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            z[k] = exp_domain(z[k] - max_z);
            part += z[k];
          }
          cache.put(pack, z);
        }
      } else {
        part = ordinary_max(mine) ? online_sum * exp_domain(mine - max_z) : A(0);
      }
      inv_sum = A(1) / block_reduce(part, SumOp{}, A(0), scratch);
    } else if (max_z == infinity<A>()) {
      for (int pack = threadIdx.x; pack < count; pack += blockDim.x) {
        A z[V];
        stored_logits(pack, z);
#pragma unroll
        for (int k = 0; k < V; ++k) pos_inf += z[k] == infinity<A>();
      }
      pos_inf = block_reduce(pos_inf, SumOp{}, 0, int_scratch);
    }
    for (int pack = threadIdx.x; pack < count; pack += blockDim.x) {
      A z[V];
      stored_logits(pack, z);
      A out[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (!ordinary) {
          out[k] = special_prob(z[k], max_z, pos_inf);
        } else if (cached) {
          out[k] = z[k] * inv_sum;
        } else {
          out[k] = exp_domain(z[k] - max_z) * inv_sum;
        }
      }
      packs.store(yr, pack, out, y_aligned);
    }
    __syncthreads();  // the next row reuses the cache and the scratch
  }
}

// cached: grad_y and y packs live in shared memory (2 * count * kVec accumulators), read once.
template <typename T>
__global__ void __launch_bounds__(kRowBlockThreads)
    softmax_backward_block(const T* __restrict__ grad_y, const T* __restrict__ y, T* __restrict__ grad_x,
                           int64_t rows, int len, acc_t<T> scale, bool same_layout, bool cached) {
  using A = acc_t<T>;
  using R = RowPacks<T>;
  constexpr int V = R::kVec;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ A scratch[kWarpSize];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * len;
    const R packs{misalignment(grad_x + base), len};
    const int count = packs.count();
    const PackCache<A, V> g_cache{reinterpret_cast<A*>(shared_raw), count};
    const PackCache<A, V> y_cache{reinterpret_cast<A*>(shared_raw) + static_cast<int64_t>(count) * V, count};
    A dot = 0;
    for (int pack = threadIdx.x; pack < count; pack += blockDim.x) {
      A g[V], p[V];
      packs.load(grad_y + base, pack, g, A(0), same_layout);
      packs.load(y + base, pack, p, A(0), same_layout);
      if (cached) {
        g_cache.put(pack, g);
        y_cache.put(pack, p);
      }
#pragma unroll
      for (int k = 0; k < V; ++k) dot += g[k] * p[k];
    }
    dot = block_reduce(dot, SumOp{}, A(0), scratch);
    for (int pack = threadIdx.x; pack < count; pack += blockDim.x) {
      A g[V], p[V];
      if (cached) {
        g_cache.get(pack, g);
        y_cache.get(pack, p);
      } else {
        packs.load(grad_y + base, pack, g, A(0), same_layout);
        packs.load(y + base, pack, p, A(0), same_layout);
      }
      A out[V];
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = scale * p[k] * (g[k] - dot);
      packs.store(grad_x + base, pack, out, true);
    }
    __syncthreads();
  }
}

}  // namespace
}  // namespace nanops::cuda
