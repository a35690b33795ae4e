// Autograd of qlib::int8_linear and qlib::int8_linear_packed in C++ (the Autograd key, every
// device): the int8 weight is frozen; x gets the straight-through gradient grad @ W_hat (W_hat =
// w_int8 * w_scale, the activation quantization passed straight through, as a frozen int8 layer
// under an adapter or an upstream layer in training needs), and bias the sum of grad over rows.
// Without this the outputs required grad but backward gave no gradient.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd_common.h"
#include "int8.h"

namespace qlib {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using OptTensor = std::optional<at::Tensor>;

using Int8LinearSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                                 int64_t);
using Int8LinearPackedSig = at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                       const at::Tensor&, const OptTensor&, const OptTensor&,
                                       const OptTensor&, int64_t, int64_t);

const c10::TypedOperatorHandle<Int8LinearSig>& int8_linear_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlib::int8_linear", "")
                             .typed<Int8LinearSig>();
  return op;
}

const c10::TypedOperatorHandle<Int8LinearPackedSig>& int8_linear_packed_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlib::int8_linear_packed", "")
                             .typed<Int8LinearPackedSig>();
  return op;
}

// W_hat = w_int8 * w_scale in `dtype`, [N, K].
at::Tensor dequantized_weight(const at::Tensor& w_int8, const at::Tensor& w_scale,
                              at::ScalarType dtype) {
  return (w_int8.to(at::kFloat) * w_scale.to(at::kFloat).reshape({-1, 1})).to(dtype);
}

// The weight only where x's gradient needs it (a module built under inference_mode holds
// inference tensors, which cannot be saved; bias-only training still runs).
void save(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_int8,
          const at::Tensor& w_scale, const OptTensor& bias) {
  if (x.requires_grad()) ctx->save_for_backward({w_int8, w_scale});
  ctx->saved_data["bias_dtype"] =
      bias.has_value() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
}

// {grad_x, grad_bias} from the saved weight. bias_input: the bias's index among the tensor
// inputs that needs_input_grad counts (an absent bias has none: asked only for a bias).
std::pair<at::Tensor, at::Tensor> grads_of(AutogradContext* ctx, const at::Tensor& grad,
                                           size_t bias_input) {
  const bool need_x = ctx->needs_input_grad(0);
  const auto saved = ctx->get_saved_variables();
  at::Tensor grad_x, grad_bias;
  if (need_x) {
    grad_x = at::matmul(grad, dequantized_weight(saved[0], saved[1], grad.scalar_type()));
  }
  const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
  if (bias_dtype >= 0 && ctx->needs_input_grad(bias_input)) {
    grad_bias = linear_bias_grad(grad, static_cast<at::ScalarType>(bias_dtype));
  }
  return {grad_x, grad_bias};
}

// The checks of both ops' Autograd kernels: a scale that asks for a gradient (or carries a
// tangent) it will not get is an error.
void check_frozen_scales(const char* op, const at::Tensor& w_scale, const OptTensor& act_scale) {
  const at::Tensor a = act_scale.value_or(at::Tensor());
  check_no_forward_grad(op, {w_scale, a});
  TORCH_CHECK(!at::GradMode::is_enabled() ||
                  !(w_scale.requires_grad() || (a.defined() && a.requires_grad())),
              op, ": w_scale and act_scale get no gradient (the int8 weight is frozen; train "
              "with qlib.prepare_qat); detach them");
}

class Int8LinearFunction : public torch::autograd::Function<Int8LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_int8,
                            const at::Tensor& w_scale, const OptTensor& bias,
                            const OptTensor& act_scale, const OptTensor& act_zero_point,
                            int64_t qmin, int64_t qmax) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save(ctx, x, w_int8, w_scale, bias);
    return int8_linear_op()
        .call(x, w_int8, w_scale, bias, act_scale, act_zero_point, qmin, qmax);
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    // needs_input_grad counts tensor inputs: x, w_int8, w_scale, bias, act_scale, act_zero_point.
    auto [gx, gb] = grads_of(ctx, grads[0], 3);
    return {gx, at::Tensor(), at::Tensor(), gb, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class Int8LinearPackedFunction : public torch::autograd::Function<Int8LinearPackedFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w_packed,
                            const OptTensor& w_int8, const at::Tensor& w_scale,
                            const OptTensor& bias, const OptTensor& act_scale,
                            const OptTensor& act_zero_point, int64_t qmin, int64_t qmax) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = int8_linear_packed_op()
        .call(x, w_packed, w_int8, w_scale, bias, act_scale, act_zero_point, qmin, qmax);
    // (Without w_int8 the weight is unpacked only where x's gradient needs it.)
    save(ctx, x,
         w_int8.has_value() || !x.requires_grad()
             ? w_int8.value_or(at::Tensor())
             // (sym sizes: x.size(-1) would read, and so guard, every size of a traced x)
             : int8_unpack_weight(w_packed, w_scale.sym_numel(), x.sym_size(-1)),
         w_scale, bias);
    ctx->saved_data["bias_input"] = int64_t{w_int8.has_value() ? 4 : 3};
    return out;
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    // Tensor inputs: x, w_packed, w_int8 (if given), w_scale, bias, act_scale, act_zero_point.
    auto [gx, gb] = grads_of(ctx, grads[0], ctx->saved_data["bias_input"].toInt());
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), gb, at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor int8_linear_autograd(const at::Tensor& x, const at::Tensor& w_int8,
                                const at::Tensor& w_scale, const OptTensor& bias,
                                const OptTensor& act_scale, const OptTensor& act_zero_point,
                                int64_t qmin, int64_t qmax) {
  check_frozen_scales("qlib::int8_linear", w_scale, act_scale);
  const LinearGrad how = linear_grad(x, bias);
  if (how == LinearGrad::kNone) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return int8_linear_op()
        .call(x, w_int8, w_scale, bias, act_scale, act_zero_point, qmin, qmax);
  }
  if (how == LinearGrad::kComposite) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = int8_linear_op().call(x, w_int8, w_scale, bias, act_scale, act_zero_point, qmin, qmax);
    }
    return frozen_linear_composite(y, x, dequantized_weight(w_int8, w_scale, x.scalar_type()),
                                   bias);
  }
  return Int8LinearFunction::apply(x, w_int8, w_scale, bias, act_scale, act_zero_point, qmin,
                                   qmax);
}

at::Tensor int8_linear_packed_autograd(const at::Tensor& x, const at::Tensor& w_packed,
                                       const OptTensor& w_int8, const at::Tensor& w_scale,
                                       const OptTensor& bias, const OptTensor& act_scale,
                                       const OptTensor& act_zero_point, int64_t qmin,
                                       int64_t qmax) {
  check_frozen_scales("qlib::int8_linear_packed", w_scale, act_scale);
  const LinearGrad how = linear_grad(x, bias);
  if (how == LinearGrad::kNone) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return int8_linear_packed_op()
        .call(x, w_packed, w_int8, w_scale, bias, act_scale, act_zero_point, qmin, qmax);
  }
  if (how == LinearGrad::kComposite) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = int8_linear_packed_op().call(x, w_packed, w_int8, w_scale, bias, act_scale,
                                       act_zero_point, qmin, qmax);
    }
    const at::Tensor w = w_int8.has_value()
                             ? *w_int8
                             : int8_unpack_weight(w_packed, w_scale.sym_numel(), x.sym_size(-1));
    return frozen_linear_composite(y, x, dequantized_weight(w, w_scale, x.scalar_type()), bias);
  }
  return Int8LinearPackedFunction::apply(x, w_packed, w_int8, w_scale, bias, act_scale,
                                         act_zero_point, qmin, qmax);
}

}  // namespace

at::Tensor int8_unpack_weight(const at::Tensor& w_packed, const c10::SymInt& N, const c10::SymInt& K) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlib::int8_unpack_weight", "")
                             .typed<at::Tensor(const at::Tensor&, c10::SymInt, c10::SymInt)>();
  return op.call(w_packed, N, K);
}

TORCH_LIBRARY_IMPL(qlib, Autograd, m) {
  m.impl("int8_linear", &int8_linear_autograd);
  m.impl("int8_linear_packed", &int8_linear_packed_autograd);
}

}  // namespace qlib
