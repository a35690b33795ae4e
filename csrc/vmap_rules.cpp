// torch.vmap batching rules (the FuncTorchBatched key): one call on the whole batch, where
// functorch's fallback called the op once per sample (per-sample gradients: vmap of grad).
// - The fake-quant ops: the batch becomes x's leading dim; a batched scale or zero point gives one
//   block per sample there, an unbatched one a block over the whole batch (a one-element one stays
//   per tensor). An empty batch gives empty outputs (per-sample qparams are empty then, which
//   block the empty x).
// - The frozen-weight Linears (int8, 4-bit): x's batch becomes one more leading dim of x, where x
//   alone is batched; otherwise (a batched weight, bias or activation scale) one call per sample.
#include <ATen/ATen.h>
#include <ATen/functorch/BatchedTensorImpl.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <typeinfo>
#include <vector>

#include "affine.h"
#include "quant_math.h"

// Exported by libtorch; declared in ATen/functorch/DynamicLayer.h, whose includes need
// nlohmann/json, which torch does not ship. While layer n runs, functorch's layer stack holds
// levels 1..n; this asserts for a level past n.
namespace at::functorch {
TORCH_API const std::shared_ptr<bool>& getLifeHandleForLevel(int64_t level);
}  // namespace at::functorch

namespace qlib {
namespace {

using at::functorch::makeBatched;
using at::functorch::maybeGetBatchedImpl;

// A vmap level and its batch size (symbolic while traced with dynamic shapes).
struct VmapLevel {
  int64_t id;
  c10::SymInt batch;
};

bool level_on_stack(int64_t level) {
  try {
    at::functorch::getLifeHandleForLevel(level);
    return true;
  } catch (const c10::Error&) {
    return false;
  }
}

// The level this rule runs at, or none where no input is batched at the running layer (the op
// then runs as is, for the layers below). It is the innermost of the inputs' outer batched
// wrappers (the dispatcher called the rule because one is batched), unless a grad / jvp
// wrapper (not batched) may lie above it: then a level on the stack past it means the running
// layer is another one (a captured tensor batched by an outer vmap).
std::optional<VmapLevel> batched_level(c10::ArrayRef<at::Tensor> tensors) {
  VmapLevel level{-1, 0};
  bool other_wrapper = false;
  for (const at::Tensor& t : tensors) {
    const auto* b = maybeGetBatchedImpl(t);
    if (b == nullptr) {
      other_wrapper = other_wrapper ||
                      (t.defined() && t.key_set().has(c10::DispatchKey::FuncTorchGradWrapper));
    } else if (b->level() > level.id) {
      level = {b->level(), b->value().sym_size(b->bdim())};
    }
  }
  TORCH_INTERNAL_ASSERT(level.id >= 0, "qlib: a batching rule ran without a batched input");
  if (other_wrapper && level_on_stack(level.id + 1)) return std::nullopt;
  return level;
}

bool batched_at(const at::Tensor& t, const VmapLevel& level) {
  const auto* b = maybeGetBatchedImpl(t);
  return b != nullptr && b->level() == level.id;
}

// t at the level, with the batch as its leading dim (expanded where t is not batched there).
at::Tensor leading(const at::Tensor& t, const VmapLevel& level) {
  if (batched_at(t, level)) {
    const auto* b = maybeGetBatchedImpl(t);
    return b->value().movedim(b->bdim(), 0);
  }
  std::vector<c10::SymInt> sizes{level.batch};
  sizes.insert(sizes.end(), t.sym_sizes().begin(), t.sym_sizes().end());
  return t.expand_symint(sizes);
}

// scale and zero_point blocking an x of x_rank + 1 dims, the batch leading: unbatched ones
// (unless per_sample) over the whole batch, batched ones one block per sample.
std::pair<at::Tensor, at::Tensor> qparams_blocking(int64_t x_rank, const VmapLevel& level,
                                                   const at::Tensor& scale,
                                                   const at::Tensor& zero_point,
                                                   bool per_sample) {
  if (!per_sample && !batched_at(scale, level) && !batched_at(zero_point, level)) {
    if (scale.sym_numel() == 1) return {scale, zero_point};  // (per tensor: one block for all)
    return {scale.unsqueeze(0), zero_point.unsqueeze(0)};
  }
  at::Tensor s = leading(scale, level), z = leading(zero_point, level);
  if (s.dim() > 0 && s.sym_numel() == s.sym_size(0)) {  // (per tensor within each sample)
    std::vector<c10::SymInt> shape(x_rank + 1, 1);
    shape[0] = level.batch;
    return {s.reshape_symint(shape), z.reshape_symint(shape)};
  }
  return {s, z};
}

// op(), its errors saying that their shapes and flat indices include the batch.
template <class Call>
auto with_batch_note(Call call) {
  try {
    return call();
  } catch (const c10::Error& e) {
    if (typeid(e) != typeid(c10::Error)) throw;  // (out of memory, ...: as they are)
    TORCH_CHECK(false, e.msg(),
                " (under torch.vmap: the shapes and flat indices include the batch, as dim 0)");
  }
}

// Both forward rules: y, and with_mask's mask (undefined without).
std::tuple<at::Tensor, at::Tensor> fake_quant_batched_outputs(
    const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, bool with_mask) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const auto call = [&](const at::Tensor& x_, const at::Tensor& s, const at::Tensor& z) {
    return with_mask ? call_fake_quant_with_mask(x_, s, z, quant_min, quant_max)
                     : std::tuple<at::Tensor, at::Tensor>(
                           call_fake_quant(x_, s, z, quant_min, quant_max), at::Tensor());
  };
  const auto found = batched_level({x, scale, zero_point});
  if (!found) return call(x, scale, zero_point);
  const VmapLevel& level = *found;
  const at::Tensor xb = leading(x, level);
  const auto [s, z] = qparams_blocking(xb.dim() - 1, level, scale, zero_point, false);
  const auto [y, mask] = with_batch_note([&] { return call(xb, s, z); });
  return {makeBatched(y, 0, level.id),
          mask.defined() ? makeBatched(mask, 0, level.id) : at::Tensor()};
}

at::Tensor fake_quant_batched(const at::Tensor& x, const at::Tensor& scale,
                              const at::Tensor& zero_point, int64_t quant_min,
                              int64_t quant_max) {
  return std::get<0>(
      fake_quant_batched_outputs(x, scale, zero_point, quant_min, quant_max, false));
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_mask_batched(const at::Tensor& x,
                                                                const at::Tensor& scale,
                                                                const at::Tensor& zero_point,
                                                                int64_t quant_min,
                                                                int64_t quant_max) {
  return fake_quant_batched_outputs(x, scale, zero_point, quant_min, quant_max, true);
}

// As fake_quant's rule, the op itself on the batch (its clamps, and autograd for a grad level
// below, straight through them), with LSQ's default factor, 1 / sqrt(numel * quant_max), taken
// from one sample's numel, as a loop over the samples would: the batch must not enter it.
at::Tensor lsq_fake_quant_batched(const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& zero_point, int64_t quant_min,
                                  int64_t quant_max, std::optional<double> grad_factor,
                                  double eps) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const auto found = batched_level({x, scale, zero_point});
  if (!found) {
    return call_lsq_fake_quant(x, scale, zero_point, quant_min, quant_max, grad_factor, eps);
  }
  const VmapLevel& level = *found;
  if (!grad_factor) {  // (x's numel: one sample's; traced, a guard on it, the batch kept symbolic)
    grad_factor = lsq_default_grad_factor(
        static_cast<double>(x.sym_numel().guard_int(__FILE__, __LINE__) * quant_max));
  }
  const at::Tensor xb = leading(x, level);
  const auto [s, z] = qparams_blocking(xb.dim() - 1, level, scale, zero_point, false);
  return makeBatched(with_batch_note([&] {
                       return call_lsq_fake_quant(xb, s, z, quant_min, quant_max, grad_factor, eps);
                     }),
                     0, level.id);
}

// The qparams' gradients are per sample: one block per sample, shared qparams too, each
// sample's sums in its qparam's own shape. An output not asked for stays unbatched.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_batched(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, bool scale_grad,
    bool zero_point_grad) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const auto found = batched_level({grad, x, scale, zero_point});
  if (!found) {
    return call_fake_quant_backward(grad, x, scale, zero_point, quant_min, quant_max, scale_grad,
                                    zero_point_grad);
  }
  const VmapLevel& level = *found;
  const at::Tensor gb = leading(grad, level), xb = leading(x, level);
  const auto [s, z] = qparams_blocking(xb.dim() - 1, level, scale, zero_point,
                                       scale_grad || zero_point_grad);
  auto [grad_x, grad_s, grad_z] = with_batch_note([&] {
    return call_fake_quant_backward(gb, xb, s, z, quant_min, quant_max, scale_grad,
                                    zero_point_grad);
  });
  const auto per_sample = [&](const at::Tensor& sums, const at::Tensor& qparam) {
    return makeBatched(sums.reshape_symint(leading(qparam, level).sym_sizes()), 0, level.id);
  };
  return {makeBatched(grad_x, 0, level.id), scale_grad ? per_sample(grad_s, scale) : grad_s,
          zero_point_grad ? per_sample(grad_z, zero_point) : grad_z};
}

at::Tensor fake_quant_mask_backward_batched(const at::Tensor& grad, const at::Tensor& mask) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const auto found = batched_level({grad, mask});
  if (!found) return call_fake_quant_mask_backward(grad, mask);
  const VmapLevel& level = *found;
  const at::Tensor gb = leading(grad, level), mb = leading(mask, level);
  return makeBatched(with_batch_note([&] { return call_fake_quant_mask_backward(gb, mb); }), 0,
                     level.id);
}

// The frozen-weight Linears (boxed: one rule for int8_linear, int8_linear_packed and
// linear_4bit, x their first argument, one tensor returned).
void linear_batched(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const size_t n_args = op.schema().arguments().size();
  const size_t first = stack->size() - n_args;
  std::vector<at::Tensor> tensors;
  for (size_t i = first; i < stack->size(); ++i) {
    if ((*stack)[i].isTensor()) tensors.push_back((*stack)[i].toTensor());
  }
  const auto found = batched_level(tensors);
  if (!found) return op.callBoxed(stack);
  const VmapLevel& level = *found;
  const at::Tensor x = (*stack)[first].toTensor();
  bool x_alone = batched_at(x, level) && x.dim() > 0;
  for (const at::Tensor& t : tensors) {
    x_alone = x_alone && (t.is_same(x) || !batched_at(t, level));
  }
  if (x_alone) {  // (dynamic activation scales are per row, a static one shared by the batch)
    (*stack)[first] = leading(x, level);
    with_batch_note([&] { op.callBoxed(stack); });
    stack->back() = makeBatched(stack->back().toTensor(), 0, level.id);
    return;
  }
  const int64_t batch = level.batch.guard_int(__FILE__, __LINE__);
  TORCH_CHECK(batch > 0, op.schema().name(),
              ": under torch.vmap, an empty batch is supported where x alone is batched");
  const std::vector<c10::IValue> args(stack->begin() + first, stack->end());
  stack->resize(first);
  std::vector<at::Tensor> outputs;
  for (int64_t i = 0; i < batch; ++i) {
    torch::jit::Stack sample;
    for (const c10::IValue& a : args) {
      const bool per_sample = a.isTensor() && batched_at(a.toTensor(), level);
      sample.push_back(per_sample ? c10::IValue(leading(a.toTensor(), level).select(0, i)) : a);
    }
    op.callBoxed(&sample);
    outputs.push_back(sample.back().toTensor());
  }
  stack->push_back(makeBatched(at::stack(outputs), 0, level.id));
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, FuncTorchBatched, m) {
  m.impl("fake_quant", &fake_quant_batched);
  m.impl("fake_quant_with_mask", &fake_quant_with_mask_batched);
  m.impl("fake_quant_backward", &fake_quant_backward_batched);
  m.impl("fake_quant_mask_backward", &fake_quant_mask_backward_batched);
  m.impl("lsq_fake_quant", &lsq_fake_quant_batched);
  for (const char* linear : {"int8_linear", "int8_linear_packed", "linear_4bit"}) {
    m.impl(linear, torch::CppFunction::makeFromBoxedFunction<&linear_batched>());
  }
}

}  // namespace qlib
