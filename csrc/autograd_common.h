// Shared by the ops' C++ autograd kernels (affine_autograd.cpp, int8_autograd.cpp,
// fourbit_autograd.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>

#include <initializer_list>
#include <numeric>
#include <utility>
#include <vector>

namespace qlib {

// Forward-mode AD (forward_ad dual tensors, torch.func.jvp) has no rule in these kernels: a
// tangent would be dropped silently, so it raises, as torch's own ops without one do.
inline void check_no_forward_grad(const char* op, std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(!t.defined() || !t._fw_grad(/*level=*/0).defined(), op,
                ": forward-mode AD (forward_ad dual tensors, torch.func.jvp) is not supported");
  }
}

// Whether a C++ autograd Function can run here: not under torch.func transforms (grad, vjp,
// jacrev; vmap of a call that records a gradient), which take none.
inline bool cpp_functions_supported() {
  const auto& functorch = at::functorch::functorchTLSAccessor();
  if (!functorch) return true;
  try {
    functorch->checkSupportsCppAutogradFunction();
    return true;
  } catch (const c10::Error&) {
    return false;
  }
}

// For torch.func transforms (which take no C++ Function), composites add to an op's output
// zeros whose gradients are the op's: t - t.detach() is one for a finite t, with t's gradient.
inline at::Tensor zero_with_grad_of(const at::Tensor& t) { return t - t.detach(); }

// Such a zero of t's shape from t's finite entries (a non-finite entry's gradient is 0).
inline at::Tensor finite_zero_with_grad_of(const at::Tensor& t) {
  return zero_with_grad_of(at::where(at::isfinite(t), t, at::zeros({}, t.options())));
}

// A frozen-weight Linear's output y (int8, 4-bit) with the gradients of its C++ Function as such
// zeros, for torch.func transforms: grad @ w_hat for x (w_hat in x's dtype, [N, K]) and grad
// summed over rows for bias.
inline at::Tensor frozen_linear_composite(const at::Tensor& y, const at::Tensor& x,
                                          const at::Tensor& w_hat,
                                          const std::optional<at::Tensor>& bias) {
  at::Tensor out = y;
  if (x.requires_grad()) out = out + at::matmul(finite_zero_with_grad_of(x), w_hat.t());
  if (bias.has_value() && bias->requires_grad()) {
    out = out + finite_zero_with_grad_of(*bias).to(y.scalar_type());
  }
  return out;
}

// A tensor to save for backward: an inference tensor (made under inference_mode: no version
// counter, so autograd refuses to save it) is saved as a copy of its values now. So inference-mode
// qparams (or codes) train with an x (or scale) that needs a gradient, as torch's fake quant ops
// (which save only a mask) allow; a plain tensor is saved as is, version-checked.
inline at::Tensor saveable(const at::Tensor& t) {
  return t.defined() && t.is_inference() ? t.clone() : t;
}

// The gradient of a bias of dtype `bias_dtype`: grad [..., N] summed over every leading dim
// (no size() calls: a traced batch stays symbolic). A 1-D x gives grad [N] itself.
inline at::Tensor linear_bias_grad(const at::Tensor& grad, at::ScalarType bias_dtype) {
  if (grad.dim() == 1) return grad.to(bias_dtype);  // (sum over no dims would sum them all)
  std::vector<int64_t> rows(grad.dim() - 1);
  std::iota(rows.begin(), rows.end(), 0);
  return grad.sum(rows).to(bias_dtype);
}

}  // namespace qlib
