// Run-time choice between the baseline and AVX2 copies of a CPU kernel (ATen's CPU_CAPABILITY
// scheme in miniature): each *_avx2.cpp includes cpu/isa_avx2_begin.h first.
#pragma once

namespace nanops::cpu {

// AVX2 + FMA (+ F16C, present on every AVX2 x86 CPU).
inline bool cpu_has_avx2() {
#if defined(__x86_64__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace nanops::cpu
