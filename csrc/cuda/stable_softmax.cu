// CUDA kernels of nanops::stable_softmax and its backward. Row math: softmax_row.cuh. Host
// side: stable_softmax_host.cpp.
//
// Rows whose 16-byte packs fit 32 lanes x kPacks (float32 up to 2048 elements, 16-bit likewise):
// the warp kernels, `width` lanes per row (32, or a power of two under it for short rows, several
// rows per warp), the row held in registers as exactly as many packs as it spans (L = 1600
// float16: 7 packs of 8 per lane, not a power-of-two 2048). Every x and mask element of a lane
// is loaded before the first is used; one NaN-propagating max per row tells ordinary rows from
// special ones (one warp reduction, not three); exp is one FFMA + EX2 with scale * log2(e) folded
// in; x and y move with streaming cache hints, the mask (broadcast over batch and heads) with
// the default ones, so it stays in L2 for the next head. Longer rows and float64: a block per
// row, the row's logits cached in shared memory as conflict-free 16-byte chunks, or, past shared
// memory, an online max/sum pass and a write pass.
//
// Template parameters: the element type, the mask kind and (warp kernels) the packs per lane;
// alignment, vector mask reads, row widths and (block kernels) whether the row fits shared memory
// are run-time flags, uniform over a launch: the library holds about 130 softmax kernels where one
// per combination would be several hundred, and each is compiled for every GPU architecture.
#include <algorithm>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "cuda/block_reduce.cuh"
#include "cuda/elem.cuh"
#include "cuda/launch.h"
#include "cuda/softmax_row.cuh"
#include "softmax_mask.h"

namespace nanops::cuda {
namespace {

constexpr int kWarpBlockThreads = 128;
constexpr int kRowBlockThreads = 512;
constexpr int64_t kMaxRowBlocks = 1 << 20;

// The most packs per lane the warp kernels are built for; longer rows take the block kernels.
template <typename T>
constexpr int max_warp_packs() {
  return std::is_same_v<T, double> ? 0 : pack_elems<T>() == 4 ? 16 : 8;
}

// The logits of a lane's packs (exp domain; -inf outside the row) from their loaded x and mask
// elements. raw: x itself (the caller folds the scale into the exp). Full packs take no
// per-element bounds test.
template <MaskKind kKind, typename T, typename M, typename A, int kPacks, int V>
__device__ __forceinline__ void logits_of(const RowPacks<T>& packs, int first, int step, const Pack<T, V> (&xp)[kPacks],
                                          const Pack<M, V> (&mp)[kPacks], A scale_log2, bool raw, A (&z)[kPacks][V]) {
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    const int pack = first + i * step;
    const bool full = packs.full(pack);
    const int s = packs.start(pack);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const A xk = static_cast<A>(Elem<T>::widen(xp[i].v[k]));
      const A zk = raw ? xk : logit<kKind>(xk, scale_log2, mp[i].v[k]);
      z[i][k] = (full || packs.j_in_row(s + k)) ? zk : -infinity<A>();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Warp kernels
// ---------------------------------------------------------------------------------------------

// This thread's place in a warp kernel's grid: `width` lanes per row (32 when a lane holds
// several packs; a power of two under it for short rows, several rows per warp), its lane in the
// row's group, the row, and whether that row exists (threads past the last row still take part
// in the shuffles).
struct WarpRow {
  int width;
  int lane;
  int64_t row;
  bool active;
};

template <int kPacks>
__device__ __forceinline__ WarpRow warp_row(int64_t rows, int width_log2) {
  const int shift = kPacks > 1 ? 5 : width_log2;
  const int width = 1 << shift;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kWarpBlockThreads + threadIdx.x) >> shift;
  return {width, static_cast<int>(threadIdx.x) & (width - 1), row, row < rows};
}

// y = softmax(scale * x + mask) per row. scale_log2 = scale * log2(e). Flags: y_aligned (y's rows
// have x's misalignment), mask_vec (mask rows aligned like x's packs), width_log2 (lanes per row
// when kPacks == 1; else 32).
template <typename T, MaskKind kKind, int kPacks>
__global__ void __launch_bounds__(kWarpBlockThreads)
    softmax_forward_warp(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int len, float scale_log2,
                         const void* __restrict__ mask, const MaskIndexer index, int width_log2, bool y_aligned,
                         bool mask_vec) {
  using M = typename MaskElem<kKind, T>::type;
  using R = RowPacks<T>;
  constexpr int V = R::kVec;
  const auto [width, lane, row, active] = warp_row<kPacks>(rows, width_log2);
  const T* xr = x + (active ? row : 0) * len;
  const R packs{misalignment(xr), len};
  const int count = packs.count();
  const M* mrow = nullptr;
  if constexpr (kKind != MaskKind::None) {
    mrow = static_cast<const M*>(mask) + (active ? index.row_offset(row) : 0);
  }
  // No mask and a positive scale: z keeps x itself, the max is taken on x, and the scale enters
  // the exp's FFMA (FlashAttention's one FFMA + EX2 per element).
  const bool raw = kKind == MaskKind::None && scale_log2 > 0.0f;

  // Every x and mask pack of the lane is loaded before the first is used.
  Pack<T, V> xp[kPacks];
  Pack<M, V> mp[kPacks] = {};
  load_full_packs<T, kPacks>(packs, xr, lane, width, active, true, xp);
  if constexpr (kKind != MaskKind::None) {
    load_full_packs<T, kPacks, false>(packs, mrow, lane, width, active, mask_vec, mp);
  }
  load_partial_packs<T, kPacks>(packs, xr, lane, width, active, true, xp);
  if constexpr (kKind != MaskKind::None) {
    load_partial_packs<T, kPacks>(packs, mrow, lane, width, active, mask_vec, mp, index.inner_stride);
  }
  float z[kPacks][V];
  logits_of<kKind>(packs, lane, width, xp, mp, scale_log2, raw, z);
  float row_max = -infinity<float>();
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    const bool here = active && i * width + lane < count;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (!here) z[i][k] = -infinity<float>();
      row_max = max_nan(row_max, z[i][k]);
    }
  }
  row_max = kPacks > 1 ? warp_reduce(row_max, MaxNanOp{}) : warp_reduce_width(row_max, width, MaxNanOp{});
  const float max_z = raw ? row_max * scale_log2 : row_max;
  const bool ordinary = ordinary_max(max_z);

  // Branches on `ordinary` and `raw` are uniform over a row: each loop below is straight-line
  // code (an ordinary element costs FFMA + EX2 + FADD, then one FMUL on the way out).
  float sum = 0.0f;
  int pos_inf = 0;
  if (ordinary && raw) {
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        z[i][k] = exp2_fast(fmaf(z[i][k], scale_log2, -max_z));
        sum += z[i][k];
      }
    }
  } else if (ordinary) {
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        z[i][k] = exp2_fast(z[i][k] - max_z);
        sum += z[i][k];
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (raw) z[i][k] *= scale_log2;
        pos_inf += z[i][k] == infinity<float>();
      }
    }
  }
  // Every lane takes part in the shuffles, whatever its row.
  sum = kPacks > 1 ? warp_reduce(sum, SumOp{}) : warp_reduce_width(sum, width, SumOp{});
  if (__any_sync(0xffffffffu, !ordinary)) {
    pos_inf = kPacks > 1 ? warp_reduce(pos_inf, SumOp{}) : warp_reduce_width(pos_inf, width, SumOp{});
  }
  if (!active) return;
  const float inv_sum = 1.0f / sum;
  T* yr = y + row * len;
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    const int pack = i * width + lane;
    if (pack >= count) continue;
    float out[V];
    if (ordinary) {
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = z[i][k] * inv_sum;
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) out[k] = special_prob(z[i][k], max_z, pos_inf);
    }
    packs.store(yr, pack, out, y_aligned);
  }
}

// grad_x = scale * y * (grad_y - sum(grad_y * y)) per row. same_layout: grad_y, y and grad_x
// share their misalignment (else grad_y and y are read element by element).
template <typename T, int kPacks>
__global__ void __launch_bounds__(kWarpBlockThreads)
    softmax_backward_warp(const T* __restrict__ grad_y, const T* __restrict__ y, T* __restrict__ grad_x,
                          int64_t rows, int len, float scale, int width_log2, bool same_layout) {
  using R = RowPacks<T>;
  constexpr int V = R::kVec;
  const auto [width, lane, row, active] = warp_row<kPacks>(rows, width_log2);
  const int64_t base = (active ? row : 0) * len;
  const R packs{misalignment(grad_x + base), len};
  const int count = packs.count();

  // Kept as loaded (16-bit data: half the registers), widened where used.
  Pack<T, V> g[kPacks], p[kPacks];
  load_full_packs<T, kPacks>(packs, grad_y + base, lane, width, active, same_layout, g);
  load_full_packs<T, kPacks>(packs, y + base, lane, width, active, same_layout, p);
  load_partial_packs<T, kPacks>(packs, grad_y + base, lane, width, active, same_layout, g);
  load_partial_packs<T, kPacks>(packs, y + base, lane, width, active, same_layout, p);
  float dot = 0.0f;
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
#pragma unroll
    for (int k = 0; k < V; ++k) dot = fmaf(Elem<T>::widen(g[i].v[k]), Elem<T>::widen(p[i].v[k]), dot);
  }
  dot = kPacks > 1 ? warp_reduce(dot, SumOp{}) : warp_reduce_width(dot, width, SumOp{});
  if (!active) return;
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    const int pack = i * width + lane;
    if (pack >= count) continue;
    float out[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      out[k] = scale * Elem<T>::widen(p[i].v[k]) * (Elem<T>::widen(g[i].v[k]) - dot);
    }
    packs.store(grad_x + base, pack, out, true);
  }
}

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

// ---------------------------------------------------------------------------------------------
// Launch choices
// ---------------------------------------------------------------------------------------------
inline int host_misalignment(const void* p, int64_t elem_size) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) % 16) / elem_size);
}

// Packs a row spans at most: its length, plus one when rows start off a 16-byte boundary.
template <typename T>
int64_t row_packs(const void* x, int64_t len) {
  constexpr int64_t v = pack_elems<T>();
  const bool every_row_aligned = len % v == 0 && host_misalignment(x, sizeof(T)) == 0;
  return (len + (every_row_aligned ? 0 : v - 1) + v - 1) / v;
}

// Whether every mask row can be read as packs of kVec elements of M where x's packs are: x's rows
// all aligned, the mask contiguous along the row, its base and every row stride aligned.
template <typename T, typename M>
bool mask_rows_aligned(const void* x, int64_t len, const void* mask, const MaskIndexer& index) {
  constexpr int64_t v = pack_elems<T>();
  if (len % v != 0 || host_misalignment(x, sizeof(T)) != 0 || index.inner_stride != 1) return false;
  const int64_t bytes = std::min<int64_t>(16, v * static_cast<int64_t>(sizeof(M)));
  if (reinterpret_cast<uintptr_t>(mask) % bytes != 0) return false;
  for (int d = 0; d < index.ndim; ++d) {
    if ((index.strides[d] * static_cast<int64_t>(sizeof(M))) % bytes != 0) return false;
  }
  return true;
}

inline int ceil_log2(int64_t n) {
  int k = 0;
  while ((int64_t{1} << k) < n) ++k;
  return k;
}

// Calls launch(std::integral_constant<int, K>) for the smallest built K >= packs_per_lane: 1, 2,
// 3, 4, 6, 7 (16-bit only: C3TR's L = 1600 float16 is 7 packs of 8 per lane), 8, then for
// float32 10, 13 (L = 1600: 400 packs) and 16. Each K is a kernel per type and mask kind on every
// architecture: the set is what the install's build time allows, a row at most a third longer
// than it is.
template <typename T, typename Launch>
void with_packs(int64_t packs_per_lane, Launch&& launch) {
  constexpr bool kWide = max_warp_packs<T>() > 8;  // float32: 4 per pack, up to 16 per lane
  if (packs_per_lane <= 4) {
    switch (packs_per_lane) {
      case 1: return launch(std::integral_constant<int, 1>{});
      case 2: return launch(std::integral_constant<int, 2>{});
      case 3: return launch(std::integral_constant<int, 3>{});
      default: return launch(std::integral_constant<int, 4>{});
    }
  }
  if (packs_per_lane <= 6) return launch(std::integral_constant<int, 6>{});
  if constexpr (!kWide) {
    if (packs_per_lane <= 7) return launch(std::integral_constant<int, 7>{});
  }
  if (packs_per_lane <= 8) return launch(std::integral_constant<int, 8>{});
  if constexpr (kWide) {
    if (packs_per_lane <= 10) return launch(std::integral_constant<int, 10>{});
    if (packs_per_lane <= 13) return launch(std::integral_constant<int, 13>{});
    launch(std::integral_constant<int, 16>{});
  }
}

// The warp kernels' shape for rows of `packs` packs: packs per lane and log2 of lanes per row.
struct WarpShape {
  int64_t packs_per_lane;
  int width_log2;
};

inline WarpShape warp_shape(int64_t packs) {
  if (packs <= kWarpSize) return {1, ceil_log2(std::max<int64_t>(packs, 1))};
  return {(packs + kWarpSize - 1) / kWarpSize, 5};
}

inline unsigned warp_grid(int64_t rows, int width_log2) {
  const int64_t rows_per_block = kWarpBlockThreads >> width_log2;
  return static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
}

inline unsigned block_grid(int64_t rows) { return static_cast<unsigned>(std::min(rows, kMaxRowBlocks)); }

// Dynamic shared memory a block kernel may use on the current device (opt-in limit, less the
// kernels' static scratch), looked up once per device.
inline int64_t shared_memory_limit() {
  static int cached[64] = {};  // 0: not looked up yet (a benign race: every writer writes the same)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    cudaGetLastError();
    return 0;
  }
  if (cached[device] == 0) {
    int bytes = 0;
    if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      cudaGetLastError();  // the uncached kernels need none
      bytes = 1024;
    }
    cached[device] = std::max(bytes - 1024, 1);
  }
  return cached[device] <= 1 ? 0 : cached[device];
}

// Opts `kernel` in to `bytes` of dynamic shared memory on the current device, once per kernel,
// device and size reached (the attribute call costs microseconds of host time).
inline cudaError_t allow_shared_memory(const void* kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  if (const cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  static std::mutex lock;
  static std::unordered_map<const void*, int64_t> granted[64];
  const std::lock_guard<std::mutex> hold(lock);
  int64_t& have = granted[device % 64][kernel];
  if (bytes <= have) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(bytes));
  if (err == cudaSuccess) have = bytes;
  return err;
}

template <typename T, MaskKind kKind>
cudaError_t softmax_forward(const T* x, T* y, int64_t rows, int64_t len, double scale, const void* mask,
                            const MaskIndexer& index, cudaStream_t stream) {
  using A = acc_t<T>;
  using M = typename MaskElem<kKind, T>::type;
  const bool y_aligned = host_misalignment(x, sizeof(T)) == host_misalignment(y, sizeof(T));
  const bool mask_vec = kKind != MaskKind::None && mask_rows_aligned<T, M>(x, len, mask, index);
  const int n = static_cast<int>(len);
  const int64_t packs = row_packs<T>(x, len);
  if constexpr (max_warp_packs<T>() > 0) {
    if (packs <= kWarpSize * max_warp_packs<T>()) {
      const WarpShape shape = warp_shape(packs);
      const float s = static_cast<float>(scale * kLog2e);
      with_packs<T>(shape.packs_per_lane, [&](auto k) {
        constexpr int kPacks = decltype(k)::value;
        softmax_forward_warp<T, kKind, kPacks><<<warp_grid(rows, shape.width_log2), kWarpBlockThreads, 0, stream>>>(
            x, y, rows, n, s, mask, index, shape.width_log2, y_aligned, mask_vec);
      });
      return cudaGetLastError();
    }
  }
  const A s = static_cast<A>(std::is_same_v<A, double> ? scale : scale * kLog2e);
  const int64_t cache_bytes = packs * cache_bytes_per_pack<T>();
  const bool cached = cache_bytes <= shared_memory_limit();
  const int64_t bytes = cached ? cache_bytes : 0;
  const auto kernel = softmax_forward_block<T, kKind>;
  if (const cudaError_t err = allow_shared_memory(reinterpret_cast<const void*>(kernel), bytes); err != cudaSuccess) {
    return err;
  }
  kernel<<<block_grid(rows), kRowBlockThreads, static_cast<size_t>(bytes), stream>>>(x, y, rows, n, s, mask, index,
                                                                                    y_aligned, mask_vec, cached);
  return cudaGetLastError();
}

template <typename T>
cudaError_t softmax_backward(const T* grad_y, const T* y, T* grad_x, int64_t rows, int64_t len, double scale,
                             cudaStream_t stream) {
  using A = acc_t<T>;
  const int out_offset = host_misalignment(grad_x, sizeof(T));
  const bool same_layout = host_misalignment(grad_y, sizeof(T)) == out_offset &&
                           host_misalignment(y, sizeof(T)) == out_offset;
  const int n = static_cast<int>(len);
  const int64_t packs = row_packs<T>(grad_x, len);
  if constexpr (max_warp_packs<T>() > 0) {
    if (packs <= kWarpSize * max_warp_packs<T>()) {
      const WarpShape shape = warp_shape(packs);
      with_packs<T>(shape.packs_per_lane, [&](auto k) {
        constexpr int kPacks = decltype(k)::value;
        softmax_backward_warp<T, kPacks><<<warp_grid(rows, shape.width_log2), kWarpBlockThreads, 0, stream>>>(
            grad_y, y, grad_x, rows, n, static_cast<float>(scale), shape.width_log2, same_layout);
      });
      return cudaGetLastError();
    }
  }
  const int64_t cache_bytes = 2 * packs * cache_bytes_per_pack<T>();
  const bool cached = cache_bytes <= shared_memory_limit();
  const int64_t bytes = cached ? cache_bytes : 0;
  const auto kernel = softmax_backward_block<T>;
  if (const cudaError_t err = allow_shared_memory(reinterpret_cast<const void*>(kernel), bytes); err != cudaSuccess) {
    return err;
  }
  kernel<<<block_grid(rows), kRowBlockThreads, static_cast<size_t>(bytes), stream>>>(grad_y, y, grad_x, rows, n,
                                                                                    static_cast<A>(scale), same_layout,
                                                                                    cached);
  return cudaGetLastError();
}

template <typename T>
cudaError_t softmax_forward_any_mask(const void* x, void* y, int64_t rows, int64_t len, double scale,
                                     MaskKind kind, const void* mask, const MaskIndexer& index, cudaStream_t stream) {
  const T* xs = static_cast<const T*>(x);
  T* ys = static_cast<T*>(y);
  switch (kind) {
    case MaskKind::None: return softmax_forward<T, MaskKind::None>(xs, ys, rows, len, scale, mask, index, stream);
    case MaskKind::Bool: return softmax_forward<T, MaskKind::Bool>(xs, ys, rows, len, scale, mask, index, stream);
    case MaskKind::Additive:
      return softmax_forward<T, MaskKind::Additive>(xs, ys, rows, len, scale, mask, index, stream);
    case MaskKind::AdditiveLikeX:
      if constexpr (sizeof(T) == 2) {
        return softmax_forward<T, MaskKind::AdditiveLikeX>(xs, ys, rows, len, scale, mask, index, stream);
      }
      return cudaErrorInvalidValue;  // the host side sends only 16-bit masks on 16-bit x here
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool softmax_rows_fit(int64_t rows, int64_t len) {
  // The warp kernels' grid (at least 4 rows per block, at most 2^31 - 1 blocks), and int
  // positions within a row (a pack past the row's end included).
  return rows >= 0 && rows / 4 < int64_t{0x7fffffff} && len < int64_t{0x7fffffff} - 64;
}

cudaError_t launch_softmax_forward(ElemType type, const void* x, void* y, int64_t rows, int64_t len, double scale,
                                   MaskKind mask_kind, const void* mask, const MaskIndexer& mask_index,
                                   cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  with_elem_type(type, [&](auto t) {
    err = softmax_forward_any_mask<decltype(t)>(x, y, rows, len, scale, mask_kind, mask, mask_index, stream);
  });
  return err;
}

cudaError_t launch_softmax_backward(ElemType type, const void* grad_y, const void* y, void* grad_x, int64_t rows,
                                    int64_t len, double scale, cudaStream_t stream) {
  cudaError_t err = cudaSuccess;
  with_elem_type(type, [&](auto t) {
    using T = decltype(t);
    err = softmax_backward<T>(static_cast<const T*>(grad_y), static_cast<const T*>(y), static_cast<T*>(grad_x), rows,
                              len, scale, stream);
  });
  return err;
}

}  // namespace nanops::cuda
