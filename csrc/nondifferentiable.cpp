// The Autograd kernel of the ops whose outputs carry no gradient: qparams, observer statistics
// and codes (as torch.ao's observers and torch's choose_qparams ops). They run below autograd,
// so their float outputs never require grad; without a kernel here torch's fallback marked them
// as requiring grad and gave their inputs no gradient, with only a warning. dequantize has its
// own kernel (affine_autograd.cpp); dequantize_4bit and linear_4bit raise for absmax / codebook
// (fourbit_autograd.cpp).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

namespace qlib {
namespace {

void below_autograd(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView guard;
  op.callBoxed(stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, Autograd, m) {
  for (const char* name :
       {"choose_qparams", "observer_qparams", "quantize", "quantize_per_token", "block_minmax",
        "histogram_observe", "histogram_rebin", "histogram_quantile", "histogram_mse_search",
        "histogram_entropy_search", "quantize_4bit"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&below_autograd>());
  }
}

}  // namespace qlib
