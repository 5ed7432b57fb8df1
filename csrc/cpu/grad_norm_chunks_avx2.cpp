// AVX2/FMA copy of the grad-norm chunk partials; grad_norm.cpp calls it when cpu_has_avx2().
#if defined(__x86_64__)
#include "cpu/isa_avx2_begin.h"
#define NANOPS_CPU_VARIANT avx2
#include "cpu/grad_norm_chunks.h"
#endif
