// Device-independent parts of the observer ops: argument checks whose
// messages name the op, the argument and the values.
#pragma once

#include <ATen/ATen.h>

namespace qlib {

// x: 2-D [rows, K] float32/float16/bfloat16 (each row is one block).
void check_observer_input(const char* op, const at::Tensor& x);
// (The checks that read no values take sym sizes: the ops' fakes run them on traced tensors.)
// An observer's observed / nonfinite counters: int64 one-element tensors on x's device.
void check_observer_counters(const char* op, const at::Tensor& x, const at::Tensor& observed,
                             const at::Tensor& nonfinite);
// minmax_observe: x as above; min_val / max_val contiguous float32 [rows] on x's device, the
// counters as above; averaging_constant in (0, 1] when given. Returns c for update_minmax (0: none).
float check_minmax_observe_args(const char* op, const at::Tensor& x, const at::Tensor& min_val,
                                const at::Tensor& max_val, const at::Tensor& observed,
                                const at::Tensor& nonfinite,
                                const std::optional<double>& averaging_constant);
// histogram_mse_search: quant_min < quant_max within 16 bits, num_candidates in [1, 1024].
void check_mse_args(const char* op, int64_t quant_min, int64_t quant_max, int64_t num_candidates);
// histogram_entropy_search: num_levels in [2, 65536] (at most 16 bits).
void check_entropy_args(const char* op, int64_t num_levels);
// What check_histogram reads of a histogram's values (on the host; on CUDA a
// sync, so only under qlib.set_cuda_value_checks(True)): nothing, the range
// rows (histogram_range_valid), or those and every count.
enum class HistogramValues { kNone, kRanges, kAll };

// hist: 2-D int64 [rows, bins] with bins >= 2; range: float64 [rows, 2]
// holding (min, max) of the data binned so far (+inf, -inf when empty).
void check_histogram(const char* op, const at::Tensor& hist, const at::Tensor& range,
                     HistogramValues values, const char* range_name = "range");
// histogram_observe: x as check_observer_input, (hist, range) as check_histogram, one block of
// hist per row of x, on x's device.
void check_histogram_observe_args(const char* op, const at::Tensor& x, const at::Tensor& hist,
                                  const at::Tensor& range, HistogramValues values);
// histogram_quantile: q in [0, 1].
void check_quantile(const char* op, double q);
// The counts h[0, bins) of block `row`: >= 0, and all 0 when its range is empty.
void check_histogram_row_counts(const char* op, const int64_t* h, int64_t bins, int64_t row,
                                bool empty, const char* range_name = "range");

}  // namespace qlib
