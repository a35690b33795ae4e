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
// that keeps NaN, and a branch-free select. round, lt and select take float
// (the quantization formulas) or double (the MSE search's error integrals).
struct ScalarMath {
  template <class T>
  static QLIB_HD T round(T v) {
#if defined(__CUDA_ARCH__)
    return rint(v);
#else
    return std::nearbyint(v);
#endif
  }
  static QLIB_HD float clamp(float v, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // max.NaN / min.NaN give NaN for a NaN operand: two instructions, not a NaN test and two.
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(v), "f"(lo));
    asm("min.NaN.f32 %0, %0, %1;" : "+f"(r) : "f"(hi));
    return r;
#else
    return v != v ? v : fminf(fmaxf(v, lo), hi);
#endif
  }
  // fmaxf / fminf (a NaN operand loses), inline on the host too, where GCC calls libm for them
  // (4 calls a row were most of a per-token scale's cost). The order of -0 and +0 may differ
  // from libm's: callers use them where the sign of a zero cannot show.
  static QLIB_HD float max_num(float a, float b) {
#if defined(__CUDA_ARCH__)
    return fmaxf(a, b);
#else
    return (a >= b || b != b) ? a : b;
#endif
  }
  static QLIB_HD float min_num(float a, float b) {
#if defined(__CUDA_ARCH__)
    return fminf(a, b);
#else
    return (a <= b || b != b) ? a : b;
#endif
  }
  // 1.0f where lo <= v <= hi, else 0.0f (NaN gives 0).
  static QLIB_HD float in_range(float v, float lo, float hi) {
    return (v >= lo && v <= hi) ? 1.0f : 0.0f;
  }
  template <class T>
  static QLIB_HD T lt(T a, T b) {
    return a < b ? T(1) : T(0);
  }
  template <class T>
  static QLIB_HD T select(T cond, T a, T b) {
    return cond != T(0) ? a : b;
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

// The same code less its zero point, clamped before rounding, for kernels that
// round while converting to integers: round(offset_code(...)) + zero_point equals
// quantize_code(...) for a whole zero_point in [qmin, qmax], because rounding is
// monotonic and keeps the whole bounds qmin - zero_point and qmax - zero_point.
// NaN stays NaN.
template <class M, class T>
QLIB_HD T offset_code(T x, T inv_scale, T lo, T hi) {
  return M::clamp(x * inv_scale, lo, hi);
}

// Dequantize: (q - zero_point) * scale.
template <class T>
QLIB_HD T dequantize_code(T q, T scale, T zero_point) {
  return (q - zero_point) * scale;
}

// A stored code minus the zero point, as float: int32 codes subtract in int64 first (float32
// cannot hold every int32 code; torch's dequantize subtracts first too).
template <class Q>
QLIB_HD float code_minus_zero_point(Q q, float zero_point) {
  if constexpr (sizeof(Q) < 4) {
    return static_cast<float>(q) - zero_point;
  } else {
    return static_cast<float>(static_cast<int64_t>(q) - static_cast<int64_t>(zero_point));
  }
}

// Fake-quantize: dequantize(quantize(x)).
template <class M, class T>
QLIB_HD T fake_quant_value(T x, T scale, T inv_scale, T zero_point, T qmin, T qmax) {
  return dequantize_code(quantize_code<M>(x, inv_scale, zero_point, qmin, qmax), scale,
                         zero_point);
}

// fake_quant_value and the straight-through estimator's mask of the same x in one pass:
// inside is 1 where the unclamped code lies in [qmin, qmax] (fake_quant_grads' grad_x / grad),
// else 0 (NaN too).
template <class T>
struct ValueAndMask {
  T value, inside;
};

template <class M, class T>
QLIB_HD ValueAndMask<T> fake_quant_value_and_mask(T x, T scale, T inv_scale, T zero_point,
                                                  T qmin, T qmax) {
  const T q = unclamped_code<M>(x, inv_scale, zero_point);
  return {dequantize_code(M::clamp(q, qmin, qmax), scale, zero_point),
          M::in_range(q, qmin, qmax)};
}

// The smallest scale (and eps) the ops take: the smallest normal float32, so that 1 / scale
// is finite.
constexpr float kMinScale = 1.17549435e-38f;

// Whether one block's qparams are usable: scale finite and >= kMinScale, zero point
// in [qmin, qmax] (NaN fails both). The CUDA fake_quant kernels check this per
// block instead of a host sync and give NaN for a block that fails.
QLIB_HD bool qparams_valid(float scale, float zero_point, float qmin, float qmax) {
  return scale >= kMinScale && scale <= 3.4028234663852886e+38f && zero_point >= qmin &&
         zero_point <= qmax;
}

// Gradients of one element. grad_x is the STE: grad where the unclamped code
// lies in [qmin, qmax], else 0. d_scale and d_zero_point follow LSQ / LSQ+ as
// torch._fake_quantize_learnable_per_tensor_affine_backward:
//   inside:  d_scale = (x_hat - x) / scale * grad,   d_zero_point = 0
//   below:   d_scale = (qmin - zp) * grad,           d_zero_point = -scale * grad (NaN too)
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
  const T above = M::lt(qmax, q);  // a NaN code counts as below, as torch's kernels
  const T x_hat = dequantize_code(M::clamp(q, qmin, qmax), scale, zero_point);
  const T edge = M::select(above, qmax - zero_point, qmin - zero_point);
  ElementGrads<T> g;
  g.grad_x = grad * inside;
  g.grad_scale = M::select(inside, (x_hat - x) * inv_scale * grad, grad * edge);
  g.grad_zero_point = M::select(inside, T(0.0f), T(0.0f) - scale * grad);
  return g;
}

// LSQ's default gradient factor for the scale (zero point): 1 / sqrt(numel * qmax) of x (one
// sample's), at most 1 (numel * qmax below 1: an empty x, a range whose qmax is <= 0).
inline double lsq_default_grad_factor(double numel_times_qmax) {
  return 1.0 / std::sqrt(numel_times_qmax > 1.0 ? numel_times_qmax : 1.0);
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
  // (max_num / min_num: a zero's sign cannot reach the scale, which is at least eps > 0, nor
  // the integer zero point.)
  const float lo = ScalarMath::min_num(min_val, 0.0f);
  const float hi = ScalarMath::max_num(max_val, 0.0f);
  QParams p;
  if (symmetric) {
    const float amax = ScalarMath::max_num(-lo, hi);
    p.scale = ScalarMath::max_num(amax / static_cast<float>(static_cast<double>(qmax - qmin) / 2.0), eps);
    // Signed ranges centre on 0; unsigned ones on the middle code (128 for uint8).
    p.zero_point = qmin < 0 ? 0 : static_cast<int32_t>((qmin + qmax + 1) / 2);
  } else {
    p.scale = ScalarMath::max_num((hi - lo) / static_cast<float>(qmax - qmin), eps);
    const float zp = static_cast<float>(qmin) - ScalarMath::round(lo / p.scale);
    p.zero_point = static_cast<int32_t>(
        ScalarMath::clamp(zp, static_cast<float>(qmin), static_cast<float>(qmax)));
  }
  return p;
}

// The qparams of an observer's recorded range (observer_qparams): a block that saw no finite
// value (min and max still +-Inf, or NaN after a DDP average) gets [0, 0], and max is raised
// to min where it lies below.
QLIB_HD QParams observed_qparams_value(float min_val, float max_val, int64_t qmin, int64_t qmax,
                                       bool symmetric, float eps) {
  constexpr float kMax = 3.4028234663852886e+38f;  // finite: |v| <= FLT_MAX (not NaN, not Inf)
  const float lo = fabsf(min_val) <= kMax ? min_val : 0.0f;
  const float hi = fabsf(max_val) <= kMax ? max_val : 0.0f;
  return choose_qparams_value(lo, hi < lo ? lo : hi, qmin, qmax, symmetric, eps);
}

// choose_qparams_value, or with Observed observed_qparams_value.
template <bool Observed>
QLIB_HD QParams qparams_value(float min_val, float max_val, int64_t qmin, int64_t qmax,
                              bool symmetric, float eps) {
  if constexpr (Observed) {
    return observed_qparams_value(min_val, max_val, qmin, qmax, symmetric, eps);
  } else {
    return choose_qparams_value(min_val, max_val, qmin, qmax, symmetric, eps);
  }
}

// Widest integer range an op accepts: 16 bits.
constexpr int64_t kMaxRangeBits = 16;
// Largest |code| or |zero point| an op accepts: the math runs in float32, which
// holds every integer below 2^24 exactly. (An integer zero point past it converts
// to at least 2^24, so the range check on the converted value still catches it.)
constexpr int64_t kMaxExactCode = (int64_t{1} << 24) - 1;

}  // namespace qlib

// ---------------------------------------------------------------- int8 (issue 5)
namespace qlib {

// Dynamic activations of int8_linear and quantize_per_token use the narrow
// symmetric int8 range [-127, 127] (scale = absmax / 127, zero_point 0). Never
// producing -128 keeps every int8 x int8 product pair of the AVX2 sign-transfer
// kernel (|a| <= 127, |b| <= 128) inside int16, so the weights may use the full
// [-128, 127]. (Static ranges that reach -128 take the widening kernel.)
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

// int8_linear's activation codes: zero point and code range. Dynamic (per-token)
// activations are symmetric on [-127, 127]; static ones may carry a zero point
// and any range inside int8 (from calibration or QAT).
struct Int8ActCodes {
  float zero_point = 0.0f;
  float qmin = static_cast<float>(kInt8ActQmin);
  float qmax = static_cast<float>(kInt8ActQmax);
};

// The int8 code of x (NaN -> the zero point), exactly as qlib::quantize.
QLIB_HD int8_t int8_act_code(float x, float inv_scale, Int8ActCodes a = {}) {
  const float c = quantize_code<ScalarMath>(x, inv_scale, a.zero_point, a.qmin, a.qmax);
  return static_cast<int8_t>(c != c ? a.zero_point : c);
}

}  // namespace qlib

namespace qlib {

// ---------------------------------------------------------------- observers
// One block's running statistics after a batch whose finite min and max are
// lo and hi (+inf and -inf when the batch had no finite value in the block).
// averaging_constant c <= 0: running min / max (MinMaxObserver). c > 0: the
// moving average min += c * (lo - min), the first batch taken as is
// (MovingAverageMinMaxObserver), rounded step by step like torch.ao's
// separate tensor ops (no fused multiply-add). Where v - avg overflows float32 (finite
// values of opposite signs past 1.7e38), torch.ao gives Inf and asserts; qlib takes the
// step in double (a point between avg and v, so finite).
QLIB_HD float moving_average_step(float avg, float v, float c) {
#ifdef __CUDA_ARCH__
  const float out = __fadd_rn(avg, __fmul_rn(c, __fsub_rn(v, avg)));
#else
  const volatile float step = c * (v - avg);  // volatile: rounded, never fused into an FMA
  const float out = avg + step;
#endif
  if (fabsf(out) <= 3.4028234663852886e+38f) return out;
  const double a = avg;
  return static_cast<float>(a + static_cast<double>(c) * (static_cast<double>(v) - a));
}

QLIB_HD void update_minmax(float& min_val, float& max_val, float lo, float hi, float c) {
  if (c <= 0.0f) {
    min_val = fminf(min_val, lo);
    max_val = fmaxf(max_val, hi);
    return;
  }
  const float inf = INFINITY;
  if (lo != inf) min_val = min_val == inf ? lo : moving_average_step(min_val, lo, c);
  if (hi != -inf) max_val = max_val == -inf ? hi : moving_average_step(max_val, hi, c);
}


// The histograms of the observers live on a canonical grid: `bins` bins of a
// power-of-two width 2^e starting at a multiple of 2^e, with e the smallest
// exponent whose window covers the data range [umin, umax] (strictly, so the
// top value falls inside). The grid is a function of the range alone, and a
// grid for a wider range is a coarsening of the narrower one (every old bin
// falls whole into one new bin). So growing the range re-bins exactly, and
// the histogram after any number of batches, in any order, on any number of
// ranks, equals the histogram of all the data on the grid of its range.
// e is kept >= exponent(max|u|) - 40 (so lo / 2^e fits a double exactly)
// and >= -160 (below the float32 denormals): a constant tensor still gets a
// grid. All arithmetic is in double, so float32 values near FLT_MAX and
// denormals are binned exactly.
struct HistGrid {
  double lo;     // left edge of bin 0
  double width;  // 2^e
  int64_t used;  // bins from 0 up to and including the bin of umax (0 if empty)
};

// A range row of a histogram: (+inf, -inf) while empty, else min <= max, both
// within float32's finite range (the data is float32). Anything else is corrupt
// (a hand-edited state_dict, say).
QLIB_HD bool histogram_range_valid(double umin, double umax) {
  constexpr double kFloatMax = 3.4028234663852886e38;
  return (umin == INFINITY && umax == -INFINITY) ||
         (umin <= umax && umin >= -kFloatMax && umax <= kFloatMax);
}

QLIB_HD HistGrid histogram_grid(double umin, double umax, int64_t bins) {
  HistGrid g{0.0, 1.0, 0};
  // Empty (umin = +inf, umax = -inf), or corrupt: no grid (and the search
  // below, which needs a finite float32 range to stop, never runs).
  if (!(umin <= umax) || !histogram_range_valid(umin, umax)) return g;
  const double amax = fmax(fabs(umin), fabs(umax));
  int e_floor = -160;
  if (amax > 0.0) e_floor = ilogb(amax) - 40 > e_floor ? ilogb(amax) - 40 : e_floor;
  const double span = umax - umin;
  int e = e_floor;
  if (span > 0.0) {
    const int e0 = ilogb(span / static_cast<double>(bins));
    e = e0 > e ? e0 : e;
  }
  for (;; ++e) {
    const double w = ldexp(1.0, e);
    const double lo = floor(umin / w) * w;
    if (lo + static_cast<double>(bins) * w > umax) {
      g.lo = lo;
      g.width = w;
      break;
    }
  }
  g.used = static_cast<int64_t>(floor((umax - g.lo) / g.width)) + 1;
  if (g.used > bins) g.used = bins;
  return g;
}

// Bin of v (finite, inside the grid's window) on grid g; exact: the edges
// lo + j * width are exact doubles, so rounding in v - lo is corrected.
QLIB_HD int64_t histogram_bin(double v, const HistGrid& g, int64_t bins) {
  double t = floor((v - g.lo) / g.width);
  t = t < 0.0 ? 0.0 : (t > static_cast<double>(bins - 1) ? static_cast<double>(bins - 1) : t);
  int64_t j = static_cast<int64_t>(t);
  if (j > 0 && v < g.lo + static_cast<double>(j) * g.width) --j;
  else if (j < bins - 1 && v >= g.lo + static_cast<double>(j + 1) * g.width) ++j;
  return j;
}

// Entropy (KL) calibration window, TensorRT style, generalised to signed
// histograms. Of the `used` bins, a candidate keeps `i` consecutive bins
// [s, s + i) with s = round((used - i) * z / used), z the bin edge nearest 0
// (z = 0 for a histogram of |x|, which gives TensorRT's [0, i)).
QLIB_HD int64_t entropy_window_start(int64_t used, int64_t i, int64_t z) {
  return ((used - i) * z * 2 + used) / (2 * used);
}

// Bin of 0 on the grid (the edge nearest 0, clamped into [0, used]).
QLIB_HD int64_t histogram_zero_edge(const HistGrid& g) {
  double z = nearbyint(-g.lo / g.width);
  z = z < 0.0 ? 0.0 : (z > static_cast<double>(g.used) ? static_cast<double>(g.used) : z);
  return static_cast<int64_t>(z);
}

// Value at quantile q in [0, 1] of one histogram row (linear within a bin),
// clamped into the data range [umin, umax].
QLIB_HD double histogram_quantile_value(const int64_t* h, const HistGrid& g, double umin,
                                        double umax, double q) {
  double total = 0.0;
  for (int64_t j = 0; j < g.used; ++j) total += static_cast<double>(h[j]);
  if (total <= 0.0) return 0.0;
  const double target = q * total;
  double cum = 0.0, v = umax;
  for (int64_t j = 0; j < g.used; ++j) {
    const double c = static_cast<double>(h[j]);
    if (c > 0.0 && cum + c >= target) {
      v = g.lo + (static_cast<double>(j) + (target - cum) / c) * g.width;
      break;
    }
    cum += c;
  }
  return v < umin ? umin : (v > umax ? umax : v);
}

// Clipping range of MSE candidate c of n (c = 1..n): the data range (widened
// to contain 0; symmetric: [-amax, amax]) shrunk by c / n.
QLIB_HD void mse_candidate_range(double umin, double umax, bool symmetric, int64_t c, int64_t n,
                                 float* lo, float* hi) {
  const double r = static_cast<double>(c) / static_cast<double>(n);
  if (symmetric) {
    const double amax = fmax(fabs(umin), fabs(umax));
    *lo = static_cast<float>(-amax * r);
    *hi = static_cast<float>(amax * r);
  } else {
    *lo = static_cast<float>(fmin(umin, 0.0) * r);
    *hi = static_cast<float>(fmax(umax, 0.0) * r);
  }
}

// Antiderivative of (fake_quant(x) - x)^2 with (scale s, zp, qmin, qmax), the
// error modelled as rounding to the nearest k * s inside [clip_lo, clip_hi] =
// [(qmin - zp) s, (qmax - zp) s] and clipping outside. Continuous, so the
// integral over [a, b] is F(b) - F(a) for any number of rounding cells.
// Inside, with t = x / s = k + u (k the nearest integer): s^3 / 12 (k + 4 u^3).
// T is a double, or (CPU) a vector of doubles with one candidate's qparams per lane;
// M the matching policy (round, lt, select).
template <class M, class T>
struct SqErrorAntiderivative {
  T inv_s, s3_12, clip_lo, clip_hi, f_lo, f_hi;
  QLIB_HD SqErrorAntiderivative(T scale, T zp, T qmin, T qmax)
      : inv_s(T(1.0) / scale),
        s3_12(scale * scale * scale / T(12.0)),
        clip_lo((qmin - zp) * scale),
        clip_hi((qmax - zp) * scale) {
    f_lo = inside(clip_lo);
    f_hi = inside(clip_hi);
  }
  QLIB_HD T inside(T x) const {
    const T t = x * inv_s, k = M::round(t), u = t - k;
    return s3_12 * (k + T(4.0) * u * u * u);
  }
  QLIB_HD T operator()(T x) const {
    const T third(1.0 / 3.0), below = clip_lo - x, above = x - clip_hi;
    return M::select(M::lt(x, clip_lo), f_lo - below * below * below * third,
                     M::select(M::lt(clip_hi, x), f_hi + above * above * above * third,
                               inside(x)));
  }
};

// The qparams of an MSE candidate range (float32 eps as the least scale).
QLIB_HD QParams mse_candidate_qparams(float lo, float hi, int64_t qmin, int64_t qmax,
                                      bool symmetric) {
  return choose_qparams_value(lo, hi, qmin, qmax, symmetric,
                              1.1920928955078125e-07f /* float32 eps */);
}

// Error y - a of fake-quantizing a point mass at a (in float32, as the op).
struct PointMassError {
  QParams p;
  int64_t qmin, qmax;
  QLIB_HD double operator()(double a) const {
    const float y = fake_quant_value<ScalarMath>(
        static_cast<float>(a), p.scale, 1.0f / p.scale, static_cast<float>(p.zero_point),
        static_cast<float>(qmin), static_cast<float>(qmax));
    return static_cast<double>(y) - a;
  }
};

// Expected fake-quant squared error of one histogram row under the candidate(s)
// of F: each bin's counts taken as uniform within the bin (clipped to the data
// range [umin, umax]), bins in ascending order. A bin of zero width (constant
// data) is a point mass: point_mass(a) gives the candidates' error there.
template <class M, class T, class PointMass>
QLIB_HD T histogram_sse(const int64_t* h, const HistGrid& g, double umin, double umax,
                        const SqErrorAntiderivative<M, T>& F, const PointMass& point_mass) {
  T sse(0.0);
  const double inv_width = 1.0 / g.width;
  double prev_b = NAN;  // the last right edge, whose F is reused as the next left edge's
  T prev_fb(0.0);
  for (int64_t j = 0; j < g.used; ++j) {
    if (h[j] == 0) continue;
    // Edges and data range are finite: plain compares (fmax / fmin are libm calls on the CPU).
    const double left = g.lo + static_cast<double>(j) * g.width;
    const double right = g.lo + static_cast<double>(j + 1) * g.width;
    const double a = left < umin ? umin : left;
    const double b = right > umax ? umax : right;
    const T c(static_cast<double>(h[j]));
    if (b > a) {
      const T fa = a == prev_b ? prev_fb : F(T(a));
      prev_b = b;
      prev_fb = F(T(b));
      // Dividing by the power-of-two width is multiplying by its exact inverse.
      const T mass = c * (prev_fb - fa);
      sse = sse + (b - a == g.width ? mass * T(inv_width) : mass / T(b - a));
    } else {
      const T e = point_mass(a);
      sse = sse + c * e * e;
    }
  }
  return sse;
}

// The qparams of [lo, hi] and histogram_sse for them alone.
QLIB_HD double histogram_fake_quant_sse(const int64_t* h, const HistGrid& g, double umin,
                                        double umax, float lo, float hi, int64_t qmin,
                                        int64_t qmax, bool symmetric) {
  const QParams p = mse_candidate_qparams(lo, hi, qmin, qmax, symmetric);
  const SqErrorAntiderivative<ScalarMath, double> F(
      p.scale, p.zero_point, static_cast<double>(qmin), static_cast<double>(qmax));
  return histogram_sse(h, g, umin, umax, F, PointMassError{p, qmin, qmax});
}

// log of a whole number v >= 1: table[v] below size (the CPU search fills it with log(j), so
// the values are the same either way), log(v) past it; CUDA passes no table.
struct WholeLog {
  const double* table = nullptr;
  int64_t size = 0;
  QLIB_HD double operator()(double v) const {
    return v < static_cast<double>(size) ? table[static_cast<int64_t>(v)] : log(v);
  }
};

// KL divergence of entropy candidate window [s, s + i) quantized to n levels
// (TensorRT's entropy calibration): P is the histogram in the window with the
// mass left of it added to its first bin and the mass right of it to its last;
// Q splits the window into n groups (offset k in group floor(k * n / i)) and
// spreads each group's count evenly over the group's non-empty bins. KL(P||Q)
// of the normalised P and Q; +inf where P > 0 and Q = 0.
// cnt, nz, hlogh are prefix sums over the row (length used + 1): counts,
// non-empty bins, and count * log(count). Counts are whole numbers: log Q of a
// group is lg(count) - lg(non-empty bins).
// The score is snapped to a multiple of 2^-32 (and floored at 0, as KL is): the sums round
// by ~1e-13, which broke exact ties (a sparse histogram's windows that each hold one
// spike score 0) against the widest window, so the pick moved with the counts' scale
// (the same weight observed n times) and the clip shrank several-fold.
QLIB_HD double entropy_candidate_kl(const int64_t* h, const double* cnt, const double* nz,
                                    const double* hlogh, int64_t used, int64_t s, int64_t i,
                                    int64_t n, WholeLog lg = {}) {
  // n >= i puts each bin in a group of its own, whatever n is: the same sums as n = i.
  if (n > i) n = i;
  const double total = cnt[used];
  const double left = cnt[s], right = total - cnt[s + i];
  const double sq = cnt[s + i] - cnt[s];
  if (!(sq > 0.0)) return INFINITY;
  // sum over P > 0 of P * (log P - log Q), before the edges: the P log P terms of the
  // window at once, the P log Q terms a group at a time.
  double acc = hlogh[s + i] - hlogh[s];
  double logq_first = 0.0, logq_last = 0.0;
  int64_t b = 0;  // group g covers window offsets [a, b): a is the previous group's b
  for (int64_t g = 0; g < n; ++g) {
    const int64_t a = b;
    b = ((g + 1) * i + n - 1) / n;
    if (b <= a) continue;
    const double k = nz[s + b] - nz[s + a];
    if (k <= 0.0) continue;
    const double c = cnt[s + b] - cnt[s + a];
    const double logq = lg(c) - lg(k);
    acc -= c * logq;
    if (a == 0) logq_first = logq;
    if (b == i) logq_last = logq;
  }
  // The edge bins carry the outside mass.
  const double h_first = static_cast<double>(h[s]);
  const double h_last = static_cast<double>(h[s + i - 1]);
  auto term = [&](double p, double logq) { return p > 0.0 ? p * (lg(p) - logq) : 0.0; };
  if (i == 1) {
    const double m = left + right;
    if (m > 0.0) {
      if (h_first == 0.0) return INFINITY;
      acc += term(h_first + m, logq_first) - term(h_first, logq_first);
    }
  } else {
    if (left > 0.0) {
      if (h_first == 0.0) return INFINITY;
      acc += term(h_first + left, logq_first) - term(h_first, logq_first);
    }
    if (right > 0.0) {
      if (h_last == 0.0) return INFINITY;
      acc += term(h_last + right, logq_last) - term(h_last, logq_last);
    }
  }
  const double kl = acc / total + lg(sq) - lg(total);
  return kl < 0.0 ? 0.0 : nearbyint(kl * 0x1p32) * 0x1p-32;  // (NaN stays NaN)
}

// Prefix sums of one histogram row for entropy_candidate_kl.
QLIB_HD void entropy_prefix(const int64_t* h, int64_t used, double* cnt, double* nz,
                            double* hlogh, WholeLog lg = {}) {
  cnt[0] = nz[0] = hlogh[0] = 0.0;
  for (int64_t j = 0; j < used; ++j) {
    const double c = static_cast<double>(h[j]);
    cnt[j + 1] = cnt[j] + c;
    nz[j + 1] = nz[j] + (c > 0.0 ? 1.0 : 0.0);
    hlogh[j + 1] = hlogh[j] + (c > 0.0 ? c * lg(c) : 0.0);
  }
}

}  // namespace qlib

// ---------------------------------------------------------------- 4-bit codebooks
// A 4-bit weight [N, K] keeps, for each block of block_size weights along K (the last block
// of a row may be short), absmax = max |w| in float32, and for each weight the index (0..15)
// of the codebook value nearest w / absmax. The codebook is 16 increasing float32
// values (NF4, int4 = k / 7 for k = -8..7, or any other). Two codes a byte along K: the even
// k in the low nibble. Dequantized: codebook[code] * absmax, in float32.
namespace qlib {

constexpr int kCodebookSize = 16;

// The 15 decision points between neighbouring codebook values (0.5a + 0.5b: no overflow),
// rounded to float32 as bitsandbytes' NF4 thresholds: within an ulp of the exact midpoint the
// rounded one decides (a documented part of the scheme, not the exact nearest value).
QLIB_HD void codebook_midpoints(const float* codebook, float* mid) {
  for (int j = 0; j + 1 < kCodebookSize; ++j) mid[j] = 0.5f * codebook[j] + 0.5f * codebook[j + 1];
}

// The code of w in a block of absmax a: how many midpoints lie below w / a (a tie goes to the
// lower value; an all-zero block takes the value nearest 0). A division, not w * (1 / a):
// 1 / a overflows for a tiny (subnormal) a.
QLIB_HD int codebook_code(float w, float absmax, const float* mid) {
  const float v = absmax > 0.0f ? w / absmax : 0.0f;
  int code = 0;
  for (int j = 0; j + 1 < kCodebookSize; ++j) code += v > mid[j] ? 1 : 0;
  return code;
}

QLIB_HD float codebook_value(int code, float absmax, const float* codebook) {
  return codebook[code] * absmax;
}

}  // namespace qlib
