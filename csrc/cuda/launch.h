// The seam between the host side of the CUDA ops (csrc/cuda/*_host.cpp: argument checks,
// allocation, op registration, compiled by the C++ compiler with torch's headers) and the
// kernels (csrc/cuda/*.cu, compiled by nvcc). No torch or c10 header is included by any .cu
// file: nvcc parses a translation unit once per GPU architecture plus once for the host, and
// torch's headers made up most of the build time (a .cu with torch/library.h: ~40 s per
// architecture; without: ~5 s). The kernels see CUDA's own headers, this file, norm_math.h and
// softmax_mask.h.
//
// Every launcher enqueues on `stream` and returns the launch's cudaError_t for the host side
// to check; none synchronises.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "norm_math.h"
#include "softmax_mask.h"

namespace nanops::cuda {

// The element types the kernels read (c10::ScalarType stays on the host side).
enum class ElemType : uint8_t { Float, Half, BFloat16, Double };

// One tensor of a list as a dense run of memory (see FlatView in tensor_list.h).
struct DeviceView {
  void* data;
  int64_t numel;
  int64_t index;  // position in the caller's list
  ElemType type;
};

// A one-element float32 or float64 device tensor read by a kernel; data == nullptr reads 1.
struct ScalarArg {
  const void* data;
  bool is_double;
};

// Where a "some value is NaN/Inf" flag goes: a float32 set to 1 (GradScaler's found_inf) and/or a
// bool set to false (all_finite). The caller initialises them; kernels only ever write the flag.
struct FlagOut {
  float* as_float;
  bool* as_bool;
};

// Number of chunks multi-tensor launches cut `views` into (one partial row per chunk), and the
// number of launches they take.
int64_t total_chunks(const std::vector<DeviceView>& views);
int64_t launch_count(const std::vector<DeviceView>& views);

// counts: (list size, 3) uint64 device buffer, zeroed by the caller; += NaN, +Inf, -Inf per tensor.
cudaError_t launch_nonfinite_counts(const std::vector<DeviceView>& views, unsigned long long* counts,
                                    cudaStream_t stream);

// Sets `out` where any element of `views` is NaN or +-Inf.
cudaError_t launch_nonfinite_flag(const std::vector<DeviceView>& views, FlagOut out, cudaStream_t stream);

// What the last block of the grad-norm launch writes once every chunk is folded in: the
// (kSummaryFields,) summary, or the clip results (total norm in `norm_type`, whose largest
// finite value is norm_max; the float64 coefficient the grads are multiplied by; its float32
// reciprocal, which torch's fused optimizers take as grad_scale; found_inf set to 1 when the
// norm is non-finite).
struct NormOutputs {
  double* summary = nullptr;
  void* total_norm = nullptr;
  ElemType norm_type = ElemType::Float;
  double norm_max = 0.0;
  double max_norm = 0.0;
  double* coef = nullptr;
  float* divisor = nullptr;
  float* found_inf_f = nullptr;
  double* found_inf_d = nullptr;
};

// Doubles of device scratch launch_grad_norm needs for `views`: a partial row per chunk and a
// completion counter. The caller allocates it; the launcher zeroes the counter.
int64_t grad_norm_scratch_doubles(const std::vector<DeviceView>& views);

// The p-norm of every element of `views` (times inv_scale), overflow-free, in one launch per
// 1152 tensors: each block writes its chunk's partial and the last block to finish combines
// them and writes `out`.
cudaError_t launch_grad_norm(const std::vector<DeviceView>& views, NormKind kind, double p, ScalarArg inv_scale,
                             double* scratch, const NormOutputs& out, cudaStream_t stream);

// rows: (n, kSummaryFields) contiguous float64 (one per device or rank); writes `out`'s clip
// results (out.summary unused). One single-thread launch: n is a handful.
cudaError_t launch_clip_coef(const double* rows, int64_t n, NormKind kind, double p, ScalarArg inv_scale,
                             const NormOutputs& out, cudaStream_t stream);

// In place: every element *= *coef (float64 on the device, formed in float32 for 16-bit and
// float32 elements); nothing is written when it is 1.
cudaError_t launch_scale_tensors(const std::vector<DeviceView>& views, const double* coef, cudaStream_t stream);

// Whether this build has a kernel image for CUDA device `device`: 1 yes, 0 no (built for other
// GPUs), -1 no such device. Launches nothing.
int kernels_run_on(int device);

// Whether launch_softmax_* can take `rows` rows of `len` elements in one launch.
bool softmax_rows_fit(int64_t rows, int64_t len);

// y = softmax(scale * x + mask) over rows of `len` contiguous elements of `type`.
cudaError_t launch_softmax_forward(ElemType type, const void* x, void* y, int64_t rows, int64_t len, double scale,
                                   MaskKind mask_kind, const void* mask, const MaskIndexer& mask_index,
                                   cudaStream_t stream);

// grad_x = scale * y * (grad_y - sum(grad_y * y)) per row.
cudaError_t launch_softmax_backward(ElemType type, const void* grad_y, const void* y, void* grad_x, int64_t rows,
                                    int64_t len, double scale, cudaStream_t stream);

}  // namespace nanops::cuda
