// Tells nanops._C (csrc/ops.cpp) how to ask whether the CUDA kernels run on a device.
#include "build_info.h"
#include "cuda/launch.h"

namespace nanops {
namespace {

const bool registered = [] {
  cuda_probe() = &cuda::kernels_run_on;
  return true;
}();

}  // namespace
}  // namespace nanops
