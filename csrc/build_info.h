// What the compiled library tells Python about itself (functions of the nanops._C module).
#pragma once

namespace nanops {

// Whether this build's CUDA kernels can run on device `index`: 1 (a cubin of its architecture,
// or PTX the driver compiles for it), 0 (no image for it: a build for other GPUs), -1 (no such
// device, or CUDA unusable). Set by the CUDA host side; stays nullptr in a CPU-only build.
using CudaProbe = int (*)(int index);
CudaProbe& cuda_probe();

}  // namespace nanops
