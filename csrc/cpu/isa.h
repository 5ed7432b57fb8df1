// Run-time choice between the baseline, AVX2 and AVX-512 copies of a CPU kernel (ATen's
// CPU_CAPABILITY scheme in miniature): each *_avx2.cpp / *_avx512.cpp includes
// cpu/isa_avx2_begin.h / cpu/isa_avx512_begin.h first.
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

// AVX-512 F/BW/VL/DQ, as torch's own AVX512 kernels need; on such CPUs torch.softmax runs
// 512-bit code, so ours does too.
inline bool cpu_has_avx512() {
#if defined(__x86_64__)
  static const bool has = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

}  // namespace nanops::cpu

// Declares the same functions in every ISA namespace this build compiles (base; avx2 and avx512 on x86-64),
// inside namespace nanops::cpu.
// NANOPS_CPU_DISPATCH(fn, args...) calls the copy of nanops::cpu::<isa>::fn for the running CPU.
#if defined(__x86_64__)
#define NANOPS_DECLARE_PER_ISA(...) \
  namespace base {                  \
  __VA_ARGS__                       \
  }                                 \
  namespace avx2 {                  \
  __VA_ARGS__                       \
  }                                 \
  namespace avx512 {                \
  __VA_ARGS__                       \
  }
#define NANOPS_CPU_DISPATCH(fn, ...)                                          \
  (::nanops::cpu::cpu_has_avx512() ? ::nanops::cpu::avx512::fn(__VA_ARGS__) \
   : ::nanops::cpu::cpu_has_avx2() ? ::nanops::cpu::avx2::fn(__VA_ARGS__)   \
                                   : ::nanops::cpu::base::fn(__VA_ARGS__))
#else
#define NANOPS_DECLARE_PER_ISA(...) \
  namespace base {                  \
  __VA_ARGS__                       \
  }
#define NANOPS_CPU_DISPATCH(fn, ...) ::nanops::cpu::base::fn(__VA_ARGS__)
#endif
