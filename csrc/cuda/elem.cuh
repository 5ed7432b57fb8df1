// The element types of the kernels, seen through CUDA's own headers only (no c10): loads,
// widening to the accumulation type, rounding back, and NaN/Inf tests on the exponent bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"

namespace nanops::cuda {

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using acc = float;
  using bits = uint32_t;
  static constexpr bits kExp = 0x7f800000u;
  static constexpr bits kMant = 0x007fffffu;
  static constexpr bits kSign = 0x80000000u;
  __device__ __forceinline__ static float widen(float v) { return v; }
  __device__ __forceinline__ static float narrow(float v) { return v; }
};

template <>
struct Elem<double> {
  using acc = double;
  using bits = uint64_t;
  static constexpr bits kExp = 0x7ff0000000000000ull;
  static constexpr bits kMant = 0x000fffffffffffffull;
  static constexpr bits kSign = 0x8000000000000000ull;
  __device__ __forceinline__ static double widen(double v) { return v; }
  __device__ __forceinline__ static double narrow(double v) { return v; }
};

template <>
struct Elem<__half> {
  using acc = float;
  using bits = uint16_t;
  static constexpr bits kExp = 0x7c00u;
  static constexpr bits kMant = 0x03ffu;
  static constexpr bits kSign = 0x8000u;
  __device__ __forceinline__ static float widen(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half narrow(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using acc = float;
  using bits = uint16_t;
  static constexpr bits kExp = 0x7f80u;
  static constexpr bits kMant = 0x007fu;
  static constexpr bits kSign = 0x8000u;
  __device__ __forceinline__ static float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 narrow(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
using acc_t = typename Elem<T>::acc;

template <typename T>
__device__ __forceinline__ typename Elem<T>::bits bits_of(T v) {
  typename Elem<T>::bits b;
  static_assert(sizeof(b) == sizeof(v), "bit width");
  __builtin_memcpy(&b, &v, sizeof(v));
  return b;
}

// NaN or +-Inf: every exponent bit set (one AND and one compare, no conversion).
template <typename T>
__device__ __forceinline__ bool is_nonfinite_bits(T v) {
  return (bits_of(v) & Elem<T>::kExp) == Elem<T>::kExp;
}

// `count` elements of T in one aligned load (16 bytes at most per instruction).
template <typename T, int kCount>
struct alignas(sizeof(T) * kCount <= 16 ? sizeof(T) * kCount : 16) Pack {
  T v[kCount];
};

template <typename T, int kCount>
__device__ __forceinline__ Pack<T, kCount> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, kCount>*>(p);
}

template <typename T, int kCount>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, kCount>& pack) {
  *reinterpret_cast<Pack<T, kCount>*>(p) = pack;
}

// 16-byte packs read or written with the streaming cache hint (ld.global.cs / st.global.cs:
// evict first), for data touched once, so that it does not push out what is read again (a
// broadcast mask, the next kernel's inputs).
template <typename T, int kCount>
__device__ __forceinline__ Pack<T, kCount> load_pack_streaming(const T* p) {
  static_assert(sizeof(Pack<T, kCount>) == 16, "streaming packs are 16 bytes");
  const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
  Pack<T, kCount> out;
  __builtin_memcpy(&out, &raw, 16);
  return out;
}

template <typename T, int kCount>
__device__ __forceinline__ void store_pack_streaming(T* p, const Pack<T, kCount>& pack) {
  static_assert(sizeof(Pack<T, kCount>) == 16, "streaming packs are 16 bytes");
  uint4 raw;
  __builtin_memcpy(&raw, &pack, 16);
  __stcs(reinterpret_cast<uint4*>(p), raw);
}

// A pack of kBytes (4, 8, 16 or 32) loaded only where `pred` holds, zeros elsewhere, with no
// branch: a predicated ld.global (streaming: .cs, evict first) in inline PTX. A run of these is
// issued back to back, every load in flight before the first value is used, where an if around
// each load would make the compiler wait for one before issuing the next. A predicated-off load
// touches no memory, so `p` may point anywhere then.
template <int kBytes, bool kStreaming>
__device__ __forceinline__ void load_bytes_if(bool pred, const void* p, uint32_t* out) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16 || kBytes == 32, "pack size");
  if constexpr (kBytes == 32) {
    load_bytes_if<16, kStreaming>(pred, p, out);
    load_bytes_if<16, kStreaming>(pred, static_cast<const char*>(p) + 16, out + 4);
  } else if constexpr (kBytes == 16) {
    out[0] = out[1] = out[2] = out[3] = 0u;
    if constexpr (kStreaming) {
      asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n @q ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
                   : "+r"(out[0]), "+r"(out[1]), "+r"(out[2]), "+r"(out[3]) : "l"(p), "r"(static_cast<int>(pred)));
    } else {
      asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n @q ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n}"
                   : "+r"(out[0]), "+r"(out[1]), "+r"(out[2]), "+r"(out[3]) : "l"(p), "r"(static_cast<int>(pred)));
    }
  } else if constexpr (kBytes == 8) {
    out[0] = out[1] = 0u;
    asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %3, 0;\n @q ld.global.v2.u32 {%0, %1}, [%2];\n}"
                 : "+r"(out[0]), "+r"(out[1]) : "l"(p), "r"(static_cast<int>(pred)));
  } else {
    out[0] = 0u;
    asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n @q ld.global.u32 %0, [%1];\n}"
                 : "+r"(out[0]) : "l"(p), "r"(static_cast<int>(pred)));
  }
}

template <typename T, int kCount, bool kStreaming = false>
__device__ __forceinline__ Pack<T, kCount> load_pack_if(bool pred, const T* p) {
  constexpr int kBytes = static_cast<int>(sizeof(Pack<T, kCount>));
  Pack<T, kCount> out;
  if constexpr (kBytes < 4) {  // a 2-byte bool mask pack of float64 x: rare, a plain select
    __builtin_memset(&out, 0, kBytes);
    if (pred) out = *reinterpret_cast<const Pack<T, kCount>*>(p);
  } else {
    uint32_t raw[kBytes / 4];
    load_bytes_if<kBytes, kStreaming>(pred, p, raw);
    __builtin_memcpy(&out, raw, kBytes);
  }
  return out;
}

// Calls fn(T{}) with the device type of `type` (__half and __nv_bfloat16 for the 16-bit ones).
template <typename Fn>
inline void with_elem_type(ElemType type, Fn&& fn) {
  switch (type) {
    case ElemType::Float: fn(float{}); break;
    case ElemType::Double: fn(double{}); break;
    case ElemType::Half: fn(__half{}); break;
    case ElemType::BFloat16: fn(__nv_bfloat16{}); break;
  }
}

}  // namespace nanops::cuda
