// Device-independent argument checks of the 4-bit ops (quantize_4bit, dequantize_4bit,
// linear_4bit), shared by csrc/fourbit_cpu.cpp and cuda/fourbit_cuda.cu.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "quant_math.h"

namespace qlib {

inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // (a + b - 1 overflows)

// The CPU kernel family of linear_4bit and dequantize_4bit (fourbit_cpu.cpp), each running what
// the one before does plus its own: "scalar"; "avx512" (float32 decode and dots; a bfloat16 x
// decodes to float32); "avx512-bf16" (a bfloat16 x gets bfloat16 W_hat and vdpbf16ps dots);
// "amx-bf16" (a bfloat16 x of up to kAmxMaxM rows on the AMX tile unit). The best this CPU
// runs, unless QLIB_FOURBIT_CPU_KERNEL or set_fourbit_cpu_kernel names another.
enum class FourbitKernel : int { kScalar, kAvx512, kAvx512Bf16, kAmxBf16 };
std::string fourbit_cpu_kernel();
std::vector<std::string> fourbit_cpu_kernels();  // what this CPU can run
void set_fourbit_cpu_kernel(const std::string& name);  // "auto" or a name; raises if unsupported

// A 16-value float32 codebook on `device`. Its values are checked by quantize_4bit only.
inline void check_codebook(const char* op, const at::Tensor& codebook, const at::Device& device) {
  TORCH_CHECK(codebook.scalar_type() == at::kFloat && codebook.dim() == 1 &&
                  codebook.size(0) == kCodebookSize,
              op, ": codebook must be float32 of shape [16], got ", codebook.scalar_type(),
              " of shape ", codebook.sizes());
  TORCH_CHECK(codebook.device() == device, op, ": codebook is on ", codebook.device(),
              " but the weight is on ", device);
}

inline void check_block_size(const char* op, int64_t block_size) {
  TORCH_CHECK(block_size >= 1 && block_size <= (int64_t{1} << 24), op,
              ": block_size must be in [1, 2^24], got ", block_size);
}

// ceil(a / b) of a size that may be traced (symbolic): concrete sizes take ceil_div.
inline c10::SymInt sym_ceil_div(const c10::SymInt& a, int64_t b) {
  if (const auto v = a.maybe_as_int()) return c10::SymInt(ceil_div(*v, b));
  return (a + (b - 1)) / b;
}

// A packed 4-bit weight of in_features K: packed uint8 [N, ceil(K / 2)] and absmax float32
// [N, ceil(K / block_size)] on one device. Returns N. Sym sizes: the fakes run it on traced
// tensors, whose N and K stay unguarded (size() would specialise them: a recompile per weight
// shape, and torch.export refused a dynamic N or K).
inline c10::SymInt check_packed_4bit_sym(const char* op, const at::Tensor& packed,
                                         const at::Tensor& absmax, const at::Tensor& codebook,
                                         const c10::SymInt& in_features, int64_t block_size) {
  check_block_size(op, block_size);
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, op,
              ": packed must be uint8 [out_features, ceil(in_features / 2)], got ",
              packed.scalar_type(), " of shape ", packed.sym_sizes());
  const c10::SymInt N = packed.sym_size(0);
  const c10::SymInt row_bytes = sym_ceil_div(in_features, 2);
  TORCH_CHECK(packed.sym_size(1) == row_bytes, op, ": packed of shape ", packed.sym_sizes(),
              " does not hold in_features = ", in_features, " (needs ", row_bytes,
              " bytes a row)");
  const c10::SymInt blocks = sym_ceil_div(in_features, block_size);
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.dim() == 2 &&
                  absmax.sym_size(0) == N && absmax.sym_size(1) == blocks,
              op, ": absmax must be float32 [", N, ", ", blocks,
              "] (out_features, ceil(in_features / block_size) with block_size = ", block_size,
              "), got ", absmax.scalar_type(), " of shape ", absmax.sym_sizes());
  TORCH_CHECK(absmax.device() == packed.device(), op, ": absmax is on ", absmax.device(),
              " but packed is on ", packed.device());
  check_codebook(op, codebook, packed.device());
  return N;
}

// dequantize_4bit: the packed weight as above, and a float32 / float16 / bfloat16 dtype.
// (The fake's checks: sym sizes.)
inline void check_dequantize_4bit_meta(const char* op, const at::Tensor& packed,
                                       const at::Tensor& absmax, const at::Tensor& codebook,
                                       const c10::SymInt& in_features, int64_t block_size,
                                       at::ScalarType dtype) {
  check_packed_4bit_sym(op, packed, absmax, codebook, in_features, block_size);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
}

// As check_dequantize_4bit_meta, for the kernels. Returns N.
inline int64_t check_dequantize_4bit_args(const char* op, const at::Tensor& packed,
                                          const at::Tensor& absmax, const at::Tensor& codebook,
                                          int64_t in_features, int64_t block_size,
                                          at::ScalarType dtype) {
  check_dequantize_4bit_meta(op, packed, absmax, codebook, in_features, block_size, dtype);
  return packed.size(0);
}

// The error for a non-finite weight w[n, k] (quantize_4bit).
[[noreturn]] inline void fail_non_finite_weight(const char* op, double value, int64_t n, int64_t k) {
  TORCH_CHECK(false, op, ": w must be finite, got ", value, " at [", n, ", ", k, "]");
  TORCH_INTERNAL_ASSERT(false);  // (TORCH_CHECK(false) throws; this tells the compiler)
}

// quantize_4bit's checks that read no values: w float32 / float16 / bfloat16 [N, K], the block
// size, the codebook's shape and device (the fake runs them on traced tensors).
inline void check_quantize_4bit_meta(const char* op, const at::Tensor& w,
                                     const at::Tensor& codebook, int64_t block_size) {
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kHalf ||
                  w.scalar_type() == at::kBFloat16,
              op, ": w must be float32, float16 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == 2, op, ": w must be 2-D [out_features, in_features], got shape ",
              w.sym_sizes());
  check_block_size(op, block_size);
  check_codebook(op, codebook, w.device());
}

// quantize_4bit: as check_quantize_4bit_meta, and w's values finite (on CUDA one host read: it
// runs once, at conversion), a finite, strictly increasing codebook. Returns the codebook's
// midpoints (codebook_midpoints) for the kernels.
inline std::array<float, kCodebookSize - 1> check_quantize_4bit_args(const char* op,
                                                                    const at::Tensor& w,
                                                                    const at::Tensor& codebook,
                                                                    int64_t block_size) {
  check_quantize_4bit_meta(op, w, codebook, block_size);
  const at::Tensor cb = codebook.contiguous().cpu();  // (.cpu() of a CPU view is the view)
  const float* c = cb.const_data_ptr<float>();
  for (int j = 0; j < kCodebookSize; ++j) {
    TORCH_CHECK(std::isfinite(c[j]) && (j == 0 || c[j - 1] < c[j]), op,
                ": codebook must be finite and strictly increasing, got ",
                c10::ArrayRef<float>(c, kCodebookSize));
  }
  if (!w.is_cpu() && w.numel() > 0) {  // (the CPU kernel checks as it reads w)
    const at::Tensor bad = ~at::isfinite(w);
    if (bad.any().item<bool>()) {
      const int64_t i = bad.reshape(-1).nonzero().select(0, 0).item<int64_t>();
      fail_non_finite_weight(op, w.reshape(-1)[i].item<double>(), i / w.size(1), i % w.size(1));
    }
  }
  std::array<float, kCodebookSize - 1> mid{};
  codebook_midpoints(c, mid.data());
  return mid;
}

// linear_4bit: x float32 / float16 / bfloat16 [..., K], the packed weight of in_features K,
// bias (optional) floating [N]. (Sym sizes: the fake runs it on traced tensors, whose dims,
// x's batch and the weight's N and K, stay unguarded.)
inline void check_linear_4bit_meta(const char* op, const at::Tensor& x, const at::Tensor& packed,
                                   const at::Tensor& absmax, const at::Tensor& codebook,
                                   int64_t block_size, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension, got a scalar");
  TORCH_CHECK(x.device() == packed.device(), op, ": x is on ", x.device(), " but packed is on ",
              packed.device());
  const c10::SymInt N =
      check_packed_4bit_sym(op, packed, absmax, codebook, x.sym_size(-1), block_size);
  if (bias.has_value()) {
    TORCH_CHECK(at::isFloatingType(bias->scalar_type()) && bias->dim() == 1 &&
                    bias->sym_size(0) == N,
                op, ": bias must be floating of shape [", N, "], got ", bias->scalar_type(),
                " of shape ", bias->sym_sizes());
    TORCH_CHECK(bias->device() == x.device(), op, ": bias is on ", bias->device(),
                " but x is on ", x.device());
  }
}

// As check_linear_4bit_meta, for the kernels. Returns N.
inline int64_t check_linear_4bit_args(const char* op, const at::Tensor& x, const at::Tensor& packed,
                                      const at::Tensor& absmax, const at::Tensor& codebook,
                                      int64_t block_size, const std::optional<at::Tensor>& bias) {
  check_linear_4bit_meta(op, x, packed, absmax, codebook, block_size, bias);
  return packed.size(0);
}

// linear_4bit's output shape: x's, with the last dim N.
inline std::vector<int64_t> linear_4bit_out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// linear_4bit's output when there is nothing to sum (no rows, no columns or K = 0): the bias
// through float32 (a copy, never a view of it), or zeros, in x's dtype.
inline at::Tensor linear_4bit_empty_sum(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                        const std::vector<int64_t>& shape) {
  at::Tensor out = at::zeros(shape, x.options());
  if (bias.has_value()) out.copy_(bias->to(at::kFloat).expand(shape));
  return out;
}

}  // namespace qlib
