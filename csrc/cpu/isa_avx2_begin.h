// Included first by the AVX2 copy of a CPU kernel. After cpu/isa_prelude.h, the target pragma
// makes every function of the file AVX2/FMA/F16C code, and ATen's vec headers then compile their
// AVX2 implementation (Sleef exp, F16C conversions). Callers use that copy only when
// cpu_has_avx2() (cpu/isa.h) says the CPU runs it. x86-64 only.
#if !defined(__x86_64__)
#error "isa_avx2_begin.h is for x86-64 builds only"
#endif
#include "cpu/isa_prelude.h"  // before the pragma: see there
#pragma GCC target("avx2,fma,f16c")
#include "cpu/isa_avx2_feature_macros.h"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
