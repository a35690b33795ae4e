#include "affine.h"
#include "cpu_output.h"
#include "quant_math.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <string>
#include <string_view>

namespace qlib {

namespace {
std::atomic<bool> g_cuda_value_checks{false};
std::atomic<int64_t> g_fake_quant_cuda_packs{1};
}

void set_cuda_value_checks(bool enabled) { g_cuda_value_checks = enabled; }
bool cuda_value_checks() { return g_cuda_value_checks; }

void set_fake_quant_cuda_packs(int64_t packs) {
  TORCH_CHECK(packs == 1 || packs == 2 || packs == 4,
              "qlib.set_fake_quant_cuda_packs: packs must be 1, 2 or 4, got ", packs);
  g_fake_quant_cuda_packs = packs;
}
int64_t fake_quant_cuda_packs() { return g_fake_quant_cuda_packs; }

void check_eps(const char* op, double eps) {
  // As float32 (the kernels' type), normal: then 1 / eps is finite too.
  const float e = static_cast<float>(eps);
  TORCH_CHECK(std::isfinite(e) && e >= kMinScale, op,
              ": eps must be positive and finite in float32, at least ", kMinScale,
              " (the smallest normal float32), got ", eps);
}

void check_quant_range(const char* op, int64_t quant_min, int64_t quant_max) {
  TORCH_CHECK(quant_min < quant_max, op, ": quant_min (", quant_min,
              ") must be less than quant_max (", quant_max, ")");
  // int32 first: then quant_max - quant_min cannot overflow int64.
  TORCH_CHECK(quant_min >= -(int64_t{1} << 31) && quant_max < (int64_t{1} << 31), op,
              ": the range [", quant_min, ", ", quant_max, "] does not fit in int32");
  TORCH_CHECK(quant_max - quant_min < (int64_t{1} << kMaxRangeBits), op,
              ": the range [", quant_min, ", ", quant_max, "] is wider than ", kMaxRangeBits,
              " bits");
  TORCH_CHECK(quant_min >= -kMaxExactCode && quant_max <= kMaxExactCode, op, ": the range [",
              quant_min, ", ", quant_max, "] reaches past +-(2^24 - 1) = +-", kMaxExactCode,
              ", where float32 math cannot hold every code exactly");
}

void check_fake_quant_input(const char* op, const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16, got ", t);
}

namespace {

std::pair<int64_t, int64_t> int_dtype_range(const char* op, const char* what,
                                            at::ScalarType t) {
  switch (t) {
    case at::kChar: return {-128, 127};
    case at::kByte: return {0, 255};
    case at::kShort: return {-32768, 32767};
    case at::kInt: return {INT32_MIN, INT32_MAX};
    default:
      TORCH_CHECK(false, op, ": ", what, " must be int8, uint8, int16 or int32, got ", t);
  }
}

}  // namespace

void check_quantize_args(const char* op, const at::Tensor& x, at::ScalarType dtype,
                         int64_t quant_min, int64_t quant_max) {
  check_fake_quant_input(op, x);
  check_quant_range(op, quant_min, quant_max);
  const auto [lo, hi] = int_dtype_range(op, "dtype", dtype);
  TORCH_CHECK(quant_min >= lo && quant_max <= hi, op, ": the range [", quant_min, ", ",
              quant_max, "] does not fit in ", dtype);
}

std::pair<int64_t, int64_t> check_dequantize_args(const char* op, const at::Tensor& q,
                                                  at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
  // The zero point must lie in this range: for int32 codes within +-(2^24 - 1) too,
  // so that float32 holds it exactly.
  const auto [lo, hi] = int_dtype_range(op, "q", q.scalar_type());
  return {std::max(lo, -kMaxExactCode), std::min(hi, kMaxExactCode)};
}

void check_choose_qparams_args(const char* op, const at::Tensor& min, const at::Tensor& max,
                               int64_t quant_min, int64_t quant_max, double eps,
                               bool check_values) {
  check_quant_range(op, quant_min, quant_max);
  TORCH_CHECK(at::isFloatingType(min.scalar_type()) && at::isFloatingType(max.scalar_type()), op,
              ": min and max must be floating, got ", min.scalar_type(), " and ",
              max.scalar_type());
  TORCH_CHECK(min.sym_sizes() == max.sym_sizes(), op, ": min of shape ", min.sym_sizes(),
              " differs from max of shape ", max.sym_sizes());
  TORCH_CHECK(min.device() == max.device(), op, ": min (", min.device(), ") and max (",
              max.device(), ") must be on the same device");
  check_eps(op, eps);
  if (!check_values || min.numel() == 0) return;
  TORCH_INTERNAL_ASSERT(min.is_cpu(), op, ": check_values is for CPU tensors");
  // A plain loop: no small ATen ops on the hot path.
  const at::Tensor lo = min.to(at::kFloat).contiguous(), hi = max.to(at::kFloat).contiguous();
  const float* lp = lo.const_data_ptr<float>();
  const float* hp = hi.const_data_ptr<float>();
  for (int64_t i = 0; i < lo.numel(); ++i) {
    TORCH_CHECK(std::isfinite(lp[i]) && std::isfinite(hp[i]) && lp[i] <= hp[i], op,
                ": need finite min <= max, got min = ", lp[i], ", max = ", hp[i],
                " at flat index ", i);
  }
}

void check_chosen_qparams(const char* op, const at::Tensor& min, const at::Tensor& max,
                          const at::Tensor& scale, bool check_order, int64_t quant_min,
                          int64_t quant_max) {
  if (scale.numel() == 0) return;
  const at::Tensor bad = check_order ? ~(at::isfinite(min) & at::isfinite(max) & (min <= max))
                                     : at::zeros_like(scale, scale.options().dtype(at::kBool));
  const at::Tensor wide = ~at::isfinite(scale);
  const at::Tensor any = at::stack({bad.any(), wide.any()}).cpu();
  for (const auto& [mask, k] : {std::pair<const at::Tensor&, int>{bad, 0}, {wide, 1}}) {
    if (!any[k].item<bool>()) continue;
    const int64_t i = mask.reshape(-1).nonzero().select(0, 0).item<int64_t>();
    const double lo = min.reshape(-1)[i].item<double>(), hi = max.reshape(-1)[i].item<double>();
    TORCH_CHECK(k == 1, op, ": need finite min <= max, got min = ", lo, ", max = ", hi,
                " at flat index ", i);
    TORCH_CHECK(false, op, ": the range [", lo, ", ", hi, "] at flat index ", i,
                " is too wide for a float32 scale over [", quant_min, ", ", quant_max, "]");
  }
}

namespace {

// The given zero point at flat index i for an error message: as given (an integer as an
// integer, not its float32 1.67772e+07).
std::string given_zero_point(const at::Tensor& given, int64_t i) {
  const at::Tensor v = given.reshape(-1)[i];
  return at::isIntegralType(given.scalar_type(), false) ? std::to_string(v.item<int64_t>())
                                                        : c10::str(v.item<double>());
}

// Value checks of the (small) scale and zero_point. On CUDA they cost a host
// sync; the CUDA ops skip them while a graph is captured or when turned off.
// x_name "q" (dequantize): the range is q's dtype's. given_zp: zero_point as given (errors).
void check_qparam_values(const char* op, const char* x_name, const at::Tensor& scale,
                         const at::Tensor& zero_point, const at::Tensor& given_zp,
                         int64_t quant_min, int64_t quant_max) {
  const auto range = [&] {  // (for the messages: built only on an error)
    const bool q = std::string_view(x_name) == "q";
    return c10::str(q ? "the range of q's dtype" : "[quant_min, quant_max]", " = [", quant_min,
                    ", ", quant_max, "]",
                    q && quant_max == kMaxExactCode ? " (int32: the codes float32 holds exactly)"
                                                    : "");
  };
  // scale and zero_point arrive as contiguous float32 (prepare_affine).
  if (scale.is_cpu()) {  // a plain loop: no small ATen ops on the hot path
    const float* s = scale.const_data_ptr<float>();
    const float* z = zero_point.const_data_ptr<float>();
    for (int64_t i = 0; i < scale.numel(); ++i) {
      TORCH_CHECK(std::isfinite(s[i]) && s[i] >= kMinScale, op,
                  ": scale must be positive and finite, at least ", kMinScale,
                  " (so that 1 / scale is finite), got ", s[i], " at flat index ", i);
    }
    for (int64_t i = 0; i < zero_point.numel(); ++i) {
      TORCH_CHECK(z[i] >= quant_min && z[i] <= quant_max, op, ": zero_point must lie in ", range(),
                  ", got ", given_zero_point(given_zp, i), " at flat index ", i);
    }
    return;
  }
  const at::Tensor bad_scale = ~(at::isfinite(scale) & (scale >= kMinScale));
  if (bad_scale.any().item<bool>()) {
    const at::Tensor first = scale.masked_select(bad_scale).slice(0, 0, 1).cpu();
    TORCH_CHECK(false, op, ": scale must be positive and finite, at least ", kMinScale,
                " (so that 1 / scale is finite), got ", first.item<float>(),
                " (", bad_scale.sum().item<int64_t>(), " bad of ", scale.numel(), ")");
  }
  const at::Tensor bad_zp = (zero_point < quant_min) | (zero_point > quant_max) |
                            at::isnan(zero_point);
  if (bad_zp.any().item<bool>()) {
    const int64_t i = bad_zp.reshape(-1).nonzero().select(0, 0).item<int64_t>();
    TORCH_CHECK(false, op, ": zero_point must lie in ", range(), ", got ",
                given_zero_point(given_zp, i), " at flat index ", i);
  }
}

}  // namespace

void check_affine_meta(const char* op, const char* x_name, const at::Tensor& x,
                       const at::Tensor& scale, const at::Tensor& zero_point) {
  // (Sym sizes and checks: traced tensors pass through, with runtime asserts, not guards.)
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), op,
              ": scale must be a floating tensor, got ", scale.scalar_type());
  TORCH_CHECK(!at::isComplexType(zero_point.scalar_type()) &&
                  zero_point.scalar_type() != at::kBool,
              op, ": zero_point must be an integer or floating tensor, got ",
              zero_point.scalar_type());
  TORCH_CHECK(x.device() == scale.device() && x.device() == zero_point.device(), op, ": ",
              x_name, " (", x.device(), "), scale (", scale.device(), ") and zero_point (",
              zero_point.device(), ") must be on the same device");
  // (No guard where a size is data-dependent, as a per-token scale of routed tokens.) An empty
  // scale blocks an empty x (per-token qparams of zero rows).
  TORCH_SYM_CHECK(scale.sym_numel().sym_gt(0).sym_or(x.sym_numel().sym_eq(0)), op,
                  ": scale is empty but ", x_name, " of shape ", x.sym_sizes(), " is not");
  if (TORCH_GUARD_OR_FALSE(scale.sym_numel().sym_eq(1))) {
    TORCH_SYM_CHECK(zero_point.sym_numel().sym_eq(1), op, ": a one-element scale needs a ",
                    "one-element zero_point, got zero_point of shape ", zero_point.sym_sizes());
    return;
  }
  TORCH_CHECK(scale.dim() == x.dim(), op, ": scale of shape ", scale.sym_sizes(),
              " does not block ", x_name, " of shape ", x.sym_sizes(),
              " (a scale with more than one element needs the rank of ", x_name, ")");
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (TORCH_GUARD_OR_FALSE(scale.sym_size(d).sym_eq(0))) {  // (no blocks: x has no elements)
      TORCH_SYM_CHECK(x.sym_size(d).sym_eq(0), op, ": scale of shape ", scale.sym_sizes(),
                      " does not block ", x_name, " of shape ", x.sym_sizes(), " (dim ", d,
                      ": no blocks for ", x.sym_size(d), " elements)");
      continue;
    }
    TORCH_SYM_CHECK((x.sym_size(d) % scale.sym_size(d)).sym_eq(0), op, ": scale of shape ",
                    scale.sym_sizes(), " does not block ", x_name, " of shape ", x.sym_sizes(),
                    " (dim ", d, ": ", x.sym_size(d), " is not a multiple of ",
                    scale.sym_size(d), ")");
  }
  TORCH_CHECK(zero_point.sym_sizes() == scale.sym_sizes(), op, ": zero_point of shape ",
              zero_point.sym_sizes(), " differs from scale of shape ", scale.sym_sizes());
}

AffineArgs check_affine_args(const char* op, const char* x_name, const at::Tensor& x,
                             const at::Tensor& scale, const at::Tensor& zero_point,
                             int64_t quant_min, int64_t quant_max) {
  check_affine_meta(op, x_name, x, scale, zero_point);
  if (scale.numel() == 0) {  // (x is empty too: one-element stand-ins, never read)
    return check_affine_args(op, x_name, x, at::ones({1}, scale.options()),
                             at::zeros({1}, zero_point.options()), quant_min, quant_max);
  }
  const bool per_tensor = scale.numel() == 1;
  AffineArgs a;
  // (Not dense: copied as torch.empty_like lays it out, which keeps x's dim order.)
  a.x = x.is_non_overlapping_and_dense() ? x : at::empty_like(x).copy_(x);
  if (!a.x.is_contiguous()) {
    // Dense in another order: dims from the largest stride to the smallest.
    a.dims.resize(x.dim());
    std::iota(a.dims.begin(), a.dims.end(), 0);
    std::stable_sort(a.dims.begin(), a.dims.end(),
                     [&](int64_t i, int64_t j) { return a.x.stride(i) > a.x.stride(j); });
    a.x = a.x.permute(a.dims);
    TORCH_INTERNAL_ASSERT(a.x.is_contiguous(), op, ": permuted x is not contiguous");
  }
  a.scale = scale;
  a.zero_point = zero_point;
  a.per_tensor = per_tensor;
  std::vector<int64_t> scale_sizes(scale.sizes().begin(), scale.sizes().end());
  if (!per_tensor) {
    for (size_t d = 0; d < a.dims.size(); ++d) scale_sizes[d] = scale.size(a.dims[d]);
  }
  a.layout = BlockLayout::make(a.x.sizes(), at::IntArrayRef(scale_sizes), per_tensor);
  TORCH_CHECK(a.layout.num_segments >= 0, op, ": scale of shape ", scale.sizes(), " blocks ",
              x_name, " of shape ", x.sizes(), " in more than ", BlockLayout::kMaxSegments,
              " alternating runs of blocked and unblocked dims; at most ",
              BlockLayout::kMaxSegments, " are supported");
  a.qmin = static_cast<float>(quant_min);
  a.qmax = static_cast<float>(quant_max);
  return a;
}

at::Tensor AffineArgs::empty_like_x(const at::TensorOptions& options) const {
  at::Tensor t = at::empty_strided(x.sizes(), x.strides(), options);
  if (t.is_cpu()) advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

namespace {
std::vector<int64_t> inverse(const std::vector<int64_t>& dims) {
  std::vector<int64_t> inv(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) inv[dims[i]] = static_cast<int64_t>(i);
  return inv;
}
}  // namespace

at::Tensor AffineArgs::in_given_order(const at::Tensor& out) const {
  return dims.empty() ? out : out.permute(inverse(dims));
}

at::Tensor AffineArgs::arranged_qparam(const at::Tensor& t) const {
  return per_tensor || dims.empty() ? t : t.permute(dims).contiguous();
}

at::Tensor AffineArgs::qparam_in_given_order(const at::Tensor& t) const {
  return per_tensor ? t : in_given_order(t);
}

at::Tensor AffineArgs::arranged_like_x(const at::Tensor& t) const {
  return dims.empty() ? t.contiguous() : t.permute(dims).contiguous();
}

namespace {

// t as contiguous float32; `round`: to the nearest integer (ties to even). Small CPU
// tensors convert in a plain loop: an ATen conversion op costs more than a small
// elementwise kernel.
at::Tensor float_qparams(const at::Tensor& t, bool round) {
  const auto type = t.scalar_type();
  if (t.is_cpu() && t.numel() <= 4096 &&
      (type == at::kFloat || type == at::kDouble || type == at::kInt || type == at::kLong)) {
    if (type == at::kFloat && !round && t.is_contiguous()) return t;
    const at::Tensor c = t.contiguous();
    at::Tensor out = at::empty(c.sizes(), c.options().dtype(at::kFloat));
    float* o = out.data_ptr<float>();
    const auto convert = [&](const auto* v) {
      for (int64_t i = 0; i < c.numel(); ++i) {
        const float f = static_cast<float>(v[i]);
        o[i] = round ? std::nearbyint(f) : f;
      }
    };
    if (type == at::kFloat) convert(c.const_data_ptr<float>());
    else if (type == at::kDouble) convert(c.const_data_ptr<double>());
    else if (type == at::kInt) convert(c.const_data_ptr<int32_t>());
    else convert(c.const_data_ptr<int64_t>());
    return out;
  }
  const at::Tensor f = t.to(at::kFloat);
  return (round ? f.round() : f).contiguous();
}

}  // namespace

AffineArgs prepare_affine(const char* op, const char* x_name, const at::Tensor& x,
                          const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
                          int64_t quant_max, bool check_values) {
  AffineArgs a = check_affine_args(op, x_name, x, scale, zero_point, quant_min, quant_max);
  a.scale = float_qparams(a.scale, false);
  // A floating zero point (LSQ+) is rounded to the nearest integer.
  a.zero_point = float_qparams(a.zero_point, at::isFloatingType(zero_point.scalar_type()));
  // (Checked in the given order: the errors' flat indices are the caller's.)
  if (check_values && scale.numel() > 0) {  // (empty qparams: none to check, only stand-ins)
    check_qparam_values(op, x_name, a.scale, a.zero_point, zero_point, quant_min, quant_max);
  }
  a.scale = a.arranged_qparam(a.scale);
  a.zero_point = a.arranged_qparam(a.zero_point);
  return a;
}

at::Tensor sum_over_blocks(const at::Tensor& per_element, const at::Tensor& scale) {
  // (Sym sizes: dequantize's backward runs on traced tensors too.)
  if (scale.sym_numel() == 1) return per_element.sum().reshape_symint(scale.sym_sizes());
  if (TORCH_GUARD_OR_FALSE(scale.sym_numel().sym_eq(0))) {  // (no blocks: an empty x)
    return at::zeros_symint(scale.sym_sizes(), per_element.options());
  }
  // View x as [s0, b0, s1, b1, ...] and sum the b dims.
  std::vector<c10::SymInt> split;
  std::vector<int64_t> block_dims;
  for (int64_t d = 0; d < per_element.dim(); ++d) {
    split.push_back(scale.sym_size(d));
    split.push_back(per_element.sym_size(d) / scale.sym_size(d));
    block_dims.push_back(2 * d + 1);
  }
  return per_element.reshape_symint(split).sum(block_dims);
}

at::Tensor expand_over_blocks(const at::Tensor& qparam, const at::Tensor& x) {
  if (qparam.sym_numel() == 1) return qparam.reshape({}).expand_symint(x.sym_sizes());
  if (TORCH_GUARD_OR_FALSE(qparam.sym_numel().sym_eq(0))) {  // (no blocks: an empty x)
    return at::empty_symint(x.sym_sizes(), qparam.options());
  }
  // [s0, 1, s1, 1, ...] expanded to [s0, b0, s1, b1, ...], then merged.
  std::vector<c10::SymInt> split, expanded;
  for (int64_t d = 0; d < x.dim(); ++d) {
    split.insert(split.end(), {qparam.sym_size(d), 1});
    expanded.insert(expanded.end(), {qparam.sym_size(d), x.sym_size(d) / qparam.sym_size(d)});
  }
  return qparam.reshape_symint(split).expand_symint(expanded).reshape_symint(x.sym_sizes());
}

void check_fake_quant_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                    const at::Tensor& zero_point, int64_t quant_min,
                                    int64_t quant_max, bool zero_point_grad) {
  TORCH_CHECK(!zero_point_grad || zero_point.is_floating_point(), op,
              ": zero_point_grad needs a floating zero_point (LSQ+), got ",
              zero_point.scalar_type());
  TORCH_CHECK(grad.sym_sizes() == x.sym_sizes() && grad.scalar_type() == x.scalar_type() &&
                  grad.device() == x.device(),
              op, ": grad (", grad.scalar_type(), grad.sym_sizes(), " on ", grad.device(),
              ") must match x (", x.scalar_type(), x.sym_sizes(), " on ", x.device(), ")");
  check_fake_quant_input(op, x);
  check_quant_range(op, quant_min, quant_max);
}

void check_fake_quant_mask_backward_args(const at::Tensor& grad, const at::Tensor& mask) {
  constexpr const char* op = "qlib::fake_quant_mask_backward";
  const auto t = grad.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op,
              ": grad must be float32, float16 or bfloat16, got ", t);
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(grad.sym_sizes() == mask.sym_sizes() && grad.device() == mask.device(), op,
              ": grad (", grad.sym_sizes(), " on ", grad.device(), ") must match mask (",
              mask.sym_sizes(), " on ", mask.device(), ")");
}

MaskBackwardArgs prepare_fake_quant_mask_backward(const at::Tensor& grad, const at::Tensor& mask) {
  check_fake_quant_mask_backward_args(grad, mask);
  at::Tensor out = at::empty_like(mask, grad.options());
  const auto like_out = [&](const at::Tensor& t) {
    return t.strides() == out.strides() ? t : at::empty_like(out, t.options()).copy_(t);
  };
  return {like_out(grad), like_out(mask), out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_outputs(
    const AffineArgs& a, const at::Tensor& grad_x, const at::Tensor& grad_scale_sums,
    const at::Tensor& grad_zp_sums, const at::Tensor& scale, const at::Tensor& zero_point) {
  const auto output = [&](const at::Tensor& sums, const at::Tensor& like) {
    if (!sums.defined()) return at::empty({0}, grad_x.options().dtype(at::kFloat));
    if (like.numel() == 0) return at::empty(like.sizes(), like.options());  // (no blocks)
    const at::Tensor given = a.qparam_in_given_order(sums.reshape(a.scale.sizes()));
    return given.to(like.scalar_type()).contiguous().reshape(like.sizes());
  };
  return {a.in_given_order(grad_x), output(grad_scale_sums, scale),
          output(grad_zp_sums, zero_point)};
}

}  // namespace qlib
