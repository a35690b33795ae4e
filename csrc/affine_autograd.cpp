// Autograd of qlib::fake_quant in C++ (registered for the Autograd key, for every
// device): the straight-through estimator and LSQ / LSQ+ gradients come from
// qlib::fake_quant_backward. In C++ rather than torch.library.register_autograd,
// whose Python wrapper cost about 26 us per call (CPU, tiny tensor).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "affine.h"

namespace qlib {

at::Tensor call_fake_quant(const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlib::fake_quant", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, int64_t, int64_t)>();
  return op.call(x, scale, zero_point, quant_min, quant_max);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fake_quant_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, bool scale_grad,
    bool zero_point_grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlib::fake_quant_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              int64_t, int64_t, bool, bool)>();
  return op.call(grad, x, scale, zero_point, quant_min, quant_max, scale_grad, zero_point_grad);
}

class FakeQuantFunction : public torch::autograd::Function<FakeQuantFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, scale, zero_point});
    ctx->saved_data["quant_min"] = quant_min;
    ctx->saved_data["quant_max"] = quant_max;
    return call_fake_quant(x, scale, zero_point, quant_min, quant_max);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &scale = saved[1], &zero_point = saved[2];
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_scale = ctx->needs_input_grad(1);
    // An integer zero point has no gradient; a floating one (LSQ+) does.
    const bool need_zp = ctx->needs_input_grad(2) && zero_point.is_floating_point();
    auto [grad_x, grad_scale, grad_zp] = call_fake_quant_backward(
        grads[0], x, scale, zero_point, ctx->saved_data["quant_min"].toInt(),
        ctx->saved_data["quant_max"].toInt(), need_scale, need_zp);
    return {need_x ? grad_x : at::Tensor(), need_scale ? grad_scale : at::Tensor(),
            need_zp ? grad_zp : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor fake_quant_autograd(const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& zero_point, int64_t quant_min,
                               int64_t quant_max) {
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || scale.requires_grad() || zero_point.requires_grad())) {
    // Nothing to record (the autograd Function's context would cost a third of a
    // small call).
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fake_quant(x, scale, zero_point, quant_min, quant_max);
  }
  return FakeQuantFunction::apply(x, scale, zero_point, quant_min, quant_max);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, Autograd, m) { m.impl("fake_quant", &fake_quant_autograd); }

}  // namespace qlib
