// CUDA launches of nanops::stable_softmax and its backward: which kernel family, how many packs
// per lane, the grid. Row math: softmax_row.cuh; the kernels: softmax_warp.cuh and
// softmax_block.cuh; checks and outputs: stable_softmax_host.cpp.
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
#include "cuda/softmax_block.cuh"
#include "cuda/softmax_row.cuh"
#include "cuda/softmax_warp.cuh"
#include "softmax_mask.h"

namespace nanops::cuda {
namespace {

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
