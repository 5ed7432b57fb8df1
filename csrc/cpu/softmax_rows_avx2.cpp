// AVX2/FMA copy of the softmax row kernels. The target pragma precedes every include so that
// ATen's vec headers compile their AVX2 implementation (Sleef exp, F16C conversions) here;
// stable_softmax.cpp calls this copy only when the CPU has AVX2 and FMA.
#if defined(__x86_64__)
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
#define NANOPS_CPU_VARIANT avx2
#include "cpu/softmax_rows.h"
#endif
