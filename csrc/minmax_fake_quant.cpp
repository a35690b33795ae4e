// qlib::minmax_fake_quant: FakeQuantize's per-step path for the min-max observers in one call
// (minmax_observe unless the observer is off, observer_qparams, fake_quant). It is
// CompositeImplicitAutograd, so its autograd, fake tensors and CUDA path are those of the ops
// it calls; what it saves is the Python between them (about 15 us a call, CPU).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>

#include "affine.h"

namespace qlib {
namespace {

constexpr const char* kOp = "qlib::minmax_fake_quant";

void call_minmax_observe(const at::Tensor& rows, const at::Tensor& min_val,
                         const at::Tensor& max_val, const at::Tensor& observed,
                         const at::Tensor& nonfinite, std::optional<double> averaging_constant) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlib::minmax_observe", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&,
                                         std::optional<double>)>();
  op.call(rows, min_val, max_val, observed, nonfinite, averaging_constant);
}

std::tuple<at::Tensor, at::Tensor> call_observer_qparams(const at::Tensor& min_val,
                                                         const at::Tensor& max_val,
                                                         int64_t quant_min, int64_t quant_max,
                                                         bool symmetric, double eps) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlib::observer_qparams", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool,
                                 double)>();
  return op.call(min_val, max_val, quant_min, quant_max, symmetric, eps);
}

// qparams_shape (x's rank, past one block) must scale the blocks that are observed: along
// block_axis > 0 its size there and ones elsewhere; for block_axis 0 (x's rows in row-major
// order) x's leading sizes, then a divisor of the next one, then ones.
void check_blocks_of_x(const at::Tensor& x, int64_t block_axis, c10::SymIntArrayRef q) {
  if (std::all_of(q.begin(), q.end(), [](const c10::SymInt& d) { return d == 1; })) return;
  const auto xs = x.sym_sizes();
  bool ok = static_cast<int64_t>(q.size()) == x.dim();
  if (ok && block_axis > 0) {
    for (int64_t d = 0; d < x.dim(); ++d) ok = ok && q[d] == (d == block_axis ? xs[d] : 1);
  } else if (ok) {
    int64_t d = 0;
    while (d < x.dim() && q[d] == xs[d]) ++d;
    if (d < x.dim()) ok = xs[d] % q[d] == 0;
    for (++d; d < x.dim(); ++d) ok = ok && q[d] == 1;
  }
  TORCH_CHECK(ok, kOp, ": qparams_shape ", q, " does not scale the blocks of x (shape ", xs,
              ") observed along block_axis ", block_axis);
}

// Symbolic sizes throughout: torch.compile traces this body with dynamic shapes.
at::Tensor minmax_fake_quant(const at::Tensor& x, const at::Tensor& min_val,
                             const at::Tensor& max_val, const at::Tensor& observed,
                             const at::Tensor& nonfinite,
                             std::optional<double> averaging_constant, int64_t block_axis,
                             c10::SymIntArrayRef qparams_shape, int64_t quant_min,
                             int64_t quant_max, bool symmetric, double eps, bool observe) {
  // What observer_qparams would refuse, before anything is observed.
  check_quant_range(kOp, quant_min, quant_max);
  check_eps(kOp, eps);
  TORCH_CHECK(min_val.dim() == 1, kOp, ": min_val must be 1-D with one value per block, got shape ",
              min_val.sym_sizes());
  const c10::SymInt blocks = min_val.sym_size(0);
  TORCH_CHECK(block_axis == 0 || (block_axis > 0 && block_axis < x.dim()), kOp,
              ": block_axis must be 0 or a dim of x (shape ", x.sym_sizes(), "), got ", block_axis);
  TORCH_SYM_CHECK(blocks.sym_gt(0), kOp, ": min_val is empty (no blocks)");
  TORCH_SYM_CHECK((x.sym_numel() % blocks).sym_eq(0), kOp, ": x of shape ", x.sym_sizes(),
                  " does not split into ", blocks, " blocks (min_val's size)");
  c10::SymInt held = 1;
  for (const auto& d : qparams_shape) {
    TORCH_SYM_CHECK(d.sym_ge(1), kOp, ": qparams_shape ", qparams_shape, " must be positive");
    held = held * d;
  }
  TORCH_SYM_CHECK(held.sym_eq(blocks), kOp, ": qparams_shape ", qparams_shape, " must hold ",
                  blocks, " values (one per block)");
  check_blocks_of_x(x, block_axis, qparams_shape);
  if (observe && x.sym_numel().sym_ne(0).guard_bool(__FILE__, __LINE__)) {
    at::Tensor rows = x.detach();
    if (block_axis != 0) rows = rows.movedim(block_axis, 0);
    call_minmax_observe(rows.reshape_symint({blocks, x.sym_numel() / blocks}), min_val, max_val,
                        observed, nonfinite, averaging_constant);
  }
  const auto [scale, zero_point] =
      call_observer_qparams(min_val, max_val, quant_min, quant_max, symmetric, eps);
  return call_fake_quant(x, scale.view_symint(qparams_shape),
                         zero_point.view_symint(qparams_shape), quant_min, quant_max);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, CompositeImplicitAutograd, m) {
  m.impl("minmax_fake_quant", &minmax_fake_quant);
}

}  // namespace qlib
