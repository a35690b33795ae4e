#include "observer.h"

namespace qlib {

void check_observer_input(const char* op, const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [blocks, elements per block], got shape ",
              x.sizes());
}

void check_histogram(const char* op, const at::Tensor& hist, const at::Tensor& range,
                     const char* range_name) {
  TORCH_CHECK(hist.scalar_type() == at::kLong, op, ": hist must be int64, got ",
              hist.scalar_type());
  TORCH_CHECK(hist.dim() == 2 && hist.size(1) >= 2, op,
              ": hist must be 2-D [blocks, bins] with at least 2 bins, got shape ", hist.sizes());
  TORCH_CHECK(range.scalar_type() == at::kDouble, op, ": ", range_name,
              " must be float64, got ", range.scalar_type());
  TORCH_CHECK(range.dim() == 2 && range.size(0) == hist.size(0) && range.size(1) == 2, op, ": ",
              range_name, " must have shape [", hist.size(0), ", 2] (blocks of hist, then min ",
              "and max), got ", range.sizes());
  TORCH_CHECK(hist.device() == range.device(), op, ": hist (", hist.device(), ") and ",
              range_name, " (", range.device(), ") must be on the same device");
}

}  // namespace qlib
