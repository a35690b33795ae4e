// The fused Hopper int8 GEMM's host side: the TMA fit check and the dispatch by output dtype
// to int8_gemm_sm90_{bf16,f16,f32}.cu (the kernels: int8_gemm_sm90.cuh).
#include <cstdint>

#include <ATen/ATen.h>

#include "int8_sm90.h"
#include "pack.cuh"

namespace qlib {

bool int8_linear_sm90_fits(const at::Tensor& b, const at::Tensor& out) {
  // Rows must not overlap (an expanded weight has row stride 0): TMA would take the
  // descriptor, or fail it only by an assert that NDEBUG removes.
  return b.size(1) > 0 && b.size(1) % 16 == 0 && b.stride(1) == 1 && b.stride(0) % 16 == 0 &&
         b.stride(0) >= b.size(1) &&
         aligned16(b.const_data_ptr()) && out.dim() == 2 && out.stride(1) == 1 &&
         (out.stride(0) * out.element_size()) % 16 == 0 && aligned16(out.const_data_ptr()) &&
         out.size(0) <= INT32_MAX && out.size(1) <= INT32_MAX;
}

void int8_linear_sm90(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_in,
                      const at::Tensor& w_scale_in, const at::Tensor& bias_in, at::Tensor& out) {
  // The broadcast nodes read the scales and the bias 16 bytes at a time: copy a view that
  // starts off a 16-byte boundary (a misaligned load would end the CUDA context).
  const auto aligned_copy = [](const at::Tensor& t) {
    return !t.defined() || aligned16(t.const_data_ptr()) ? t : t.clone();
  };
  const at::Tensor a_scale = aligned_copy(a_scale_in), w_scale = aligned_copy(w_scale_in),
                   bias = aligned_copy(bias_in);
  switch (out.scalar_type()) {
    case at::kBFloat16: return int8_linear_sm90_bf16(a, b, a_scale, w_scale, bias, out);
    case at::kHalf: return int8_linear_sm90_f16(a, b, a_scale, w_scale, bias, out);
    case at::kFloat: return int8_linear_sm90_f32(a, b, a_scale, w_scale, bias, out);
    default: TORCH_CHECK(false, "qlib::int8_linear (sm90 GEMM): unsupported output dtype ",
                         out.scalar_type());
  }
}

}  // namespace qlib
