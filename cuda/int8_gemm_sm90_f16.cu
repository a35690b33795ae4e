// int8_linear_sm90's kernels for one output dtype (int8_gemm_sm90.cuh).
#include "int8_gemm_sm90.cuh"

namespace qlib {

void int8_linear_sm90_f16(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                         const at::Tensor& w_scale, const at::Tensor& bias, at::Tensor& out) {
  sm90::run_for_m<cutlass::half_t>(a, b, a_scale, w_scale, bias, out);
}

}  // namespace qlib
