// The Autograd kernel of the ops whose outputs carry no gradient: qparams, observer statistics
// and codes (as torch.ao's observers and torch's choose_qparams ops), the fake_quant backward
// ops, and the observers' in-place updates. They run below autograd, so their float outputs
// never require grad; without a kernel here torch's fallback marked them as requiring grad and
// gave their inputs no gradient, with only a warning. dequantize has its own kernel
// (affine_autograd.cpp); dequantize_4bit and linear_4bit raise for absmax / codebook
// (fourbit_autograd.cpp).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

namespace qlib {
namespace {

void below_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.callBoxed(stack);
}

// An op that writes its (a!) arguments in place (minmax_observe, histogram_observe_in_place):
// as torch's in-place ops, a written tensor may not require grad, nor be a negative / conjugate
// view, and its version counter moves (so autograd sees the change; an inference tensor, made
// under inference_mode, has no counter and is written as before).
void in_place_below_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const size_t first = stack->size() - args.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < args.size(); ++i) {
    const c10::IValue& v = (*stack)[first + i];
    if (!args[i].alias_info() || !args[i].alias_info()->isWrite() || !v.isTensor()) continue;
    const at::Tensor& t = v.toTensor();
    TORCH_CHECK(!t.requires_grad(), op.schema().name(), ": ", args[i].name(),
                " is written in place and must not require grad");
    TORCH_CHECK(!t.is_neg() && !t.is_conj(), op.schema().name(), ": ", args[i].name(),
                " is written in place and must not be a negative or conjugate view "
                "(resolve_neg() / resolve_conj() it first)");
    written.push_back(t);
  }
  below_autograd(op, stack);
  for (const at::Tensor& t : written) {
    if (!t.is_inference()) torch::autograd::impl::bump_version(t);  // (inference tensors have none)
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, Autograd, m) {
  for (const char* name :
       {"choose_qparams", "observer_qparams", "quantize", "quantize_per_token", "block_minmax",
        "histogram_observe", "histogram_rebin", "histogram_quantile", "histogram_mse_search",
        "histogram_entropy_search", "quantize_4bit",
        // (fake_quant's own double backward differentiates grad * mask, affine_autograd.cpp: on
        // the fallback, a grad that required grad got None back silently, with a warning)
        "fake_quant_backward", "fake_quant_mask_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&below_autograd>());
  }
  for (const char* name : {"minmax_observe", "histogram_observe_in_place"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&in_place_below_autograd>());
  }
}

}  // namespace qlib
