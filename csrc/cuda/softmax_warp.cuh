#pragma once
// stable_softmax's warp kernels: rows whose 16-byte packs fit 32 lanes x kPacks, held in registers.
// Included by stable_softmax.cu alone (an anonymous namespace: one copy per launch TU).
#include "cuda/block_reduce.cuh"
#include "cuda/elem.cuh"
#include "cuda/softmax_row.cuh"
#include "softmax_mask.h"

namespace nanops::cuda {
namespace {

constexpr int kWarpBlockThreads = 128;

// The most packs per lane the warp kernels are built for; longer rows take the block kernels.
template <typename T>
constexpr int max_warp_packs() {
  return std::is_same_v<T, double> ? 0 : pack_elems<T>() == 4 ? 16 : 8;
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

}  // namespace
}  // namespace nanops::cuda
