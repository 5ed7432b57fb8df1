// Included first by the AVX-512 copy of a CPU kernel, as isa_avx2_begin.h is by the AVX2 copy
// (cpu/isa_prelude.h, then the target pragma): ATen's vec headers then compile their 512-bit
// implementation, the one torch's own kernels use on such CPUs. Callers use that copy only when
// cpu_has_avx512() (cpu/isa.h) says the CPU runs it. x86-64 only.
#if !defined(__x86_64__)
#error "isa_avx512_begin.h is for x86-64 builds only"
#endif
#include "cpu/isa_prelude.h"  // before the pragma: see there
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "cpu/isa_avx2_feature_macros.h"
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
// GCC's 512-bit intrinsics (abs, max through _mm512_undefined_*: `__Y = __Y`) trip its own
// -Wuninitialized / -Wmaybe-uninitialized once inlined through ATen's Vectorized (whether they do
// depends on which headers came before the target pragma); the undefined lanes are overwritten by
// the masked operation: a false positive in the compiler's header, silenced for these
// translation units only.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
