// The instruction-set variants of the CPU grad-norm chunk partials (see grad_norm_chunks.h).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/isa.h"
#include "cpu/multi_tensor.h"
#include "norm_math.h"
#include "tensor_list.h"

namespace nanops::cpu {

// norm_partials: one NormPartial row (kSummaryFields doubles) per chunk of |x * s| into `partials`.
// scale_chunks: every chunk multiplied in place by coef.
NANOPS_DECLARE_PER_ISA(
    void norm_partials(const std::vector<FlatView>& views, const std::vector<Chunk>& chunks, NormKind kind,
                       double p, double s, double* partials);
    void scale_chunks(const std::vector<FlatView>& views, const std::vector<Chunk>& chunks, double coef);)

}  // namespace nanops::cpu
