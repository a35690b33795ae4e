#include "observer.h"

#include <utility>

#include "affine.h"
#include "quant_math.h"

namespace qlib {

void check_mse_args(const char* op, int64_t quant_min, int64_t quant_max,
                    int64_t num_candidates) {
  check_quant_range(op, quant_min, quant_max);
  TORCH_CHECK(num_candidates >= 1 && num_candidates <= 1024, op,
              ": num_candidates must lie in [1, 1024], got ", num_candidates);
}

void check_entropy_args(const char* op, int64_t num_levels) {
  TORCH_CHECK(num_levels >= 2 && num_levels <= 65536, op,
              ": num_levels must lie in [2, 65536] (at most 16 bits), got ", num_levels);
}

void check_observer_input(const char* op, const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [blocks, elements per block], got shape ",
              x.sizes());
}

void check_observer_counters(const char* op, const at::Tensor& x, const at::Tensor& observed,
                             const at::Tensor& nonfinite) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"observed", observed},
                                {"nonfinite", nonfinite}}) {
    TORCH_SYM_CHECK(t.sym_numel().sym_eq(1).sym_and(t.scalar_type() == at::kLong), op, ": ",
                    name, " must be a one-element int64 tensor, got ", t.scalar_type(),
                    " of shape ", t.sym_sizes());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
                x.device());
  }
}

float check_minmax_observe_args(const char* op, const at::Tensor& x, const at::Tensor& min_val,
                                const at::Tensor& max_val, const at::Tensor& observed,
                                const at::Tensor& nonfinite,
                                const std::optional<double>& averaging_constant) {
  check_observer_input(op, x);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"min_val", min_val},
                                {"max_val", max_val}}) {
    const bool ok = t.scalar_type() == at::kFloat && t.dim() == 1 && t.is_contiguous();
    TORCH_SYM_CHECK(t.sym_numel().sym_eq(x.sym_size(0)).sym_and(ok), op, ": ", name,
                    " must be a contiguous float32 [", x.sym_size(0), "] tensor (one value per "
                    "block of x), got ", t.scalar_type(), " of shape ", t.sym_sizes());
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
                x.device());
  }
  check_observer_counters(op, x, observed, nonfinite);
  if (!averaging_constant.has_value()) return 0.0f;
  const double c = *averaging_constant;
  TORCH_CHECK(c > 0.0 && c <= 1.0, op, ": averaging_constant must lie in (0, 1], got ", c);
  return static_cast<float>(c);
}

void check_histogram_row_counts(const char* op, const int64_t* h, int64_t bins, int64_t row,
                                bool empty, const char* range_name) {
  for (int64_t j = 0; j < bins; ++j) {
    TORCH_CHECK(h[j] >= 0, op, ": hist of block ", row, " has count ", h[j], " in bin ", j,
                "; counts must be >= 0");
    TORCH_CHECK(!(empty && h[j] != 0), op, ": hist of block ", row, " has count ", h[j],
                " in bin ", j, " but its ", range_name, " is empty [inf, -inf]");
  }
}

void check_histogram(const char* op, const at::Tensor& hist, const at::Tensor& range,
                     HistogramValues values, const char* range_name) {
  TORCH_CHECK(hist.scalar_type() == at::kLong, op, ": hist must be int64, got ",
              hist.scalar_type());
  // (The ranks first: sym_and does not short-circuit, and a 0-D tensor has no size(-1).)
  const auto hist_message = [&] {
    return c10::str(op, ": hist must be 2-D [blocks, bins] with at least 2 bins, got shape ",
                    hist.sym_sizes());
  };
  TORCH_CHECK(hist.dim() == 2, hist_message());
  TORCH_SYM_CHECK(hist.sym_size(1).sym_ge(2), hist_message());
  TORCH_CHECK(range.scalar_type() == at::kDouble, op, ": ", range_name,
              " must be float64, got ", range.scalar_type());
  const auto range_message = [&] {
    return c10::str(op, ": ", range_name, " must have shape [", hist.sym_size(0), ", 2] (blocks ",
                    "of hist, then min and max), got ", range.sym_sizes());
  };
  TORCH_CHECK(range.dim() == 2, range_message());
  TORCH_SYM_CHECK(range.sym_size(0).sym_eq(hist.sym_size(0)).sym_and(range.sym_size(1).sym_eq(2)),
                  range_message());
  TORCH_CHECK(hist.device() == range.device(), op, ": hist (", hist.device(), ") and ",
              range_name, " (", range.device(), ") must be on the same device");
  if (values == HistogramValues::kNone) return;
  const at::Tensor h = hist.cpu().contiguous(), rg = range.cpu().contiguous();
  const int64_t R = h.size(0), B = h.size(1);
  const double* rp = rg.const_data_ptr<double>();
  for (int64_t r = 0; r < R; ++r) {
    const double lo = rp[2 * r], hi = rp[2 * r + 1];
    TORCH_CHECK(histogram_range_valid(lo, hi), op, ": ", range_name, " of block ", r, " is [", lo,
                ", ", hi, "]; expected finite min <= max within float32's range, or [inf, -inf] "
                "for a block with no data (a corrupt state_dict?)");
    if (values == HistogramValues::kAll) {
      check_histogram_row_counts(op, h.const_data_ptr<int64_t>() + r * B, B, r, !(lo <= hi),
                                 range_name);
    }
  }
}

void check_histogram_observe_args(const char* op, const at::Tensor& x, const at::Tensor& hist,
                                  const at::Tensor& range, HistogramValues values) {
  check_observer_input(op, x);
  check_histogram(op, hist, range, values);
  TORCH_SYM_CHECK(hist.sym_size(0).sym_eq(x.sym_size(0)), op, ": hist has ", hist.sym_size(0),
                  " blocks but x of shape ", x.sym_sizes(), " has ", x.sym_size(0));
  TORCH_CHECK(x.device() == hist.device(), op, ": x (", x.device(), ") and hist (",
              hist.device(), ") must be on the same device");
}

void check_quantile(const char* op, double q) {
  TORCH_CHECK(q >= 0.0 && q <= 1.0, op, ": q must lie in [0, 1], got ", q);
}

}  // namespace qlib
