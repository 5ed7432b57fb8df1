// AVX-512 copy of the grad-norm chunk partials; grad_norm.cpp calls it when cpu_has_avx512().
#if defined(__x86_64__)
#include "cpu/isa_avx512_begin.h"
#define NANOPS_CPU_VARIANT avx512
#include "cpu/grad_norm_chunks.h"
#endif
