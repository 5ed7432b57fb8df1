// Baseline-ISA copy of the grad-norm chunk partials (runs on any CPU).
#define NANOPS_CPU_VARIANT base
#include "cpu/grad_norm_chunks.h"
