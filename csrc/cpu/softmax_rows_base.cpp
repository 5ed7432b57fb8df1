// Baseline-ISA copy of the softmax row kernels (runs on any CPU).
#define NANOPS_CPU_VARIANT base
#include "cpu/softmax_rows.h"
