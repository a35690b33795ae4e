// Device-independent parts of the affine ops: argument checks with messages
// that name the op, and the preparation every CPU and CUDA kernel shares
// (contiguous x, float32 scale and zero point, the block layout).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "block_layout.h"

#include <optional>
#include <vector>

// The data types the ops take: floats for x, integers for codes.
#define QLIB_DISPATCH_FLOAT(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

#define QLIB_DISPATCH_QINT(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                              \
                     AT_DISPATCH_CASE(at::kChar, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kByte, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kShort, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kInt, __VA_ARGS__))

namespace qlib {

// Checked, prepared arguments of an affine op. The kernels read x as a contiguous tensor: the
// given x, or, where it is dense in another dim order (x.t(), channels_last, a transposed head
// dim), the given x with its dims permuted (`dims`), with no copy; any other x is first copied
// as torch.empty_like would lay it out. scale and zero_point are permuted alike. Outputs are
// made with `empty_like_x` and returned through `in_given_order`: they have the strides of
// torch.empty_like(given x), as the ops' fakes say.
struct AffineArgs {
  at::Tensor x;           // contiguous input, in the kernels' dim order
  at::Tensor scale;       // contiguous float32, the given scale's shape in that dim order
  at::Tensor zero_point;  // contiguous float32 holding integers in [qmin, qmax], likewise
  BlockLayout layout;
  float qmin, qmax;
  bool per_tensor;
  std::vector<int64_t> dims;  // x = given x (or its copy) permuted by dims; empty: no permutation

  // A new tensor of x's shape and strides in the kernels' order (the huge-page hint on the CPU).
  at::Tensor empty_like_x(const at::TensorOptions& options) const;
  // An output of x's shape, in the given dim order.
  at::Tensor in_given_order(const at::Tensor& out) const;
  // A qparam-shaped tensor (a scale, zero point or a gradient of one) from the given dim order
  // to the kernels' (contiguous), and back (a view).
  at::Tensor arranged_qparam(const at::Tensor& t) const;
  at::Tensor qparam_in_given_order(const at::Tensor& t) const;
  // Another x-shaped input (fake_quant_backward's grad) in the kernels' order, contiguous.
  at::Tensor arranged_like_x(const at::Tensor& t) const;
};

// The checks of check_affine_args that read neither values nor concrete sizes (dtypes, devices,
// scale's blocks of x): the ops' fakes run them on traced tensors too.
void check_affine_meta(const char* op, const char* x_name, const at::Tensor& x,
                       const at::Tensor& scale, const at::Tensor& zero_point);

// The argument checks and block layout of prepare_affine, without converting
// or reading the qparams: a.scale and a.zero_point are the given tensors.
AffineArgs check_affine_args(const char* op, const char* x_name, const at::Tensor& x,
                             const at::Tensor& scale, const at::Tensor& zero_point,
                             int64_t quant_min, int64_t quant_max);

// Checks and prepares the arguments; `op` and `x_name` name them in errors.
// check_values (scale > 0 and finite, zero_point in range) reads the values,
// a host sync on CUDA.
AffineArgs prepare_affine(const char* op, const char* x_name, const at::Tensor& x,
                          const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
                          int64_t quant_max, bool check_values = true);

// quant_min < quant_max, at most 16 bits wide.
void check_quant_range(const char* op, int64_t quant_min, int64_t quant_max);
// The floor of a scale (choose_qparams, observer_qparams, lsq_fake_quant): finite, >= kMinScale.
void check_eps(const char* op, double eps);
// x is float32, float16 or bfloat16.
void check_fake_quant_input(const char* op, const at::Tensor& x);
// x is float32/float16/bfloat16; dtype is int8/uint8/int16/int32 and holds [quant_min, quant_max].
void check_quantize_args(const char* op, const at::Tensor& x, at::ScalarType dtype,
                         int64_t quant_min, int64_t quant_max);
// q is int8/uint8/int16/int32 and dtype floating; returns the range of q's dtype.
std::pair<int64_t, int64_t> check_dequantize_args(const char* op, const at::Tensor& q,
                                                  at::ScalarType dtype);
// choose_qparams / observer_qparams (op names the op); check_values (CPU min and max only):
// finite min <= max. The CPU kernel checks the span a float32 scale holds as it computes it.
void check_choose_qparams_args(const char* op, const at::Tensor& min, const at::Tensor& max,
                               int64_t quant_min, int64_t quant_max, double eps,
                               bool check_values);
// The CUDA value checks of choose_qparams / observer_qparams, after the kernel, in one host
// read: finite min <= max (when check_order) and a finite scale everywhere (a span too wide
// for a float32 scale gives Inf).
void check_chosen_qparams(const char* op, const at::Tensor& min, const at::Tensor& max,
                          const at::Tensor& scale, bool check_order, int64_t quant_min,
                          int64_t quant_max);

// The fake-quant ops through the dispatcher (autograd included), for C++ callers
// (affine_autograd.cpp, vmap_rules.cpp, minmax_fake_quant.cpp).
at::Tensor call_fake_quant(const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max);
std::tuple<at::Tensor, at::Tensor> call_fake_quant_with_mask(const at::Tensor& x,
                                                             const at::Tensor& scale,
                                                             const at::Tensor& zero_point,
                                                             int64_t quant_min,
                                                             int64_t quant_max);
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fake_quant_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, bool scale_grad,
    bool zero_point_grad);
at::Tensor call_fake_quant_mask_backward(const at::Tensor& grad, const at::Tensor& mask);
at::Tensor call_lsq_fake_quant(const at::Tensor& x, const at::Tensor& scale,
                               const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                               std::optional<double> grad_factor, double eps);

// lsq_fake_quant's arguments, less the values fake_quant checks (its fake runs this too).
void check_lsq_args(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                    int64_t quant_min, int64_t quant_max, std::optional<double> grad_factor,
                    double eps);

// fake_quant_backward: grad matches x (shape, dtype, device), x and range valid.
void check_fake_quant_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                    const at::Tensor& zero_point, int64_t quant_min,
                                    int64_t quant_max, bool zero_point_grad);
// fake_quant_mask_backward: a float32/float16/bfloat16 grad, a bool mask of its shape and device.
void check_fake_quant_mask_backward_args(const at::Tensor& grad, const at::Tensor& mask);
// Checked, with grad and mask in out's layout (mask's where it is dense; grad_x = out, empty):
// the kernels index all three flat.
struct MaskBackwardArgs {
  at::Tensor grad, mask, out;
};
MaskBackwardArgs prepare_fake_quant_mask_backward(const at::Tensor& grad, const at::Tensor& mask);
// Sums a per-element tensor (x's shape) over each block of scale: scale's shape.
at::Tensor sum_over_blocks(const at::Tensor& per_element, const at::Tensor& scale);
// Its inverse: a qparam (scale's shape) expanded over its blocks to x's shape (a view of it where
// one exists), differentiable.
at::Tensor expand_over_blocks(const at::Tensor& qparam, const at::Tensor& x);
// fake_quant_backward's outputs: grad_x (in the kernels' order), and the LSQ gradients summed
// over each block (scale's numel in the kernels' order, any floating dtype; undefined when not
// asked for) in the dtype and shape of scale and zero_point, or an empty float32 tensor where
// not asked for.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_outputs(
    const AffineArgs& a, const at::Tensor& grad_x, const at::Tensor& grad_scale_sums,
    const at::Tensor& grad_zp_sums, const at::Tensor& scale, const at::Tensor& zero_point);

// CUDA fake_quant / fake_quant_backward: raise on bad qparam values (a host sync
// per call) instead of giving NaN for the blocks they cover. Off by default;
// qlib.set_cuda_value_checks.
void set_cuda_value_checks(bool enabled);
bool cuda_value_checks();

// 16-byte packs each thread of the CUDA fake_quant kernels loads before it computes
// (1, 2 or 4; default 1). A tuning knob for the GPU benchmark: more packs in flight per
// thread may hide more memory latency where per-block qparams lengthen each iteration.
void set_fake_quant_cuda_packs(int64_t packs);
int64_t fake_quant_cuda_packs();

}  // namespace qlib
