// Autograd of qlib::linear_4bit in C++ (registered for the Autograd key, for every device):
// grad_x = grad @ W_hat (qlib::dequantize_4bit in grad's dtype) and grad_bias = the sum of grad
// over all rows; the 4-bit weight is frozen. In C++ rather than torch.library.register_autograd,
// whose Python wrapper cost about 27 us per call (CPU, 768 x 768 at M = 1, grad mode on).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_common.h"

namespace qlib {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

at::Tensor call_linear_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            const at::Tensor& codebook, int64_t block_size,
                            const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlib::linear_4bit", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, int64_t,
                                               const std::optional<at::Tensor>&)>();
  return op.call(x, packed, absmax, codebook, block_size, bias);
}

at::Tensor call_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax,
                                const at::Tensor& codebook, const c10::SymInt& in_features,
                                int64_t block_size, at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlib::dequantize_4bit", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               c10::SymInt, int64_t, at::ScalarType)>();
  return op.call(packed, absmax, codebook, in_features, block_size, dtype);
}

// The 4-bit weight is frozen: an absmax or codebook asking for a gradient it would not get
// raises (as int8_linear's scales).
void check_frozen(const char* op, const at::Tensor& absmax, const at::Tensor& codebook) {
  TORCH_CHECK(!at::GradMode::is_enabled() || !(absmax.requires_grad() || codebook.requires_grad()),
              op, ": absmax and codebook get no gradient (the 4-bit weight is frozen; train with "
              "qlib.prepare_qat); detach them");
}

class Linear4bitFunction : public torch::autograd::Function<Linear4bitFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, const at::Tensor& codebook, int64_t block_size,
                            const std::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // The weight only where x's gradient needs it (inference tensors cannot be saved).
    if (x.requires_grad()) ctx->save_for_backward({packed, absmax, codebook});
    ctx->saved_data["block_size"] = block_size;
    ctx->saved_data["bias_dtype"] = bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : -1;
    at::Tensor y = call_linear_4bit(x, packed, absmax, codebook, block_size, bias);  // checks x
    // (sym_size: size() on a traced x would specialise every dim, the batch too.)
    ctx->saved_data["in_features"] = x.sym_size(-1);
    return y;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& grad = grads[0];
    at::Tensor grad_x, grad_bias;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor w = call_dequantize_4bit(saved[0], saved[1], saved[2],
                                                ctx->saved_data["in_features"].toSymInt(),
                                                ctx->saved_data["block_size"].toInt(), grad.scalar_type());
      grad_x = at::matmul(grad, w);
    }
    const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
    // needs_input_grad counts tensor inputs only: x, packed, absmax, codebook, bias.
    if (bias_dtype >= 0 && ctx->needs_input_grad(4)) {
      grad_bias = linear_bias_grad(grad, static_cast<at::ScalarType>(bias_dtype));
    }
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), grad_bias};
  }
};

at::Tensor linear_4bit_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                const at::Tensor& codebook, int64_t block_size,
                                const std::optional<at::Tensor>& bias) {
  check_no_forward_grad("qlib::linear_4bit", {absmax, codebook});
  check_frozen("qlib::linear_4bit", absmax, codebook);
  const LinearGrad how = linear_grad(x, bias);
  if (how == LinearGrad::kNone) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_linear_4bit(x, packed, absmax, codebook, block_size, bias);
  }
  if (how == LinearGrad::kComposite) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = call_linear_4bit(x, packed, absmax, codebook, block_size, bias);  // (checks x)
    }
    return frozen_linear_composite(
        y, x, call_dequantize_4bit(packed, absmax, codebook, x.sym_size(-1), block_size,
                                   x.scalar_type()),
        bias);
  }
  return Linear4bitFunction::apply(x, packed, absmax, codebook, block_size, bias);
}

at::Tensor dequantize_4bit_autograd(const at::Tensor& packed, const at::Tensor& absmax,
                                    const at::Tensor& codebook, c10::SymInt in_features,
                                    int64_t block_size, at::ScalarType dtype) {
  check_no_forward_grad("qlib::dequantize_4bit", {absmax, codebook});
  check_frozen("qlib::dequantize_4bit", absmax, codebook);
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_dequantize_4bit(packed, absmax, codebook, in_features, block_size, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, Autograd, m) {
  m.impl("linear_4bit", &linear_4bit_autograd);
  m.impl("dequantize_4bit", &dequantize_4bit_autograd);
}

}  // namespace qlib
