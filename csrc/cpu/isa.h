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

// Declares the same functions in every ISA namespace this build compiles (base, and avx2 on x86-64),
// inside namespace nanops::cpu.
// NANOPS_CPU_DISPATCH(fn, args...) calls the copy of nanops::cpu::<isa>::fn for the running CPU.
#if defined(__x86_64__)
#define NANOPS_DECLARE_PER_ISA(...) \
  namespace base {                  \
  __VA_ARGS__                       \
  }                                 \
  namespace avx2 {                  \
  __VA_ARGS__                       \
  }
#define NANOPS_CPU_DISPATCH(fn, ...)                                                          \
  (::nanops::cpu::cpu_has_avx2() ? ::nanops::cpu::avx2::fn(__VA_ARGS__) \
                                 : ::nanops::cpu::base::fn(__VA_ARGS__))
#else
#define NANOPS_DECLARE_PER_ISA(...) \
  namespace base {                  \
  __VA_ARGS__                       \
  }
#define NANOPS_CPU_DISPATCH(fn, ...) ::nanops::cpu::base::fn(__VA_ARGS__)
#endif
