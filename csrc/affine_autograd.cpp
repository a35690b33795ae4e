// Autograd of qlib::fake_quant, fake_quant_with_mask and lsq_fake_quant in C++ (registered for
// the Autograd key, for every device): the straight-through estimator (on a saved mask, or on x)
// and LSQ / LSQ+ gradients come from qlib's backward ops. In C++ rather than
// torch.library.register_autograd, whose Python wrapper cost about 26 us per call (CPU, tiny
// tensor). Also lsq_fake_quant's forward, for every device (CompositeExplicitAutograd).
#include <ATen/OpMathType.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string_view>
#include <typeinfo>

#include "affine.h"
#include "autograd_common.h"

namespace qlib {

at::Tensor call_fake_quant(const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlib::fake_quant", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, int64_t, int64_t)>();
  return op.call(x, scale, zero_point, quant_min, quant_max);
}

at::Tensor call_lsq_fake_quant(const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                               std::optional<double> grad_factor, double eps) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlib::lsq_fake_quant", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                            int64_t, std::optional<double>, double)>();
  return op.call(x, scale, zero_point, quant_min, quant_max, grad_factor, eps);
}

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

std::tuple<at::Tensor, at::Tensor> call_fake_quant_with_mask(const at::Tensor& x,
                                                             const at::Tensor& scale,
                                                             const at::Tensor& zero_point,
                                                             int64_t quant_min,
                                                             int64_t quant_max) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlib::fake_quant_with_mask", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, int64_t, int64_t)>();
  return op.call(x, scale, zero_point, quant_min, quant_max);
}

at::Tensor call_fake_quant_mask_backward(const at::Tensor& grad, const at::Tensor& mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlib::fake_quant_mask_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(grad, mask);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

// The backward of both Functions. Under create_graph=True (grad mode on in the backward) the
// STE gradient is grad * mask, which autograd can differentiate again (as torch's fake quant
// ops allow); the LSQ gradients are not differentiable and raise there.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_grads(
    const char* op, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, bool scale_grad,
    bool zero_point_grad) {
  if (!at::GradMode::is_enabled()) {
    return call_fake_quant_backward(grad, x, scale, zero_point, quant_min, quant_max, scale_grad,
                                    zero_point_grad);
  }
  TORCH_CHECK(!scale_grad && !zero_point_grad, op,
              ": a double backward (create_graph=True) is not supported with gradients for "
              "scale or zero_point (LSQ); only x's straight-through gradient is differentiable");
  at::Tensor mask;
  {
    at::NoGradGuard no_grad;
    mask = std::get<0>(call_fake_quant_backward(at::ones_like(x), x, scale, zero_point,
                                                quant_min, quant_max, false, false));
  }
  return {grad * mask, at::Tensor(), at::Tensor()};
}

class FakeQuantFunction : public torch::autograd::Function<FakeQuantFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({saveable(x), saveable(scale), saveable(zero_point)});
    ctx->saved_data["quant_min"] = quant_min;
    ctx->saved_data["quant_max"] = quant_max;
    return call_fake_quant(x, scale, zero_point, quant_min, quant_max);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &scale = saved[1], &zero_point = saved[2];
    const bool need_scale = ctx->needs_input_grad(1);
    // An integer zero point has no gradient; a floating one (LSQ+) does.
    const bool need_zp = ctx->needs_input_grad(2) && zero_point.is_floating_point();
    auto [grad_x, grad_scale, grad_zp] = fake_quant_grads(
        "qlib::fake_quant", grads[0], x, scale, zero_point, ctx->saved_data["quant_min"].toInt(),
        ctx->saved_data["quant_max"].toInt(), need_scale, need_zp);
    return {ctx->needs_input_grad(0) ? grad_x : at::Tensor(),
            need_scale ? grad_scale : at::Tensor(), need_zp ? grad_zp : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

// ---------------------------------------------------------------- fake_quant_with_mask
constexpr const char* kWithMaskOp = "qlib::fake_quant_with_mask";

// The straight-through estimator on a saved mask (1 byte an element) instead of x. Under
// create_graph=True grad * mask, which autograd differentiates again.
class MaskedFakeQuantFunction : public torch::autograd::Function<MaskedFakeQuantFunction> {
 public:
  static tensor_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                             const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mask] = call_fake_quant_with_mask(x, scale, zero_point, quant_min, quant_max);
    ctx->save_for_backward({mask});
    ctx->mark_non_differentiable({mask});
    return {y, mask};
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const at::Tensor mask = ctx->get_saved_variables()[0];
    const at::Tensor grad_x = at::GradMode::is_enabled()
                                  ? grads[0] * mask
                                  : call_fake_quant_mask_backward(grads[0], mask);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// A floating qparam in float32 or float64 (float16, bfloat16, float8 widened, as fake_quant's
// math); an integer one as it is.
at::Tensor wide(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return !t.is_floating_point() || dtype == at::kFloat || dtype == at::kDouble ? t
                                                                               : t.to(at::kFloat);
}

// where(inside, x, 0) as a zero_with_grad_of (added to outputs that are never -0, which keeps
// their bits): the STE's gradient, where(inside, grad, 0) (a NaN or Inf grad outside gives 0
// here, NaN on the Functions' paths).
at::Tensor ste_zero(const at::Tensor& inside, const at::Tensor& x) {
  return zero_with_grad_of([&] { return at::where(inside, x, at::zeros({}, x.options())); });
}

// The qparams' part of a composite: a zero (float32, x's shape) whose derivatives at this level
// are ds for scale and dz for zero_point per element (undefined: not differentiated here),
// summed over each block, and whose one second derivative here is the mixed one, `mixed` per
// element: those of (q - z) * s with the code q held (the STE's). Second derivatives across
// levels (torch.func.hessian) come from ds and dz, which carry their derivatives below.
at::Tensor qparam_zeros(const at::Tensor& scale, const at::Tensor& ds, const at::Tensor& zero_point,
                        const at::Tensor& dz, const at::Tensor& mixed, const at::Tensor& x) {
  at::Tensor out = at::zeros({}, x.options().dtype(at::kFloat)), zs, zz;
  if (ds.defined()) {
    zs = zero_with_grad_of([&] { return expand_over_blocks(wide(scale), x); });
    out = out + zs * ds;
  }
  if (dz.defined()) {
    zz = zero_with_grad_of([&] { return expand_over_blocks(wide(zero_point), x); });
    out = out + zz * dz;
  }
  return ds.defined() && dz.defined() ? out + zs * zz * mixed : out;
}

// Whether t may be differentiated at a level below this one (torch.func nesting, autograd
// around a transform): it requires grad, carries a tangent, or is a transform's wrapper (a
// captured tensor lifted into this level).
bool maybe_differentiated_below(const at::Tensor& t) {
  return t.requires_grad() || has_tangent({t}) ||
         t.key_set().has(c10::DispatchKey::FuncTorchGradWrapper) ||
         t.key_set().has(c10::DispatchKey::FuncTorchBatched);
}

// The STE in differentiable ATen ops: the value from `op` itself below this level (fake_quant,
// or fake_quant_with_mask), so the levels below see its own derivatives (LSQ's, for a scale
// differentiated there only), and the mask of a detached call where they may differ.
std::tuple<at::Tensor, at::Tensor> fake_quant_ste_composite(const char* op, const at::Tensor& x,
                                                            const at::Tensor& scale,
                                                            const at::Tensor& zero_point,
                                                            int64_t quant_min,
                                                            int64_t quant_max) {
  at::Tensor y, mask;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (std::string_view(op) == kWithMaskOp ||
        !(maybe_differentiated_below(scale) || maybe_differentiated_below(zero_point))) {
      std::tie(y, mask) = call_fake_quant_with_mask(x, scale, zero_point, quant_min, quant_max);
    } else {
      y = call_fake_quant(x, scale, zero_point, quant_min, quant_max);
      mask = std::get<1>(call_fake_quant_with_mask(x.detach(), scale.detach(),
                                                   zero_point.detach(), quant_min, quant_max));
    }
  }
  return {y + ste_zero(mask, x), mask};
}

// y and the mask, with x's gradient the STE on the mask: MaskedFakeQuantFunction, or the
// composite under torch.func transforms and forward-mode AD. For both ops' Autograd kernels
// (op: the caller), once they have checked that only x is differentiated at this level.
std::tuple<at::Tensor, at::Tensor> masked_ste(const char* op, const at::Tensor& x,
                                              const at::Tensor& scale,
                                              const at::Tensor& zero_point, int64_t quant_min,
                                              int64_t quant_max) {
  if (!cpp_functions_supported() || has_tangent({x})) {
    return fake_quant_ste_composite(op, x, scale, zero_point, quant_min, quant_max);
  }
  auto out = MaskedFakeQuantFunction::apply(x, scale, zero_point, quant_min, quant_max);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_mask_autograd(const at::Tensor& x,
                                                                 const at::Tensor& scale,
                                                                 const at::Tensor& zero_point,
                                                                 int64_t quant_min,
                                                                 int64_t quant_max) {
  TORCH_CHECK(!differentiated(scale) && !differentiated(zero_point), kWithMaskOp,
              ": gives no gradient for scale or zero_point; qlib::fake_quant gives LSQ's");
  if (!differentiated(x)) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fake_quant_with_mask(x, scale, zero_point, quant_min, quant_max);
  }
  return masked_ste(kWithMaskOp, x, scale, zero_point, quant_min, quant_max);
}

bool grad_wanted(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point) {
  return at::GradMode::is_enabled() &&
         (x.requires_grad() || scale.requires_grad() || zero_point.requires_grad());
}

at::Tensor fake_quant_composite(const at::Tensor& y, const at::Tensor& x, const at::Tensor& scale,
                                const at::Tensor& zero_point, const at::Tensor& s,
                                const at::Tensor& z, int64_t quant_min, int64_t quant_max,
                                const c10::IValue& factor);

// The Autograd kernel of an op taking (x, scale, zero_point, ...): `below` under autograd where
// no gradient is wanted (the Function's context would cost a third of a small call), else its
// Function, or `composite` under torch.func transforms and forward-mode AD.
template <class Function, class Below, class Composite, class... Rest>
at::Tensor autograd_kernel(Below below, Composite composite, const at::Tensor& x,
                           const at::Tensor& scale, const at::Tensor& zero_point, Rest... rest) {
  const bool grad = grad_wanted(x, scale, zero_point);
  if (has_tangent({x, scale, zero_point}) || (grad && !cpp_functions_supported())) {
    return composite(x, scale, zero_point, rest...);
  }
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return below(x, scale, zero_point, rest...);
  }
  return Function::apply(x, scale, zero_point, rest...);
}

// Where only x needs a gradient and x is not a leaf (an activation, which saving would keep
// alive), the STE runs on fake_quant_with_mask's 1-byte mask; a leaf (a weight) is kept by its
// owner anyway, and saving it spares the mask's store. Under torch.func transforms and
// forward-mode AD it is a composite of ATen ops.
at::Tensor fake_quant_autograd(const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& zero_point, int64_t quant_min,
                               int64_t quant_max) {
  if (differentiated(x) && !differentiated(scale) && !differentiated(zero_point) &&
      (!x.is_leaf() || !cpp_functions_supported() || has_tangent({x}))) {
    return std::get<0>(masked_ste("qlib::fake_quant", x, scale, zero_point, quant_min, quant_max));
  }
  const auto composite = [](const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = call_fake_quant(x, scale, zero_point, quant_min, quant_max);
    }
    return fake_quant_composite(y, x, scale, zero_point, scale, zero_point, quant_min, quant_max,
                                c10::IValue());
  };
  return autograd_kernel<FakeQuantFunction>(call_fake_quant, composite, x, scale, zero_point,
                                            quant_min, quant_max);
}

// ---------------------------------------------------------------- lsq_fake_quant
constexpr const char* kLsqOp = "qlib::lsq_fake_quant";

// The qparams fake_quant sees: LSQ keeps the scale positive and the zero point in range.
// float16 / bfloat16 qparams (model.half()) are taken in float32 (wide), as fake_quant's math: in
// float16 eps (1e-8) would clamp to 0, and the gradient sums would overflow before LSQ's factor
// (autograd rounds the float32 gradient to the parameter's dtype once, at the end).
std::pair<at::Tensor, at::Tensor> lsq_clamped(const at::Tensor& scale, const at::Tensor& zero_point,
                                              int64_t quant_min, int64_t quant_max, double eps) {
  // An integer zero point is range-checked by fake_quant (a clamp in its own dtype could wrap).
  return {wide(scale).clamp_min(eps), zero_point.is_floating_point()
                                          ? wide(zero_point).clamp(quant_min, quant_max)
                                          : zero_point};
}

// call_fake_quant at LSQ's qparams, its errors naming lsq_fake_quant (the op the caller called):
// those of the value checks (check_lsq_args has named the others, traced calls' too).
at::Tensor lsq_call_fake_quant(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z,
                               int64_t quant_min, int64_t quant_max) {
  try {
    return call_fake_quant(x, s, z, quant_min, quant_max);
  } catch (const c10::Error& e) {
    constexpr std::string_view kPrefix = "qlib::fake_quant:";
    const std::string& msg = e.msg();
    if (typeid(e) != typeid(c10::Error) || msg.rfind(kPrefix, 0) != 0) throw;
    TORCH_CHECK(false, kLsqOp, ":", msg.substr(kPrefix.size()));
  }
}

}  // namespace

void check_lsq_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                    int64_t quant_min, int64_t quant_max, std::optional<double> grad_factor,
                    double eps) {
  check_quant_range(kLsqOp, quant_min, quant_max);
  TORCH_CHECK(scale.is_floating_point(), kLsqOp, ": scale must be floating, got ",
              scale.scalar_type());
  check_eps(kLsqOp, eps);
  TORCH_CHECK(!grad_factor || (*grad_factor > 0 && std::isfinite(*grad_factor)), kLsqOp,
              ": grad_factor must be positive and finite, got ", *grad_factor);
  check_fake_quant_input(kLsqOp, x);
  check_affine_meta(kLsqOp, "x", x, scale, zero_point);
}

namespace {

at::Tensor lsq_fake_quant(const at::Tensor& x, const at::Tensor& scale,
                          const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                          std::optional<double> grad_factor, double eps) {
  check_lsq_args(x, scale, zero_point, quant_min, quant_max, grad_factor, eps);
  const auto [s, z] = lsq_clamped(scale, zero_point, quant_min, quant_max, eps);
  return lsq_call_fake_quant(x, s, z, quant_min, quant_max);
}

// grad (fake_quant_backward's own new tensor) times LSQ's factor f, in place: the given
// grad_factor, or 1 / sqrt(max(numel * quant_max, 1)) from a (Sym)Int. The product is taken in
// grad's opmath type with the factor as a double, as autograd's `t * grad_factor` (mul_.Scalar
// would round the factor to a bfloat16 grad's dtype first). On plain CPU tensors one loop
// (ATen's small ops cost ~10 us a call); tensor ops where traced (a symbolic numel).
void scale_grad_(at::Tensor& grad, const c10::IValue& f) {
  std::optional<double> factor;
  if (f.isDouble()) {
    factor = f.toDouble();
  } else if (const auto n = f.toSymInt().maybe_as_int()) {
    factor = lsq_default_grad_factor(static_cast<double>(*n));
  }
  if (factor && grad.is_cpu() && grad.is_contiguous() && !at::isTensorSubclassLike(grad)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "lsq_scale", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const auto k = static_cast<opmath_t>(*factor);
      scalar_t* g = grad.data_ptr<scalar_t>();
      for (int64_t i = 0; i < grad.numel(); ++i) g[i] = static_cast<scalar_t>(g[i] * k);
    });
    return;
  }
  grad.mul_(factor ? at::scalar_tensor(*factor, at::kDouble)
                   : at::scalar_tensor(c10::Scalar(f.toSymInt()), at::kDouble)
                         .clamp_min_(1)
                         .rsqrt_());
}

// LSQ's factor: grad_factor, or from numel * quant_max (scale_grad_).
c10::IValue lsq_factor(const at::Tensor& x, int64_t quant_max, std::optional<double> grad_factor) {
  // (A SymInt numel while tracing: the factor's tensor is then symbolic, not specialised.)
  return grad_factor ? c10::IValue(*grad_factor) : c10::IValue(x.sym_numel() * quant_max);
}

// fake_quant's gradients (LSQ / LSQ+ for a scale or floating zero point that is differentiated:
// requires grad or carries a tangent) in differentiable ATen ops: y plus zeros whose derivatives
// are the STE's for x, and for scale (zero point) grad times the per-element LSQ factor, summed
// over each block by expand_over_blocks' autograd. The factors are fake_quant_backward's own at
// the qparams given one an element (s, z: those y was computed at), times `factor` (None: 1).
// The sums run in autograd's order, not the kernels' (equal to float tolerance); straight
// through LSQ's clamps (scale, zero_point are the unclamped inputs). Second derivatives: the
// STE's (q held), 0 but d2 / dscale dzero_point = -factor outside the range.
at::Tensor fake_quant_composite(const at::Tensor& y, const at::Tensor& x, const at::Tensor& scale,
                                const at::Tensor& zero_point, const at::Tensor& s,
                                const at::Tensor& z, int64_t quant_min, int64_t quant_max,
                                const c10::IValue& factor) {
  const bool need_scale = differentiated(scale);
  const bool need_zp = differentiated(zero_point) && zero_point.is_floating_point();
  at::Tensor inside, ds, dz, mixed;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto one_each = [&x](const at::Tensor& t) {
      return expand_over_blocks(wide(t.detach()), x).contiguous();
    };
    std::tie(inside, ds, dz) =
        call_fake_quant_backward(at::ones_like(x), x.detach(), one_each(s), one_each(z),
                                 quant_min, quant_max, need_scale, need_zp);
    inside = inside.eq(1);  // (CUDA gives NaN for a block whose qparams fail: outside)
    if (!factor.isNone()) {
      if (need_scale) scale_grad_(ds, factor);
      if (need_zp) scale_grad_(dz, factor);
    }
    if ((need_scale || need_zp) && zero_point.is_floating_point()) {
      mixed = at::where(inside, 0.0, -1.0).to(at::kFloat);
      if (!factor.isNone()) scale_grad_(mixed, factor);
      // ds's derivative in the zero point and dz's in the scale, for the levels below (which
      // may differentiate a qparam this one does not).
      const auto below_zero = [&x](const at::Tensor& t) {
        const at::Tensor e = expand_over_blocks(wide(t), x);
        return e - e.detach();
      };
      if (need_scale) ds = ds + mixed * below_zero(zero_point);
      if (need_zp) dz = dz + mixed * below_zero(scale);
    }
  }
  return y + ste_zero(inside, x) +
         qparam_zeros(scale, need_scale ? ds : at::Tensor(), zero_point,
                      need_zp ? dz : at::Tensor(), mixed, x)
             .to(x.scalar_type());
}

// The gradients are fake_quant's at the clamped qparams, times grad_factor: straight through
// the clamps, so a scale pushed below eps or a zero point pushed out of range still learns its
// way back (torch.ao's learnable fake quant clamps them in place each step, to the same end).
class LsqFakeQuantFunction : public torch::autograd::Function<LsqFakeQuantFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& scale,
                            const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                            std::optional<double> grad_factor, double eps) {
    // lsq_fake_quant's body, keeping the clamped qparams for the backward.
    at::AutoDispatchBelowADInplaceOrView guard;
    check_lsq_args(x, scale, zero_point, quant_min, quant_max, grad_factor, eps);
    const auto [s, z] = lsq_clamped(scale, zero_point, quant_min, quant_max, eps);
    ctx->save_for_backward({saveable(x), saveable(s), saveable(z)});
    ctx->saved_data["quant_min"] = quant_min;
    ctx->saved_data["quant_max"] = quant_max;
    ctx->saved_data["grad_factor"] = lsq_factor(x, quant_max, grad_factor);
    return lsq_call_fake_quant(x, s, z, quant_min, quant_max);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &s = saved[1], &z = saved[2];
    const bool need_scale = ctx->needs_input_grad(1);
    const bool need_zp = ctx->needs_input_grad(2) && z.is_floating_point();
    auto [grad_x, grad_scale, grad_zp] = fake_quant_grads(
        kLsqOp, grads[0], x, s, z, ctx->saved_data["quant_min"].toInt(),
        ctx->saved_data["quant_max"].toInt(), need_scale, need_zp);
    const c10::IValue& f = ctx->saved_data["grad_factor"];
    if (need_scale) scale_grad_(grad_scale, f);
    if (need_zp) scale_grad_(grad_zp, f);
    return {ctx->needs_input_grad(0) ? grad_x : at::Tensor(),
            need_scale ? grad_scale : at::Tensor(), need_zp ? grad_zp : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// LsqFakeQuantFunction's forward and gradients as fake_quant_composite: the value from the op
// itself below this level (its own derivatives there), the factors at the clamped qparams.
at::Tensor lsq_fake_quant_composite(const at::Tensor& x, const at::Tensor& scale,
                                    const at::Tensor& zero_point, int64_t quant_min,
                                    int64_t quant_max, std::optional<double> grad_factor,
                                    double eps) {
  at::Tensor y, s, z;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    y = call_lsq_fake_quant(x, scale, zero_point, quant_min, quant_max, grad_factor, eps);
    std::tie(s, z) =
        lsq_clamped(scale.detach(), zero_point.detach(), quant_min, quant_max, eps);
  }
  return fake_quant_composite(y, x, scale, zero_point, s, z, quant_min, quant_max,
                              lsq_factor(x, quant_max, grad_factor));
}

at::Tensor lsq_fake_quant_autograd(const at::Tensor& x, const at::Tensor& scale,
                                   const at::Tensor& zero_point, int64_t quant_min,
                                   int64_t quant_max, std::optional<double> grad_factor,
                                   double eps) {
  return autograd_kernel<LsqFakeQuantFunction>(lsq_fake_quant, lsq_fake_quant_composite, x,
                                               scale, zero_point, quant_min, quant_max,
                                               grad_factor, eps);
}

// ---------------------------------------------------------------- dequantize
at::Tensor call_dequantize(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero_point,
                           at::ScalarType dtype) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlib::dequantize", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, at::ScalarType)>();
  return op.call(q, scale, zero_point, dtype);
}

// y = (q - zero_point) * scale, so dy/dscale = q - zero_point and dy/dzero_point = -scale
// (straight through a floating zero point's rounding, as LSQ+), each summed over its block.
// Both per-element factors come from dequantize itself: with unit scales, and of unit codes
// with zero zero points.
class DequantizeFunction : public torch::autograd::Function<DequantizeFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& scale,
                            const at::Tensor& zero_point, at::ScalarType dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({saveable(q), saveable(scale), saveable(zero_point)});
    return call_dequantize(q, scale, zero_point, dtype);
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &scale = saved[1], &zero_point = saved[2];
    const at::Tensor grad = grads[0].to(at::kFloat);
    at::Tensor grad_scale, grad_zp;
    if (ctx->needs_input_grad(1)) {
      const at::Tensor centred = call_dequantize(q, at::ones_like(scale), zero_point, at::kFloat);
      grad_scale = sum_over_blocks(grad * centred, scale).to(scale.scalar_type());
    }
    if (ctx->needs_input_grad(2)) {
      const at::Tensor scales = call_dequantize(at::ones_like(q), scale, at::zeros_like(zero_point),
                                                at::kFloat);
      grad_zp = sum_over_blocks(grad * scales, scale).neg_().to(zero_point.scalar_type());
    }
    return {at::Tensor(), grad_scale, grad_zp, at::Tensor()};
  }
};

// DequantizeFunction's gradients in differentiable ATen ops (as fake_quant_composite), for
// torch.func transforms and forward-mode AD: y plus zeros whose gradients are grad * (q -
// zero_point) for scale and -grad * scale for zero_point, summed over each block; the mixed
// second derivative is -1 per element.
at::Tensor dequantize_composite(const at::Tensor& y, const at::Tensor& q, const at::Tensor& scale,
                                const at::Tensor& zero_point) {
  at::Tensor centred, scales;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    // (From the qparams themselves: each factor's derivative in the other, for the levels below.)
    if (differentiated(scale)) {
      centred = call_dequantize(q, at::ones_like(scale), zero_point, at::kFloat);
    }
    if (differentiated(zero_point)) {
      scales = call_dequantize(at::ones_like(q), scale, at::zeros_like(zero_point), at::kFloat)
                   .neg();
    }
  }
  return y + qparam_zeros(scale, centred, zero_point, scales,
                          at::full({}, -1.0, q.options().dtype(at::kFloat)), q)
                 .to(y.scalar_type());
}

at::Tensor dequantize_autograd(const at::Tensor& q, const at::Tensor& scale,
                               const at::Tensor& zero_point, at::ScalarType dtype) {
  const bool grad =
      at::GradMode::is_enabled() && (scale.requires_grad() || zero_point.requires_grad());
  const bool tangent = has_tangent({scale, zero_point});
  if (!grad || tangent || !cpp_functions_supported()) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = call_dequantize(q, scale, zero_point, dtype);
    }
    return grad || tangent ? dequantize_composite(y, q, scale, zero_point) : y;
  }
  return DequantizeFunction::apply(q, scale, zero_point, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, Autograd, m) {
  m.impl("fake_quant", &fake_quant_autograd);
  m.impl("fake_quant_with_mask", &fake_quant_with_mask_autograd);
  m.impl("lsq_fake_quant", &lsq_fake_quant_autograd);
  m.impl("dequantize", &dequantize_autograd);
}

TORCH_LIBRARY_IMPL(qlib, CompositeExplicitAutograd, m) {
  m.impl("lsq_fake_quant", &lsq_fake_quant);
}

}  // namespace qlib
