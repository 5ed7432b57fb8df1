// Whether this build has a kernel image for a device: asked of a kernel compiled like every other
// (same architectures, same PTX), without launching anything.
#include <cuda_runtime.h>

#include "cuda/launch.h"

namespace nanops::cuda {
namespace {

__global__ void image_probe() {}

}  // namespace

int kernels_run_on(int device) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    cudaGetLastError();
    return -1;
  }
  int current = 0;
  if (cudaGetDevice(&current) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  cudaSetDevice(device);
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, image_probe);
  cudaGetLastError();  // clear: "no kernel image" is an answer here, not a failure
  cudaSetDevice(current);
  return err == cudaSuccess ? 1 : 0;
}

}  // namespace nanops::cuda
