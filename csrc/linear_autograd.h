// Shared by the Linear ops' C++ autograd (int8_autograd.cpp, fourbit_autograd.cpp).
#pragma once

#include <ATen/ATen.h>

#include <numeric>
#include <vector>

namespace qlib {

// The gradient of a bias of dtype `bias_dtype`: grad [..., N] summed over every leading dim
// (no size() calls: a traced batch stays symbolic).
inline at::Tensor linear_bias_grad(const at::Tensor& grad, at::ScalarType bias_dtype) {
  std::vector<int64_t> rows(grad.dim() - 1);
  std::iota(rows.begin(), rows.end(), 0);
  return grad.sum(rows).to(bias_dtype);
}

}  // namespace qlib
