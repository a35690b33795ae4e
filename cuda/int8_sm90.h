// The fused Hopper int8 GEMM (cuda/int8_gemm_sm90.cu), built when setup.py defines
// QLIB_WITH_SM90_GEMM (CUTLASS found and 9.0a in TORCH_CUDA_ARCH_LIST).
#pragma once

#include <ATen/ATen.h>

namespace qlib {

// True when the weight b [N, K] (int8) and out [M, N] meet the kernel's TMA rules: K > 0 a
// multiple of 16, K-contiguous rows, 16-byte aligned pointers and row strides, M and N
// within int32. (The activations are qlib's own [M, K] buffer, which always does.)
bool int8_linear_sm90_fits(const at::Tensor& b, const at::Tensor& out);

// out = float(a . b^T) * (a_scale[m] * w_scale[n]) + bias[n] (bias may be undefined), in
// out's dtype (float32, float16, bfloat16); a_scale [M], w_scale [N], bias [N]: float32.
void int8_linear_sm90(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                      const at::Tensor& w_scale, const at::Tensor& bias, at::Tensor& out);

}  // namespace qlib
