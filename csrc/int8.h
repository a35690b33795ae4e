// Device-independent argument checks of the int8 ops (quantize_per_token,
// int8_gemm, int8_linear), shared by csrc/int8_cpu.cpp and cuda/int8_cuda.cu.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "kernel_choice.h"
#include "quant_math.h"

namespace qlib {

// The int8 CPU GEMM kernel family (int8_cpu.cpp): the best this CPU runs, chosen once, or
// set by name ("vnni-emulated" runs the VNNI layout with AVX2 ops: tests, any AVX2 CPU;
// "amx" uses the AMX-INT8 tile unit where the CPU and the OS allow it).
enum class Int8Kernel : int { kAvx2, kVnniEmulated, kAvxVnni, kAvx512Vnni, kAmx };
Int8Kernel current_int8_kernel();
std::string int8_cpu_kernel();
std::vector<std::string> int8_cpu_kernels();  // what this CPU can run
void set_int8_cpu_kernel(const std::string& name);  // "auto" or a name; raises if unsupported
// Whether int8_pack_weight copies a weight into the current kernel's panels (an Int8Linear then
// keeps only those), or keeps only a tag (QLIB_INT8_PACKED_COPY; raises on a bad value).
bool int8_packed_copy();
// qlib::int8_unpack_weight through the dispatcher (int8_autograd.cpp): a packing's weight [N, K].
at::Tensor int8_unpack_weight(const at::Tensor& w_packed, const c10::SymInt& N, const c10::SymInt& K);

// The CUDA int8_linear GEMM for M > 4 (csrc/int8_cuda_gemm.cpp): cuBLASLt, or the fused
// Hopper kernel when built; kAuto (built with it): the fused one on compute capability 9.0.
enum class Int8CudaGemm : int { kCublasLt, kCutlassSm90, kAuto };
Int8CudaGemm current_int8_cuda_gemm();
std::string int8_cuda_gemm();
std::vector<std::string> int8_cuda_gemms();  // what this build has
void set_int8_cuda_gemm(const std::string& name);  // "auto" or a name; raises if not built

inline void check_int8_float_input(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              op, ": ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": ", name, " must have at least one dimension, got a scalar");
}

inline void check_int8_gemm_args(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == at::kChar, op, ": a must be int8, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == at::kChar, op, ": b must be int8, got ", b.scalar_type());
  TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D [M, K], got shape ", a.sym_sizes());
  TORCH_CHECK(b.dim() == 2, op, ": b must be 2-D [N, K] (the F.linear weight layout), got shape ",
              b.sym_sizes());
  TORCH_CHECK(a.sym_size(1) == b.sym_size(1), op, ": a [M, K] = ", a.sym_sizes(), " and b [N, K] = ",
              b.sym_sizes(), " disagree on K");
  TORCH_CHECK(a.device() == b.device(), op, ": a is on ", a.device(), " but b is on ",
              b.device());
  TORCH_CHECK(a.sym_size(1) <= kInt8GemmMaxK, op, ": K = ", a.sym_size(1),
              " is too long for exact int32 accumulation; int8 dot products are exact for K <= ",
              kInt8GemmMaxK, " (2^17 - 1: at K = 2^17, (-128) * (-128) * K = 2^31 overflows)");
}

// Checks int8_linear's arguments (not the values of act_scale / act_zero_point). Sym sizes:
// the fakes run it on traced tensors too.
inline void check_int8_linear_args(const char* op, const at::Tensor& x, const at::Tensor& w,
                                      const at::Tensor& w_scale,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& act_scale,
                                      const std::optional<at::Tensor>& act_zero_point,
                                      int64_t act_quant_min, int64_t act_quant_max) {
  check_int8_float_input(op, "x", x);
  TORCH_CHECK(w.scalar_type() == at::kChar, op, ": w_int8 must be int8, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2, op, ": w_int8 must be 2-D [N, K], got shape ", w.sym_sizes());
  const c10::SymInt n = w.sym_size(0), k = w.sym_size(1);
  TORCH_CHECK(x.sym_size(-1) == k, op, ": x of shape ", x.sym_sizes(), " has ", x.sym_size(-1),
              " features but w_int8 of shape ", w.sym_sizes(), " expects K = ", k);
  TORCH_CHECK(k <= kInt8GemmMaxK, op, ": K = ", k, " exceeds ", kInt8GemmMaxK,
              ", the longest int8 dot product that is exact in int32");
  TORCH_CHECK(w.device() == x.device(), op, ": w_int8 is on ", w.device(), " but x is on ",
              x.device());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat, op, ": w_scale must be float32, got ",
              w_scale.scalar_type());
  TORCH_CHECK(w_scale.sym_numel() == n && (w_scale.dim() == 1 || (w_scale.dim() == 2 &&
                                                                  w_scale.sym_size(1) == 1)),
              op, ": w_scale must hold one scale per output channel, shape [N] or [N, 1] with N = ",
              n, ", got shape ", w_scale.sym_sizes());
  TORCH_CHECK(w_scale.device() == x.device(), op, ": w_scale is on ", w_scale.device(),
              " but x is on ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->sym_size(0) == n, op, ": bias must have shape [", n,
                "], got ", bias->sym_sizes());
    TORCH_CHECK(bias->is_floating_point(), op, ": bias must be floating point, got ",
                bias->scalar_type());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(),
                " but x is on ", x.device());
  }
  if (act_scale.has_value()) {
    TORCH_CHECK(act_scale->sym_numel() == 1, op,
                ": act_scale must hold one (per-tensor) scale, got shape ", act_scale->sym_sizes());
    TORCH_CHECK(act_scale->scalar_type() == at::kFloat, op, ": act_scale must be float32, got ",
                act_scale->scalar_type());
    TORCH_CHECK(act_scale->device() == x.device(), op, ": act_scale is on ",
                act_scale->device(), " but x is on ", x.device());
    TORCH_CHECK(-128 <= act_quant_min && act_quant_min < act_quant_max && act_quant_max <= 127,
                op, ": the activation range [act_quant_min, act_quant_max] = [", act_quant_min,
                ", ", act_quant_max, "] must be non-empty and inside int8 [-128, 127]");
  } else {
    TORCH_CHECK(!act_zero_point.has_value() && act_quant_min == kInt8ActQmin &&
                    act_quant_max == kInt8ActQmax,
                op, ": dynamic (per-token) activations are symmetric on [", kInt8ActQmin, ", ",
                kInt8ActQmax, "]; act_zero_point and another range need a static act_scale (got",
                act_zero_point.has_value() ? " an act_zero_point," : "", " range [",
                act_quant_min, ", ", act_quant_max, "])");
  }
  if (act_zero_point.has_value()) {
    TORCH_CHECK(act_zero_point->sym_numel() == 1, op,
                ": act_zero_point must hold one (per-tensor) zero point, got shape ",
                act_zero_point->sym_sizes());
    TORCH_CHECK(act_zero_point->scalar_type() == at::kInt ||
                    act_zero_point->scalar_type() == at::kLong,
                op, ": act_zero_point must be int32 or int64, got ", act_zero_point->scalar_type());
    TORCH_CHECK(act_zero_point->device() == x.device(), op, ": act_zero_point is on ",
                act_zero_point->device(), " but x is on ", x.device());
  }
}

// Shape of int8_linear's output: x's leading dims, then N.
inline std::vector<int64_t> int8_linear_out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

}  // namespace qlib
