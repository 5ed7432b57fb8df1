// Included right after cpu/isa_prelude.h by the AVX2 copy of a CPU kernel: the target pragma
// makes every function of the file AVX2/FMA/F16C code, and ATen's vec headers then compile their
// AVX2 implementation (Sleef exp, F16C conversions). Callers use that copy only when
// cpu_has_avx2() (cpu/isa.h) says the CPU runs it. x86-64 only.
#if !defined(__x86_64__)
#error "isa_avx2_begin.h is for x86-64 builds only"
#endif
#pragma GCC target("avx2,fma,f16c")
// The pragma enables the instructions but not the feature macros that sleef.h and ATen test;
// define them to match it (this file only, as -mavx2 -mfma -mf16c would).
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
