// The instruction-set variants of the CPU softmax row kernels (see softmax_rows.h).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "cpu/isa.h"
#include "softmax_problem.h"

namespace nanops::cpu {

NANOPS_DECLARE_PER_ISA(
    void softmax_forward_rows(const SoftmaxProblem& p, double scale, at::Tensor& out);
    void softmax_backward_rows(const SoftmaxProblem& p, const at::Tensor& y_last, double scale, at::Tensor& grad_x);)

}  // namespace nanops::cpu
