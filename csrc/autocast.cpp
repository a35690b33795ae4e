// Autocast kernels of the quantized Linears (int8_linear, int8_linear_packed, linear_4bit):
// under torch.autocast they are matmuls, as F.linear, so x is cast to the autocast dtype
// (bfloat16 / float16; float64 and other devices' tensors are left alone, as torch's own
// casts do) and the output comes in that dtype. Weights, scales and bias are not cast: the
// kernels read them as they are. The other ops keep autocast's fallthrough.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace qlib {
namespace {

template <c10::DeviceType D>
void cast_x_to_autocast_dtype(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      at::autocast::get_autocast_dispatch_key_from_device_type(D));
  c10::IValue& x = (*stack)[stack->size() - op.schema().arguments().size()];  // (x is first)
  if (x.isTensor()) {
    x = at::autocast::cached_cast(at::autocast::get_lower_precision_fp_from_device_type(D),
                                  x.toTensor(), D);
  }
  op.callBoxed(stack);
}

template <c10::DeviceType D>
void register_autocast(torch::Library& m) {
  for (const char* name : {"int8_linear", "int8_linear_packed", "linear_4bit"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cast_x_to_autocast_dtype<D>>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU>(m); }
TORCH_LIBRARY_IMPL(qlib, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA>(m); }

}  // namespace qlib
