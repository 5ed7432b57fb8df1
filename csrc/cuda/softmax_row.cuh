// The row math of nanops' stable softmax, shared by its warp and block kernels (and by any
// kernel that needs the same rules): logits in the log2 domain, a NaN-propagating max that
// alone tells ordinary rows from special ones, exp as one FFMA + EX2, the special rules, and a
// row read and written as 16-byte packs whatever its alignment.
//
// The rules (csrc/ops.cpp): y = softmax(scale * x + mask). A row whose max is
//   NaN   -> NaN everywhere (broken inputs stay visible);
//   +inf  -> each +inf logit gets 1/count, every other 0;
//   -inf  -> nothing takes part: zeros;
//   finite -> the ordinary softmax, accumulated in float32 (float64 for float64).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/block_reduce.cuh"
#include "cuda/elem.cuh"
#include "softmax_mask.h"

namespace nanops::cuda {

constexpr float kLog2e = 1.4426950408889634f;

template <typename A>
__device__ __forceinline__ A infinity() {
  return static_cast<A>(INFINITY);
}

// max that returns NaN when either side is NaN (PTX max.NaN on sm_80+, compares before).
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || a > b) ? a : b;  // b NaN: a > b is false, so b
#endif
}
__device__ __forceinline__ double max_nan(double a, double b) { return (a != a || a > b) ? a : b; }

struct MaxNanOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return max_nan(a, b); }
};

// 2^d in one MUFU.EX2 (denormal results flush to 0: far below float32's rounding of a sum >= 1).
__device__ __forceinline__ float exp2_fast(float d) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(d));
  return r;
}
__device__ __forceinline__ double exp2_fast(double d) { return exp2(d); }

// The log2 factor a logit is multiplied by: log2(e) in float32; float64 stays in base e
// (exp, not exp2), so its factor is 1.
template <typename A>
__device__ __forceinline__ A log2_factor() {
  return std::is_same_v<A, double> ? A(1) : static_cast<A>(kLog2e);
}
template <typename A>
__device__ __forceinline__ A exp_domain(A d) {
  if constexpr (std::is_same_v<A, double>) {
    return exp(d);
  } else {
    return exp2_fast(d);
  }
}

// Reduces over groups of `width` lanes (a power of two, at most 32, known only at run time);
// every lane of the warp takes part.
template <typename A, typename Op>
__device__ __forceinline__ A warp_reduce_width(A value, int width, Op op) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) {
    value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  return value;
}

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

// The logit in the exp domain: (scale * x + mask) * log2(e) as one FFMA, -inf where a bool mask
// is False or an additive entry is -inf (which masks even a +inf or NaN logit).
template <MaskKind kKind, typename A, typename M>
__device__ __forceinline__ A logit(A x, A scale_log2, M m) {
  if constexpr (kKind == MaskKind::None) {
    return x * scale_log2;
  } else if constexpr (kKind == MaskKind::Bool) {
    return m ? x * scale_log2 : -infinity<A>();
  } else {
    const A add = widen_mask<A>(m);
    return add == -infinity<A>() ? add : fma(x, scale_log2, add * log2_factor<A>());
  }
}

// The probability of logit z (exp domain) in a special row (max_z NaN or +-inf); pos_inf is
// the row's count of +inf logits (read only when max_z is +inf).
template <typename A>
__device__ __forceinline__ A special_prob(A z, A max_z, int pos_inf) {
  if (max_z != max_z) return static_cast<A>(NAN);
  if (max_z == infinity<A>()) return z == infinity<A>() ? A(1) / static_cast<A>(pos_inf) : A(0);
  return A(0);
}

template <typename A>
__device__ __forceinline__ bool ordinary_max(A max_z) {
  return max_z == max_z && max_z != infinity<A>() && max_z != -infinity<A>();
}

template <typename T>
constexpr int pack_elems() {
  return 16 / static_cast<int>(sizeof(T));
}

// Elements between `p` and the 16-byte boundary at or below it.
template <typename T>
__device__ __forceinline__ int misalignment(const T* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) % 16) / sizeof(T));
}

// A row of `len` elements seen as 16-byte packs: pack i covers row positions
// [i * kVec - offset, (i + 1) * kVec - offset), so every full pack is one aligned vector access
// whatever the row's alignment (rows of odd length included). Partial packs, at a row's ends,
// touch only the row's own elements, one at a time: nothing outside the row is read or written.
template <typename T>
struct RowPacks {
  static constexpr int kVec = pack_elems<T>();
  int offset;  // 0 .. kVec - 1
  int len;

  __device__ __forceinline__ int count() const { return (offset + len + kVec - 1) / kVec; }
  __device__ __forceinline__ int start(int pack) const { return pack * kVec - offset; }
  __device__ __forceinline__ bool full(int pack) const {
    const int s = start(pack);
    return s >= 0 && s + kVec <= len;
  }

  // Pack `pack` of row `data` (positions outside the row get `fill`); streaming (read once).
  // `aligned`: data's row has this layout's offset (else every element is read on its own).
  template <typename V>
  __device__ __forceinline__ void load(const T* data, int pack, V (&out)[kVec], V fill, bool aligned = true) const {
    const Pack<T, kVec> p = load_raw(data, pack, aligned);
    const int s = start(pack);
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = (j_in_row(s + k)) ? static_cast<V>(Elem<T>::widen(p.v[k])) : fill;
  }

  // The same pack as stored (no widening: half the registers of 16-bit data); positions
  // outside the row hold zero bits.
  __device__ __forceinline__ Pack<T, kVec> load_raw(const T* data, int pack, bool aligned = true) const {
    const int s = start(pack);
    if (aligned && full(pack)) return load_pack_streaming<T, kVec>(data + s);
    Pack<T, kVec> p;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (j_in_row(s + k)) {
        p.v[k] = data[s + k];
      } else {
        __builtin_memset(&p.v[k], 0, sizeof(T));
      }
    }
    return p;
  }

  __device__ __forceinline__ bool j_in_row(int j) const { return j >= 0 && j < len; }

  // Writes pack `pack` of row `data`; `aligned`: data's row has this layout's offset (else
  // every element is stored on its own). Streaming: nothing reads y back soon.
  template <typename A>
  __device__ __forceinline__ void store(T* data, int pack, const A (&v)[kVec], bool aligned) const {
    const int s = start(pack);
    if (aligned && full(pack)) {
      Pack<T, kVec> p;
#pragma unroll
      for (int k = 0; k < kVec; ++k) p.v[k] = Elem<T>::narrow(v[k]);
      store_pack_streaming<T, kVec>(data + s, p);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const int j = s + k;
        if (j >= 0 && j < len) data[j] = Elem<T>::narrow(v[k]);
      }
    }
  }
};

// Loads of a lane's packs of one row, pack i being `first + i * step`, in two phases: the full
// packs, each one predicated load of kVec elements (issued back to back, none used yet, so kPacks
// loads are in flight at once), then the partial packs at the row's ends and rows that cannot be
// read as vectors, element by element along `stride`. A kernel issues the full phase of everything
// it reads (x and the mask) before any partial phase. The pack layout is x's (T); E is what is read
// with it: x itself (streaming: read once), or the mask (default caching: a broadcast mask is read
// again by every head, from L2). `here`: the lane has a row; `vec`: the data's row is contiguous
// and aligned like x's packs.
template <typename T, int kPacks, bool kStreaming = true, typename E>
__device__ __forceinline__ void load_full_packs(const RowPacks<T>& packs, const E* data, int first, int step,
                                                bool here, bool vec, Pack<E, RowPacks<T>::kVec> (&out)[kPacks]) {
  constexpr int V = RowPacks<T>::kVec;
  const int count = packs.count();
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    const int pack = first + i * step;
    out[i] = load_pack_if<E, V, kStreaming>(here && pack < count && vec && packs.full(pack), data + packs.start(pack));
  }
}

template <typename T, int kPacks, typename E>
__device__ __forceinline__ void load_partial_packs(const RowPacks<T>& packs, const E* data, int first, int step,
                                                   bool here, bool vec, Pack<E, RowPacks<T>::kVec> (&out)[kPacks],
                                                   int64_t stride = 1) {
  constexpr int V = RowPacks<T>::kVec;
  const int count = packs.count();
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    const int pack = first + i * step;
    if (here && pack < count && !(vec && packs.full(pack))) {
      const int s = packs.start(pack);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if (packs.j_in_row(s + k)) out[i].v[k] = data[(s + k) * stride];
      }
    }
  }
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

}  // namespace nanops::cuda
