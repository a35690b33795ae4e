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

// F::apply, with an error that names the op where no C++ Function can run (torch's names none).
template <class F, class... Args>
auto apply_function(const char* op, Args&&... args) {
  TORCH_CHECK(cpp_functions_supported(), op,
              ": torch.func transforms that differentiate (grad, vjp, jacrev; vmap of a call "
              "that records a gradient) are not supported: its autograd is C++. Use "
              "torch.autograd.grad or .backward(); vmap without gradients works");
  return F::apply(std::forward<Args>(args)...);
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
