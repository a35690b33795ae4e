// Shared by the ops' C++ autograd kernels (affine_autograd.cpp, int8_autograd.cpp,
// fourbit_autograd.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/FuncTorchTLS.h>

#include <initializer_list>
#include <numeric>
#include <optional>
#include <utility>
#include <vector>

namespace qlib {

// Whether any of the tensors carries a forward-mode tangent (forward_ad dual tensors,
// torch.func.jvp). The C++ Functions have no forward rule: the composites below carry tangents.
inline bool has_tangent(std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.defined() && t._fw_grad(/*level=*/0).defined()) return true;
  }
  return false;
}

// Whether t takes part in differentiation: it requires grad (grad mode on) or carries a tangent.
inline bool differentiated(const at::Tensor& t) {
  return t.defined() &&
         ((at::GradMode::is_enabled() && t.requires_grad()) || t._fw_grad(/*level=*/0).defined());
}

// A tangent on an argument that gets no gradient (a frozen weight's scales) would be dropped
// silently: it raises, as a reverse-mode gradient asked of it does.
inline void check_no_forward_grad(const char* op, std::initializer_list<at::Tensor> tensors) {
  TORCH_CHECK(!has_tangent(tensors), op,
              ": forward-mode AD (forward_ad dual tensors, torch.func.jvp) gives no derivative "
              "for this argument (it gets no gradient either)");
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

// For torch.func transforms (which take no C++ Function) and forward-mode AD (which the
// Functions have no rule for), composites add to the op's output, computed below autograd at
// this level, zeros whose derivatives at this level are the op's. make() less make() computed
// below this level is one (for a finite value): its derivatives here are make()'s, and at the
// levels below (torch.func nesting, autograd around a transform) none, since the op's value,
// computed below, brings those (the op's own at each level). make() must be pure.
template <class Make>
at::Tensor zero_with_grad_of(Make make) {
  at::Tensor below;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    below = make();
  }
  return make() - below;
}

// Such a zero of t's shape from t's finite entries (a non-finite entry's derivative is 0).
inline at::Tensor finite_zero_with_grad_of(const at::Tensor& t) {
  return zero_with_grad_of(
      [&t] { return at::where(at::isfinite(t), t, at::zeros({}, t.options())); });
}

// A frozen-weight Linear's output y (int8, 4-bit) with its C++ Function's gradients as such
// zeros: grad @ w_hat for x (w_hat in x's dtype, [N, K]) and grad summed over rows for bias (and
// the tangents x's @ w_hat^T and the bias's). Where w_hat overflows x's dtype (float16), x's
// gradient takes the dtype's largest value in place of inf.
inline at::Tensor frozen_linear_composite(const at::Tensor& y, const at::Tensor& x,
                                          const at::Tensor& w_hat,
                                          const std::optional<at::Tensor>& bias) {
  at::Tensor out = y;
  if (differentiated(x)) {
    // (An entry of w_hat past x's range (float16) as its largest value: 0 * inf is NaN.)
    out = out + at::matmul(finite_zero_with_grad_of(x), at::nan_to_num(w_hat).t());
  }
  if (bias.has_value() && differentiated(*bias)) {
    out = out + finite_zero_with_grad_of(*bias).to(y.scalar_type());
  }
  return out;
}

// How a frozen-weight Linear's Autograd kernel differentiates x and bias: not at all, by its C++
// Function, or (torch.func transforms, forward-mode AD) by frozen_linear_composite.
enum class LinearGrad { kNone, kFunction, kComposite };

inline LinearGrad linear_grad(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  const at::Tensor b = bias.value_or(at::Tensor());
  if (has_tangent({x, b})) return LinearGrad::kComposite;
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || (b.defined() && b.requires_grad()))) {
    return LinearGrad::kNone;
  }
  return cpp_functions_supported() ? LinearGrad::kFunction : LinearGrad::kComposite;
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
