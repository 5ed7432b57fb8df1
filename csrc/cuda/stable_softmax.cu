// CUDA kernels of nanops::stable_softmax and its backward. Host side: stable_softmax_host.cpp.
//
// Rows up to 2048 long (float32 and 16-bit): a group of lanes per row, the row held in registers
// (PersistentSoftmax's shape): every x and mask element of the group's rows is loaded, 16 bytes
// at a time where aligned, before any is used; exp once per element; the sum's reciprocal
// multiplied in. Rows of at most 128 get two rows per group (and groups narrower than a warp for
// rows under 32), so short rows still keep every lane busy. Longer rows: a block per row, the
// scaled and masked logits cached in shared memory (DRAM read once, exp once), or, for rows
// beyond shared memory, an online max/sum pass and a write pass.
//
// The mask kind, its element type and whether it is read as vectors are template parameters:
// the inner loops hold no run-time switch. A row's mask offset is computed once per row
// (MaskIndexer: multiply-high divisions, no int64 div/mod).
#include <algorithm>
#include <type_traits>

#include "cuda/block_reduce.cuh"
#include "cuda/elem.cuh"
#include "cuda/launch.h"
#include "softmax_mask.h"

namespace nanops::cuda {
namespace {

constexpr int kWarpBlockThreads = 128;
constexpr int kRowBlockThreads = 512;
constexpr int64_t kMaxRowBlocks = 1 << 20;

template <typename A>
__device__ __forceinline__ A infinity() {
  return static_cast<A>(INFINITY);
}

// exp(d) for d = z - max <= 0: one MUFU.EX2 in float32 (log2(e) folded into the argument, a
// product of a small number, so no precision is lost to large logits).
__device__ __forceinline__ float exp_shifted(float d) { return exp2f(d * 1.4426950408889634f); }
__device__ __forceinline__ double exp_shifted(double d) { return exp(d); }

// What one mask element is stored as.
template <MaskKind kKind, typename T>
struct MaskElem {
  using type = bool;  // None: never read
};
template <typename T>
struct MaskElem<MaskKind::Additive, T> {
  using type = acc_t<T>;
};
template <typename T>
struct MaskElem<MaskKind::AdditiveLikeX, T> {
  using type = T;
};

template <typename A, typename M>
__device__ __forceinline__ A widen_mask(M m) {
  if constexpr (std::is_same_v<M, A> || std::is_same_v<M, bool>) {
    return static_cast<A>(m);
  } else {
    return Elem<M>::widen(m);
  }
}

// scale * x, then the mask: -inf where a bool mask is False; an additive entry added, a -inf one
// masking the position even where the logit is +inf or NaN (as False in a bool mask).
template <MaskKind kKind, typename A, typename M>
__device__ __forceinline__ A masked_logit(A x, A scale, M m) {
  const A z = scale * x;
  if constexpr (kKind == MaskKind::None) {
    return z;
  } else if constexpr (kKind == MaskKind::Bool) {
    return m ? z : -infinity<A>();
  } else {
    const A add = widen_mask<A>(m);
    return add == -infinity<A>() ? add : z + add;
  }
}

// A row's statistics: NaN anywhere, how many +inf, and the max.
template <typename A>
struct RowStats {
  int nan;
  int pos_inf;
  A max;

  __device__ __forceinline__ void add(A z) {
    nan |= isnan(z);
    pos_inf += z == infinity<A>();
    max = z > max ? z : max;
  }
  // Rows needing the special rules: NaN, +inf logits, or nothing taking part.
  __device__ __forceinline__ bool special() const { return nan || pos_inf > 0 || max == -infinity<A>(); }

  // The special rules, for one logit.
  __device__ __forceinline__ A special_prob(A z) const {
    if (nan) return static_cast<A>(NAN);
    if (pos_inf > 0) return z == infinity<A>() ? A(1) / static_cast<A>(pos_inf) : A(0);
    return A(0);  // nothing takes part
  }
};

template <typename T>
constexpr int max_vec() {
  return 16 / static_cast<int>(sizeof(T));
}

// ---------------------------------------------------------------------------------------------
// Warp kernels: rows of at most 2^kLog2 elements.
// ---------------------------------------------------------------------------------------------
template <int kLog2>
struct WarpShape {
  static constexpr int kElems = 1 << kLog2;
  static constexpr int kWidth = kElems < kWarpSize ? kElems : kWarpSize;  // lanes per row
  static constexpr int kIters = kElems / kWidth;                          // elements per lane
  static constexpr int kRows = kElems <= 128 ? 2 : 1;                     // rows per group
  static constexpr int kGroups = kWarpBlockThreads / kWidth;              // groups per block
  static constexpr int kRowsPerBlock = kGroups * kRows;
};

template <typename T, MaskKind kKind, int kLog2, bool kVectorized, bool kMaskVec>
__global__ void __launch_bounds__(kWarpBlockThreads)
    softmax_forward_warp(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int len, acc_t<T> scale,
                         const void* __restrict__ mask, const MaskIndexer index) {
  using A = acc_t<T>;
  using M = typename MaskElem<kKind, T>::type;
  using S = WarpShape<kLog2>;
  constexpr int kVec = kVectorized ? (max_vec<T>() < S::kIters ? max_vec<T>() : S::kIters) : 1;
  constexpr int kPacks = S::kIters / kVec;
  constexpr int kMaskVecN = kMaskVec ? kVec : 1;
  const int group = threadIdx.x / S::kWidth;
  const int lane = threadIdx.x % S::kWidth;
  const int64_t first_row = (static_cast<int64_t>(blockIdx.x) * S::kGroups + group) * S::kRows;

  // The group's rows: every x pack and mask element is loaded and turned into a logit in
  // straight-line code (no run-time switch, no dependence between elements), so the loads of a
  // row are all issued before the first logit is formed.
  A z[S::kRows][S::kIters];
  RowStats<A> stats[S::kRows];
#pragma unroll
  for (int r = 0; r < S::kRows; ++r) {
    const int64_t row = first_row + r;
    const bool row_ok = row < rows;
    const M* mrow = nullptr;
    if constexpr (kKind != MaskKind::None) {
      mrow = static_cast<const M*>(mask) + (row_ok ? index.row_offset(row) : 0);
    }
    stats[r] = RowStats<A>{0, 0, -infinity<A>()};
#pragma unroll
    for (int v = 0; v < kPacks; ++v) {
      const int j = (v * S::kWidth + lane) * kVec;
      const bool ok = row_ok && j < len;
      const Pack<T, kVec> xp = ok ? load_pack<T, kVec>(x + row * len + j) : Pack<T, kVec>{};
      M m[kVec] = {};
      if constexpr (kKind != MaskKind::None) {
        if constexpr (kMaskVec) {
          const Pack<M, kMaskVecN> mp = ok ? load_pack<M, kMaskVecN>(mrow + j) : Pack<M, kMaskVecN>{};
#pragma unroll
          for (int k = 0; k < kVec; ++k) m[k] = mp.v[k];
        } else {
#pragma unroll
          for (int k = 0; k < kVec; ++k) m[k] = ok ? mrow[(j + k) * index.inner_stride] : M{};
        }
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        A& zi = z[r][v * kVec + k];
        zi = ok ? masked_logit<kKind>(Elem<T>::widen(xp.v[k]), scale, m[k]) : -infinity<A>();
        stats[r].add(zi);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < S::kRows; ++r) {
    stats[r].nan = warp_reduce<S::kWidth>(stats[r].nan, MaxOp{});
    stats[r].pos_inf = warp_reduce<S::kWidth>(stats[r].pos_inf, SumOp{});
    stats[r].max = warp_reduce<S::kWidth>(stats[r].max, MaxOp{});
  }

#pragma unroll
  for (int r = 0; r < S::kRows; ++r) {
    const int64_t row = first_row + r;
    // Groups of one warp may differ in specialness: the shuffle below runs in every lane.
    const bool ordinary = !stats[r].special();
    A sum = 0;
#pragma unroll
    for (int i = 0; i < S::kIters; ++i) {
      if (ordinary) z[r][i] = exp_shifted(z[r][i] - stats[r].max);  // padding: exp(-inf) = 0
      sum += ordinary ? z[r][i] : A(0);
    }
    const A inv_sum = A(1) / warp_reduce<S::kWidth>(sum, SumOp{});
    if (row >= rows) continue;
#pragma unroll
    for (int v = 0; v < kPacks; ++v) {
      const int j = (v * S::kWidth + lane) * kVec;
      if (j >= len) continue;
      Pack<T, kVec> out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const A zi = z[r][v * kVec + k];
        out.v[k] = Elem<T>::narrow(ordinary ? zi * inv_sum : stats[r].special_prob(zi));
      }
      store_pack<T, kVec>(y + row * len + j, out);
    }
  }
}

template <typename T, int kLog2, bool kVectorized>
__global__ void __launch_bounds__(kWarpBlockThreads)
    softmax_backward_warp(const T* __restrict__ grad_y, const T* __restrict__ y, T* __restrict__ grad_x,
                          int64_t rows, int len, acc_t<T> scale) {
  using A = acc_t<T>;
  using S = WarpShape<kLog2>;
  constexpr int kVec = kVectorized ? (max_vec<T>() < S::kIters ? max_vec<T>() : S::kIters) : 1;
  constexpr int kPacks = S::kIters / kVec;
  const int group = threadIdx.x / S::kWidth;
  const int lane = threadIdx.x % S::kWidth;
  const int64_t first_row = (static_cast<int64_t>(blockIdx.x) * S::kGroups + group) * S::kRows;

  Pack<T, kVec> gs[S::kRows][kPacks], ys[S::kRows][kPacks];
#pragma unroll
  for (int r = 0; r < S::kRows; ++r) {
    const int64_t row = first_row + r;
#pragma unroll
    for (int v = 0; v < kPacks; ++v) {
      const int j = (v * S::kWidth + lane) * kVec;
      const bool ok = row < rows && j < len;
      gs[r][v] = ok ? load_pack<T, kVec>(grad_y + row * len + j) : Pack<T, kVec>{};
      ys[r][v] = ok ? load_pack<T, kVec>(y + row * len + j) : Pack<T, kVec>{};
    }
  }
  A dot[S::kRows];
#pragma unroll
  for (int r = 0; r < S::kRows; ++r) {
    dot[r] = 0;
#pragma unroll
    for (int v = 0; v < kPacks; ++v) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) dot[r] += Elem<T>::widen(gs[r][v].v[k]) * Elem<T>::widen(ys[r][v].v[k]);
    }
    dot[r] = warp_reduce<S::kWidth>(dot[r], SumOp{});
  }
#pragma unroll
  for (int r = 0; r < S::kRows; ++r) {
    const int64_t row = first_row + r;
    if (row >= rows) continue;
#pragma unroll
    for (int v = 0; v < kPacks; ++v) {
      const int j = (v * S::kWidth + lane) * kVec;
      if (j >= len) continue;
      Pack<T, kVec> out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const A p = Elem<T>::widen(ys[r][v].v[k]);
        out.v[k] = Elem<T>::narrow(scale * p * (Elem<T>::widen(gs[r][v].v[k]) - dot[r]));
      }
      store_pack<T, kVec>(grad_x + row * len + j, out);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Block kernels: one block per row (grid-stride over rows past 2^20 of them).
// ---------------------------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ RowStats<A> block_stats(RowStats<A> s, A* scratch, int* int_scratch) {
  RowStats<A> out;
  out.nan = __syncthreads_or(s.nan);
  out.pos_inf = block_reduce(s.pos_inf, SumOp{}, 0, int_scratch);
  out.max = block_reduce(s.max, MaxOp{}, -infinity<A>(), scratch);
  return out;
}

// kCached: the row's logits live in shared memory (len * sizeof(A) bytes of dynamic shared
// memory); x is read once and exp taken once per element. Without it: an online max/sum pass
// over x and a write pass that reads x again (L2 mostly).
template <typename T, MaskKind kKind, bool kVectorized, bool kCached>
__global__ void __launch_bounds__(kRowBlockThreads)
    softmax_forward_block(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t len, acc_t<T> scale,
                          const void* __restrict__ mask, const MaskIndexer index) {
  using A = acc_t<T>;
  using M = typename MaskElem<kKind, T>::type;
  constexpr int kVec = kVectorized ? max_vec<T>() : 1;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  A* cache = reinterpret_cast<A*>(shared_raw);
  __shared__ A scratch[kWarpSize];
  __shared__ int int_scratch[kWarpSize];
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * len;
    T* yr = y + row * len;
    const M* mrow = nullptr;
    if constexpr (kKind != MaskKind::None) mrow = static_cast<const M*>(mask) + index.row_offset(row);
    auto logits = [&](int64_t j, A (&z)[kVec]) {
      const Pack<T, kVec> p = load_pack<T, kVec>(xr + j);
      M m[kVec] = {};
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if constexpr (kKind != MaskKind::None) m[k] = mrow[(j + k) * index.inner_stride];
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k) z[k] = masked_logit<kKind>(Elem<T>::widen(p.v[k]), scale, m[k]);
    };

    RowStats<A> mine{0, 0, -infinity<A>()};
    A sum = 0;  // online: relative to `mine.max`, over finite logits (uncached path only)
    for (int64_t j = threadIdx.x * kVec; j < len; j += step) {
      A z[kVec];
      logits(j, z);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        if constexpr (kCached) {
          cache[j + k] = z[k];
          mine.add(z[k]);
        } else {
          if (isnan(z[k])) {
            mine.nan = 1;
          } else if (z[k] == infinity<A>()) {
            ++mine.pos_inf;
          } else if (z[k] > mine.max) {
            sum = sum * exp_shifted(mine.max - z[k]) + A(1);
            mine.max = z[k];
          } else if (z[k] != -infinity<A>()) {
            sum += exp_shifted(z[k] - mine.max);
          }
        }
      }
    }
    const RowStats<A> stats = block_stats(mine, scratch, int_scratch);
    A inv_sum = A(0);
    if (!stats.special()) {
      A part = 0;
      if constexpr (kCached) {
        for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
          const A e = exp_shifted(cache[j] - stats.max);
          cache[j] = e;
          part += e;
        }
      } else {
        part = mine.max == -infinity<A>() ? A(0) : sum * exp_shifted(mine.max - stats.max);
      }
      inv_sum = A(1) / block_reduce(part, SumOp{}, A(0), scratch);  // its barriers publish the cache too
    } else if constexpr (kCached) {
      __syncthreads();
    }
    for (int64_t j = threadIdx.x * kVec; j < len; j += step) {
      A z[kVec];
      if constexpr (kCached) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) z[k] = cache[j + k];
      } else {
        logits(j, z);
      }
      Pack<T, kVec> out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        A prob;
        if (stats.special()) {
          prob = stats.special_prob(z[k]);
        } else if constexpr (kCached) {
          prob = z[k] * inv_sum;
        } else {
          prob = exp_shifted(z[k] - stats.max) * inv_sum;
        }
        out.v[k] = Elem<T>::narrow(prob);
      }
      store_pack<T, kVec>(yr + j, out);
    }
    if constexpr (kCached) __syncthreads();  // the next row overwrites the cache
  }
}

// kCached: grad_y and y rows live in shared memory (2 * len * sizeof(T) bytes), read once.
template <typename T, bool kVectorized, bool kCached>
__global__ void __launch_bounds__(kRowBlockThreads)
    softmax_backward_block(const T* __restrict__ grad_y, const T* __restrict__ y, T* __restrict__ grad_x,
                           int64_t rows, int64_t len, acc_t<T> scale) {
  using A = acc_t<T>;
  constexpr int kVec = kVectorized ? max_vec<T>() : 1;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* g_cache = reinterpret_cast<T*>(shared_raw);
  T* y_cache = g_cache + (kCached ? len : 0);
  __shared__ A scratch[kWarpSize];
  const int64_t step = static_cast<int64_t>(blockDim.x) * kVec;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * len;
    A dot = 0;
    for (int64_t j = threadIdx.x * kVec; j < len; j += step) {
      const Pack<T, kVec> g = load_pack<T, kVec>(grad_y + base + j);
      const Pack<T, kVec> p = load_pack<T, kVec>(y + base + j);
      if constexpr (kCached) {
        store_pack<T, kVec>(g_cache + j, g);
        store_pack<T, kVec>(y_cache + j, p);
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k) dot += Elem<T>::widen(g.v[k]) * Elem<T>::widen(p.v[k]);
    }
    dot = block_reduce(dot, SumOp{}, A(0), scratch);  // its barriers publish the cache too
    for (int64_t j = threadIdx.x * kVec; j < len; j += step) {
      const Pack<T, kVec> g = load_pack<T, kVec>((kCached ? g_cache : grad_y + base) + j);
      const Pack<T, kVec> p = load_pack<T, kVec>((kCached ? y_cache : y + base) + j);
      Pack<T, kVec> out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        out.v[k] = Elem<T>::narrow(scale * Elem<T>::widen(p.v[k]) * (Elem<T>::widen(g.v[k]) - dot));
      }
      store_pack<T, kVec>(grad_x + base + j, out);
    }
    if constexpr (kCached) __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Launch choices
// ---------------------------------------------------------------------------------------------
int ceil_log2(int64_t n) {
  int k = 0;
  while ((int64_t{1} << k) < n) ++k;
  return k;
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// float64 softmax (gradcheck, references) takes the block kernels at every length: it halves
// the warp kernels nvcc must build, and no training runs attention in float64.
template <typename T>
int64_t warp_max_len() {
  return std::is_same_v<T, double> ? 0 : 2048;
}

// Vector width of the warp kernels for rows of `len`: min(16 bytes, elements per lane).
template <typename T>
int warp_vec(int64_t len) {
  const int log2 = ceil_log2(len);
  const int iters = log2 <= 5 ? 1 : 1 << (log2 - 5);
  return std::min(max_vec<T>(), iters);
}

// Whether every row of x (and y) starts on a `vec`-element boundary.
template <typename T>
bool rows_aligned(int64_t len, int vec, std::initializer_list<const void*> pointers) {
  if (vec <= 1 || len % vec != 0) return false;
  for (const void* p : pointers) {
    if (!aligned(p, vec * static_cast<int64_t>(sizeof(T)))) return false;
  }
  return true;
}

// Whether the mask's rows can be read as packs of `vec` elements of M: contiguous along the row,
// and every row start aligned (base and every row stride).
template <typename M>
bool mask_rows_aligned(const void* mask, const MaskIndexer& index, int vec) {
  if (vec <= 1 || index.inner_stride != 1) return false;
  const int64_t bytes = std::min<int64_t>(16, vec * static_cast<int64_t>(sizeof(M)));
  if (!aligned(mask, bytes)) return false;
  for (int d = 0; d < index.ndim; ++d) {
    if ((index.strides[d] * static_cast<int64_t>(sizeof(M))) % bytes != 0) return false;
  }
  return true;
}

// Calls launch(std::integral_constant<int, K>) for K = ceil(log2(len)), len <= 2048.
template <typename Launch>
void with_log2(int64_t len, Launch&& launch) {
  switch (ceil_log2(len)) {
    case 0: launch(std::integral_constant<int, 0>{}); break;
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 3: launch(std::integral_constant<int, 3>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    case 5: launch(std::integral_constant<int, 5>{}); break;
    case 6: launch(std::integral_constant<int, 6>{}); break;
    case 7: launch(std::integral_constant<int, 7>{}); break;
    case 8: launch(std::integral_constant<int, 8>{}); break;
    case 9: launch(std::integral_constant<int, 9>{}); break;
    case 10: launch(std::integral_constant<int, 10>{}); break;
    default: launch(std::integral_constant<int, 11>{}); break;
  }
}

template <int kLog2>
unsigned warp_grid(int64_t rows) {
  constexpr int64_t per_block = WarpShape<kLog2>::kRowsPerBlock;
  return static_cast<unsigned>((rows + per_block - 1) / per_block);
}

unsigned block_grid(int64_t rows) { return static_cast<unsigned>(std::min(rows, kMaxRowBlocks)); }

// Dynamic shared memory a block kernel may use on the current device (opt-in limit), or 0.
int64_t shared_memory_limit() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();  // clear: the uncached kernels need none
    return 0;
  }
  return bytes - 1024;  // room for the kernels' static scratch
}

template <typename Kernel>
cudaError_t allow_shared_memory(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, MaskKind kKind>
cudaError_t softmax_forward(const T* x, T* y, int64_t rows, int64_t len, double scale, const void* mask,
                            const MaskIndexer& index, cudaStream_t stream) {
  using A = acc_t<T>;
  using M = typename MaskElem<kKind, T>::type;
  const A s = static_cast<A>(scale);
  if (len <= warp_max_len<T>()) {
    const int vec = warp_vec<T>(len);
    const bool vectorized = rows_aligned<T>(len, vec, {x, y});
    const bool mask_vec = kKind != MaskKind::None && vectorized && mask_rows_aligned<M>(mask, index, vec);
    with_log2(len, [&](auto log2) {
      if constexpr (std::is_same_v<T, double>) {
        (void)log2;  // float64 never takes the warp kernels (warp_max_len)
      } else {
        constexpr int kLog2 = decltype(log2)::value;
        const unsigned grid = warp_grid<kLog2>(rows);
        const int n = static_cast<int>(len);
        if constexpr (WarpShape<kLog2>::kIters >= 2) {
          if (vectorized && mask_vec) {
            softmax_forward_warp<T, kKind, kLog2, true, kKind != MaskKind::None>
                <<<grid, kWarpBlockThreads, 0, stream>>>(x, y, rows, n, s, mask, index);
            return;
          }
          if (vectorized) {
            softmax_forward_warp<T, kKind, kLog2, true, false>
                <<<grid, kWarpBlockThreads, 0, stream>>>(x, y, rows, n, s, mask, index);
            return;
          }
        }
        softmax_forward_warp<T, kKind, kLog2, false, false>
            <<<grid, kWarpBlockThreads, 0, stream>>>(x, y, rows, n, s, mask, index);
      }
    });
    return cudaGetLastError();
  }
  const bool vectorized = rows_aligned<T>(len, max_vec<T>(), {x, y});
  const int64_t cache_bytes = len * static_cast<int64_t>(sizeof(A));
  const bool cached = cache_bytes <= shared_memory_limit();
  auto launch = [&](auto kernel, int64_t bytes) {
    if (const cudaError_t err = allow_shared_memory(kernel, bytes); err != cudaSuccess) return err;
    kernel<<<block_grid(rows), kRowBlockThreads, static_cast<size_t>(bytes), stream>>>(x, y, rows, len, s, mask,
                                                                                      index);
    return cudaGetLastError();
  };
  if (cached) {
    return vectorized ? launch(softmax_forward_block<T, kKind, true, true>, cache_bytes)
                      : launch(softmax_forward_block<T, kKind, false, true>, cache_bytes);
  }
  return vectorized ? launch(softmax_forward_block<T, kKind, true, false>, 0)
                    : launch(softmax_forward_block<T, kKind, false, false>, 0);
}

template <typename T>
cudaError_t softmax_backward(const T* grad_y, const T* y, T* grad_x, int64_t rows, int64_t len, double scale,
                             cudaStream_t stream) {
  using A = acc_t<T>;
  const A s = static_cast<A>(scale);
  if (len <= warp_max_len<T>()) {
    const bool vectorized = rows_aligned<T>(len, warp_vec<T>(len), {grad_y, y, grad_x});
    with_log2(len, [&](auto log2) {
      if constexpr (std::is_same_v<T, double>) {
        (void)log2;
      } else {
        constexpr int kLog2 = decltype(log2)::value;
        const unsigned grid = warp_grid<kLog2>(rows);
        const int n = static_cast<int>(len);
        if constexpr (WarpShape<kLog2>::kIters >= 2) {
          if (vectorized) {
            softmax_backward_warp<T, kLog2, true><<<grid, kWarpBlockThreads, 0, stream>>>(grad_y, y, grad_x, rows, n, s);
            return;
          }
        }
        softmax_backward_warp<T, kLog2, false><<<grid, kWarpBlockThreads, 0, stream>>>(grad_y, y, grad_x, rows, n, s);
      }
    });
    return cudaGetLastError();
  }
  const bool vectorized = rows_aligned<T>(len, max_vec<T>(), {grad_y, y, grad_x});
  const int64_t cache_bytes = 2 * len * static_cast<int64_t>(sizeof(T));
  const bool cached = cache_bytes <= shared_memory_limit();
  auto launch = [&](auto kernel, int64_t bytes) {
    if (const cudaError_t err = allow_shared_memory(kernel, bytes); err != cudaSuccess) return err;
    kernel<<<block_grid(rows), kRowBlockThreads, static_cast<size_t>(bytes), stream>>>(grad_y, y, grad_x, rows, len,
                                                                                      s);
    return cudaGetLastError();
  };
  if (cached) {
    return vectorized ? launch(softmax_backward_block<T, true, true>, cache_bytes)
                      : launch(softmax_backward_block<T, false, true>, cache_bytes);
  }
  return vectorized ? launch(softmax_backward_block<T, true, false>, 0)
                    : launch(softmax_backward_block<T, false, false>, 0);
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

bool softmax_rows_fit(int64_t rows) {
  // The warp kernels' grid: at least 4 rows per block, at most 2^31 - 1 blocks.
  return rows >= 0 && rows / 4 < int64_t{0x7fffffff};
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
