// Included by isa_avx2_begin.h / isa_avx512_begin.h before their target pragma: every standard
// and c10 header those kernels reach, so that they are compiled without the target pragma. Under the
// pragma, GCC 13's libstdc++ fails to build (its always_inline std::allocator destructor gets the
// pragma's target while the implicit destructors calling it do not: "inlining failed ... target
// specific option mismatch"); only ATen's vec headers, which must see the ISA, come after it.
// Keeping shared inline code (c10's math, our own headers) out of the pragma also keeps one
// plain copy of it: inline functions compiled for AVX-512 here and for the baseline elsewhere
// share a symbol, and the linker may keep either.
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/Math.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/copysign.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bitset>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <stdlib.h>  // mm_malloc.h, reached from the vec headers, includes it
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/grad_norm_variants.h"
#include "cpu/isa.h"
#include "cpu/multi_tensor.h"
#include "cpu/softmax_rows_variants.h"
#include "host_device.h"
#include "norm_math.h"
#include "softmax_mask.h"
#include "softmax_problem.h"
#include "tensor_list.h"
