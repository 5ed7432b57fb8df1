// The seam between the host side of the CUDA ops (csrc/cuda/*_host.cpp: argument checks,
// allocation, op registration, compiled by the C++ compiler with torch's headers) and the
// kernels (csrc/cuda/*.cu, compiled by nvcc). Nothing here includes a torch header: nvcc parses
// a translation unit once per GPU architecture plus once for the host, and torch's headers made
// up most of the build time (a .cu with torch/library.h: ~40 s per architecture; without: ~5 s).
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

// Number of chunks multi_tensor_apply cuts `views` into (one partial row per chunk).
int64_t total_chunks(const std::vector<DeviceView>& views);

// counts: (list size, 3) uint64 device buffer, zeroed by the caller; += NaN, +Inf, -Inf per tensor.
cudaError_t launch_nonfinite_counts(const std::vector<DeviceView>& views, unsigned long long* counts,
                                    cudaStream_t stream);

// partials: (max(total_chunks, 1), kSummaryFields) float64 scratch; summary: (kSummaryFields,).
cudaError_t launch_grad_norm_summary(const std::vector<DeviceView>& views, NormKind kind, double p,
                                     ScalarArg inv_scale, double* partials, double* summary, cudaStream_t stream);

// rows: (n, kSummaryFields) contiguous float64. total_norm: one element of `norm_type`, whose
// largest finite value is norm_max; found_inf_f / found_inf_d: optional flags set to 1.
cudaError_t launch_clip_coef(const double* rows, int64_t n, NormKind kind, double p, double max_norm,
                             ScalarArg inv_scale, float* found_inf_f, double* found_inf_d, ElemType norm_type,
                             double norm_max, void* total_norm, double* coef, cudaStream_t stream);

// In place: every element *= *coef (float64 on the device); nothing is written when it is 1.
cudaError_t launch_scale_tensors(const std::vector<DeviceView>& views, const double* coef, cudaStream_t stream);

// Rows that launch_softmax_* can take: (rows + 3) / 4 warp blocks must fit a 32-bit grid.
bool softmax_rows_fit(int64_t rows);

// y = softmax(scale * x + mask) over rows of `len` contiguous elements of `type`.
cudaError_t launch_softmax_forward(ElemType type, const void* x, void* y, int64_t rows, int64_t len, double scale,
                                   MaskKind mask_kind, const void* mask, const MaskIndexer& mask_index,
                                   cudaStream_t stream);

// grad_x = scale * y * (grad_y - sum(grad_y * y)) per row.
cudaError_t launch_softmax_backward(ElemType type, const void* grad_y, const void* y, void* grad_x, int64_t rows,
                                    int64_t len, double scale, cudaStream_t stream);

}  // namespace nanops::cuda
