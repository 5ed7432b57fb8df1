// AVX-512 copy of the softmax row kernels; stable_softmax.cpp calls it when cpu_has_avx512().
#if defined(__x86_64__)
#include "cpu/isa_avx512_begin.h"
#define NANOPS_CPU_VARIANT avx512
#include "cpu/softmax_rows.h"
#endif
