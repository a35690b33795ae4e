// The quantization formulas, written once and shared by the CPU kernels
// (scalar and at::vec), the CUDA kernels and the C++ tests.
//
// Each formula is a template over a "math" policy M that supplies round,
// clamp and select for a value type T (a float, or a SIMD vector of floats).
// ScalarMath below is the policy for plain floats on host and device.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define QLIB_HD __host__ __device__ __forceinline__
#else
#define QLIB_HD inline
#endif

namespace qlib {

// Round half to even (the current rounding mode, as std::nearbyint), clamp
// that keeps NaN, and a branch-free select.
struct ScalarMath {
  static QLIB_HD float round(float v) {
#if defined(__CUDA_ARCH__)
    return rintf(v);
#else
    return std::nearbyint(v);
#endif
  }
  static QLIB_HD float clamp(float v, float lo, float hi) {
    return v != v ? v : fminf(fmaxf(v, lo), hi);
  }
  // 1.0f where lo <= v <= hi, else 0.0f (NaN gives 0).
  static QLIB_HD float in_range(float v, float lo, float hi) {
    return (v >= lo && v <= hi) ? 1.0f : 0.0f;
  }
  static QLIB_HD float lt(float a, float b) { return a < b ? 1.0f : 0.0f; }
  static QLIB_HD float select(float cond, float a, float b) {
    return cond != 0.0f ? a : b;
  }
};

// Unclamped integer code: nearbyint(x * inv_scale) + zero_point, in float.
// This is exactly the order of operations of
// torch.fake_quantize_per_tensor_affine (x * (1/scale) in float32, rounded,
// then the zero point added in float).
template <class M, class T>
QLIB_HD T unclamped_code(T x, T inv_scale, T zero_point) {
  return M::round(x * inv_scale) + zero_point;
}

// Clamped integer code as a float. NaN stays NaN; +-Inf clamp to the edges.
template <class M, class T>
QLIB_HD T quantize_code(T x, T inv_scale, T zero_point, T qmin, T qmax) {
  return M::clamp(unclamped_code<M>(x, inv_scale, zero_point), qmin, qmax);
}

// Dequantize: (q - zero_point) * scale.
template <class T>
QLIB_HD T dequantize_code(T q, T scale, T zero_point) {
  return (q - zero_point) * scale;
}

// Fake-quantize: dequantize(quantize(x)).
template <class M, class T>
QLIB_HD T fake_quant_value(T x, T scale, T inv_scale, T zero_point, T qmin, T qmax) {
  return dequantize_code(quantize_code<M>(x, inv_scale, zero_point, qmin, qmax), scale,
                         zero_point);
}

// Gradients of one element. grad_x is the STE: grad where the unclamped code
// lies in [qmin, qmax], else 0. d_scale and d_zero_point follow LSQ / LSQ+ as
// torch._fake_quantize_learnable_per_tensor_affine_backward:
//   inside:  d_scale = (x_hat - x) / scale * grad,   d_zero_point = 0
//   below:   d_scale = (qmin - zp) * grad,           d_zero_point = -scale * grad
//   above:   d_scale = (qmax - zp) * grad,           d_zero_point = -scale * grad
template <class T>
struct ElementGrads {
  T grad_x, grad_scale, grad_zero_point;
};

template <class M, class T>
QLIB_HD ElementGrads<T> fake_quant_grads(T grad, T x, T scale, T inv_scale, T zero_point,
                                         T qmin, T qmax) {
  const T q = unclamped_code<M>(x, inv_scale, zero_point);
  const T inside = M::in_range(q, qmin, qmax);
  const T below = M::lt(q, qmin);
  const T x_hat = dequantize_code(M::clamp(q, qmin, qmax), scale, zero_point);
  const T edge = M::select(below, qmin - zero_point, qmax - zero_point);
  ElementGrads<T> g;
  g.grad_x = grad * inside;
  g.grad_scale = M::select(inside, (x_hat - x) * inv_scale * grad, grad * edge);
  g.grad_zero_point = M::select(inside, T(0.0f), T(0.0f) - scale * grad);
  return g;
}

// choose_qparams for one (min, max) pair. The range is widened to contain 0.
// Symmetric:  scale = max(|min|, |max|) / ((qmax - qmin) / 2)
// Asymmetric: scale = (max - min) / (qmax - qmin),
//             zero_point = clamp(qmin - round(min / scale), qmin, qmax)
// scale is at least eps. Same float32 arithmetic as torch.ao's observers.
struct QParams {
  float scale;
  int32_t zero_point;
};

QLIB_HD QParams choose_qparams_value(float min_val, float max_val, int64_t qmin, int64_t qmax,
                                     bool symmetric, float eps) {
  const float lo = fminf(min_val, 0.0f);
  const float hi = fmaxf(max_val, 0.0f);
  QParams p;
  if (symmetric) {
    const float amax = fmaxf(-lo, hi);
    p.scale = fmaxf(amax / static_cast<float>(static_cast<double>(qmax - qmin) / 2.0), eps);
    // Signed ranges centre on 0; unsigned ones on the middle code (128 for uint8).
    p.zero_point = qmin < 0 ? 0 : static_cast<int32_t>((qmin + qmax + 1) / 2);
  } else {
    p.scale = fmaxf((hi - lo) / static_cast<float>(qmax - qmin), eps);
    const float zp = static_cast<float>(qmin) - ScalarMath::round(lo / p.scale);
    p.zero_point = static_cast<int32_t>(
        ScalarMath::clamp(zp, static_cast<float>(qmin), static_cast<float>(qmax)));
  }
  return p;
}

// Widest integer range an op accepts: 16 bits.
constexpr int64_t kMaxRangeBits = 16;

}  // namespace qlib

// ---------------------------------------------------------------- int8 (issue 5)
namespace qlib {

// Activations of int8_linear and quantize_per_token use the narrow symmetric
// int8 range [-127, 127] (scale = absmax / 127, zero_point 0). Never producing
// -128 keeps every int8 x int8 product pair of the AVX2 kernel (|a| <= 127,
// |b| <= 128) inside int16, so the weights may use the full [-128, 127].
constexpr int64_t kInt8ActQmin = -127;
constexpr int64_t kInt8ActQmax = 127;
// Smallest scale (torch.finfo(float32).eps, qlib.choose_qparams' default):
// an all-zero row gets this finite positive scale and codes 0.
constexpr float kInt8ScaleEps = 1.1920928955078125e-07f;

// Largest K for which an int8 dot product of length K is exact in int32 for
// every input: K * (-128) * (-128) = K * 2^14 <= 2^31 - 1  <=>  K <= 2^17 - 1.
// (At K = 2^17 all -128 inputs give exactly 2^31, one past INT32_MAX.)
constexpr int64_t kInt8GemmMaxK = (int64_t{1} << 17) - 1;

// Per-token scale from a row's absolute maximum: choose_qparams_value over
// [-amax, amax] in the narrow range, i.e. max(amax / 127, eps).
QLIB_HD float int8_token_scale(float amax) {
  return choose_qparams_value(-amax, amax, kInt8ActQmin, kInt8ActQmax, /*symmetric=*/true,
                              kInt8ScaleEps)
      .scale;
}

// The int8 code of x (NaN -> 0), exactly as qlib::quantize with zero_point 0
// and the range [-127, 127].
QLIB_HD int8_t int8_act_code(float x, float inv_scale) {
  const float c = quantize_code<ScalarMath>(x, inv_scale, 0.0f, static_cast<float>(kInt8ActQmin),
                                            static_cast<float>(kInt8ActQmax));
  return static_cast<int8_t>(c != c ? 0.0f : c);
}

}  // namespace qlib
