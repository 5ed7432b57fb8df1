// Marks functions shared by host code and CUDA kernels.
#pragma once

#ifdef __CUDACC__
#define NANOPS_HOST_DEVICE __host__ __device__
#else
#define NANOPS_HOST_DEVICE
#endif
