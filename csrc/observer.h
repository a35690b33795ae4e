// Device-independent parts of the observer ops: argument checks whose
// messages name the op, the argument and the values.
#pragma once

#include <ATen/ATen.h>

namespace qlib {

// x: 2-D [rows, K] float32/float16/bfloat16 (each row is one block).
void check_observer_input(const char* op, const at::Tensor& x);
// hist: 2-D int64 [rows, bins] with bins >= 2; range: float64 [rows, 2]
// holding (min, max) of the data binned so far (+inf, -inf when empty).
void check_histogram(const char* op, const at::Tensor& hist, const at::Tensor& range,
                     const char* range_name = "range");

}  // namespace qlib
