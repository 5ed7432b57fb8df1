// AVX2/FMA copy of the softmax row kernels; stable_softmax.cpp calls it when cpu_has_avx2().
#if defined(__x86_64__)
#include "cpu/isa_avx2_begin.h"
#define NANOPS_CPU_VARIANT avx2
#include "cpu/softmax_rows.h"
#endif
