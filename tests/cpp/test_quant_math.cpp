// GoogleTest for csrc/quant_math.h and csrc/block_layout.h, and the qlib ops
// called through the dispatcher (compiled into this binary, no Python).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "block_layout.h"
#include "fourbit.h"
#include "int8.h"
#include "quant_math.h"

using qlib::ScalarMath;

TEST(QuantMath, RoundsHalfToEven) {
  EXPECT_EQ(ScalarMath::round(0.5f), 0.0f);
  EXPECT_EQ(ScalarMath::round(1.5f), 2.0f);
  EXPECT_EQ(ScalarMath::round(2.5f), 2.0f);
  EXPECT_EQ(ScalarMath::round(-2.5f), -2.0f);
  EXPECT_EQ(ScalarMath::round(-0.51f), -1.0f);
}

TEST(QuantMath, ClampKeepsNaNAndClampsInf) {
  EXPECT_TRUE(std::isnan(ScalarMath::clamp(NAN, -8.0f, 7.0f)));
  EXPECT_EQ(ScalarMath::clamp(INFINITY, -8.0f, 7.0f), 7.0f);
  EXPECT_EQ(ScalarMath::clamp(-INFINITY, -8.0f, 7.0f), -8.0f);
}

TEST(QuantMath, FakeQuantValueMatchesFloat64Formula) {
  std::mt19937 gen(0);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  const float scale = 0.037f, zp = 5.0f;
  for (int i = 0; i < 10000; ++i) {
    const float x = dist(gen);
    const double q = std::min(127.0, std::max(-128.0, std::nearbyint(double(x) * (1.0f / scale)) + zp));
    const float expect = static_cast<float>((q - zp) * scale);
    const float got = qlib::fake_quant_value<ScalarMath>(x, scale, 1.0f / scale, zp, -128.0f, 127.0f);
    ASSERT_EQ(got, expect) << "x = " << x;
  }
  // +-Inf clamp in float, before any integer cast.
  EXPECT_EQ(qlib::fake_quant_value<ScalarMath>(INFINITY, 0.5f, 2.0f, 3.0f, -128.0f, 127.0f), (127 - 3) * 0.5f);
  EXPECT_EQ(qlib::fake_quant_value<ScalarMath>(-INFINITY, 0.5f, 2.0f, 3.0f, -128.0f, 127.0f), (-128 - 3) * 0.5f);
  EXPECT_TRUE(std::isnan(qlib::fake_quant_value<ScalarMath>(NAN, 0.5f, 2.0f, 3.0f, -128.0f, 127.0f)));
}

TEST(QuantMath, OffsetCodeRoundedPlusZeroPointIsTheCode) {
  std::mt19937 gen(1);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  const float specials[] = {NAN, INFINITY, -INFINITY, 1e30f, -1e30f, 0.5f, -0.5f, 2.5f, -0.0f};
  for (auto [qmin, qmax] : {std::pair{-128, 127}, {0, 255}, {-8, 7}, {-32768, 32767}}) {
    for (int t = 0; t < 2000; ++t) {
      const float zp = static_cast<float>(std::uniform_int_distribution<int>(qmin, qmax)(gen));
      const float inv = 1.0f / (0.01f + std::abs(dist(gen)));
      const float x = t < 9 ? specials[t] : dist(gen) * (qmax - qmin) / inv / 4;
      const float lo = static_cast<float>(qmin) - zp, hi = static_cast<float>(qmax) - zp;
      const float code = qlib::quantize_code<ScalarMath>(x, inv, zp, float(qmin), float(qmax));
      const float offset = qlib::offset_code<ScalarMath>(x, inv, lo, hi);
      if (std::isnan(x)) {
        EXPECT_TRUE(std::isnan(code) && std::isnan(offset));
        continue;
      }
      ASSERT_EQ(ScalarMath::round(offset) + zp, code) << "x = " << x << ", zp = " << zp;
    }
  }
}

TEST(QuantMath, GradsInsideBelowAbove) {
  const float s = 0.5f, zp = 2.0f;
  // Inside: STE passes the gradient, LSQ scale grad is (x_hat - x) / s.
  auto in = qlib::fake_quant_grads<ScalarMath>(3.0f, 1.2f, s, 1.0f / s, zp, -8.0f, 7.0f);
  EXPECT_EQ(in.grad_x, 3.0f);
  EXPECT_FLOAT_EQ(in.grad_scale, (1.0f - 1.2f) / s * 3.0f);
  EXPECT_EQ(in.grad_zero_point, 0.0f);
  auto below = qlib::fake_quant_grads<ScalarMath>(3.0f, -100.0f, s, 1.0f / s, zp, -8.0f, 7.0f);
  EXPECT_EQ(below.grad_x, 0.0f);
  EXPECT_EQ(below.grad_scale, (-8.0f - zp) * 3.0f);
  EXPECT_EQ(below.grad_zero_point, -s * 3.0f);
  auto above = qlib::fake_quant_grads<ScalarMath>(3.0f, 100.0f, s, 1.0f / s, zp, -8.0f, 7.0f);
  EXPECT_EQ(above.grad_scale, (7.0f - zp) * 3.0f);
  // A NaN code counts as below, as torch's learnable fake quant.
  auto nan = qlib::fake_quant_grads<ScalarMath>(3.0f, NAN, s, 1.0f / s, zp, -8.0f, 7.0f);
  EXPECT_EQ(nan.grad_x, 0.0f);
  EXPECT_EQ(nan.grad_scale, (-8.0f - zp) * 3.0f);
  EXPECT_EQ(nan.grad_zero_point, -s * 3.0f);
}

TEST(QuantMath, LsqDefaultGradFactor) {
  // LSQ: 1 / sqrt(numel * qmax); at most 1 (an empty x, a qmax <= 0).
  EXPECT_DOUBLE_EQ(qlib::lsq_default_grad_factor(60.0 * 127.0), 1.0 / std::sqrt(7620.0));
  EXPECT_EQ(qlib::lsq_default_grad_factor(0.0), 1.0);
  EXPECT_EQ(qlib::lsq_default_grad_factor(-60.0), 1.0);
}

TEST(QuantMath, ValueAndMaskAreFakeQuantsValueAndSte) {
  std::mt19937 gen(2);
  std::normal_distribution<float> dist(0.0f, 6.0f);
  const float s = 0.05f, zp = -3.0f, specials[] = {NAN, INFINITY, -INFINITY, -0.0f};
  for (int i = 0; i < 10000; ++i) {
    const float x = i < 4 ? specials[i] : dist(gen);
    const auto r = qlib::fake_quant_value_and_mask<ScalarMath>(x, s, 1.0f / s, zp, -128.0f, 127.0f);
    const float y = qlib::fake_quant_value<ScalarMath>(x, s, 1.0f / s, zp, -128.0f, 127.0f);
    ASSERT_TRUE(std::isnan(x) ? std::isnan(r.value) : r.value == y) << "x = " << x;
    // The mask is the STE's factor: fake_quant_grads' grad_x of a unit grad.
    ASSERT_EQ(r.inside, qlib::fake_quant_grads<ScalarMath>(1.0f, x, s, 1.0f / s, zp, -128.0f, 127.0f).grad_x)
        << "x = " << x;
    const double code = std::nearbyint(double(x * (1.0f / s))) + zp;
    ASSERT_EQ(r.inside, code >= -128 && code <= 127 ? 1.0f : 0.0f) << "x = " << x;
  }
}

TEST(QuantMath, CodesAndDequantizeMatchFloat64) {
  std::mt19937 gen(2);
  std::normal_distribution<float> dist(0.0f, 50.0f);
  for (int i = 0; i < 10000; ++i) {
    const float x = dist(gen), inv = 1.0f / 0.37f, zp = static_cast<float>(i % 17 - 8);
    const float code = qlib::unclamped_code<ScalarMath>(x, inv, zp);  // no clamp
    ASSERT_EQ(code, static_cast<float>(std::nearbyint(double(x * inv)) + zp)) << x;
    const float q = static_cast<float>(i % 256 - 128);
    ASSERT_EQ(qlib::dequantize_code(q, 0.37f, zp), static_cast<float>((double(q) - zp) * 0.37f));
  }
  // int8 / int16 codes: float(q) - zp; int32 codes subtract in int64 first (2^24 + 1 - 1).
  EXPECT_EQ(qlib::code_minus_zero_point(int8_t{-128}, 3.0f), -131.0f);
  EXPECT_EQ(qlib::code_minus_zero_point(int16_t{32767}, -5.0f), 32772.0f);
  EXPECT_EQ(qlib::code_minus_zero_point(int32_t{16777217}, 1.0f), 16777216.0f);
}

TEST(QuantMath, Int8TokenScaleAndActCode) {
  // Dynamic activations: scale absmax / 127 (float32 division), at least the eps.
  for (float amax : {1.0f, 0.3f, 127.0f, 1e-3f, 3e38f}) {
    EXPECT_EQ(qlib::int8_token_scale(amax), amax / 127.0f) << amax;
  }
  EXPECT_EQ(qlib::int8_token_scale(0.0f), qlib::kInt8ScaleEps);
  EXPECT_EQ(qlib::int8_token_scale(1e-9f), qlib::kInt8ScaleEps);
  // Codes: round half to even, clamped to [-127, 127] by default (never -128), NaN gives the
  // zero point; static codes take their zero point and range.
  const float inv = 1.0f / qlib::int8_token_scale(2.0f);
  std::mt19937 gen(3);
  std::normal_distribution<float> dist(0.0f, 1.5f);
  for (int i = 0; i < 10000; ++i) {
    const float x = dist(gen);
    const double c = std::min(127.0, std::max(-127.0, std::nearbyint(double(x * inv))));
    ASSERT_EQ(qlib::int8_act_code(x, inv), static_cast<int8_t>(c)) << x;
  }
  EXPECT_EQ(qlib::int8_act_code(-INFINITY, inv), -127);
  EXPECT_EQ(qlib::int8_act_code(INFINITY, inv), 127);
  EXPECT_EQ(qlib::int8_act_code(NAN, inv), 0);
  const qlib::Int8ActCodes codes{5.0f, -128.0f, 127.0f};
  EXPECT_EQ(qlib::int8_act_code(-INFINITY, 1.0f, codes), -128);
  EXPECT_EQ(qlib::int8_act_code(2.5f, 1.0f, codes), 7);  // round(2.5) = 2, + 5
  EXPECT_EQ(qlib::int8_act_code(NAN, 1.0f, codes), 5);
}

TEST(QuantMath, QParamsValid) {
  EXPECT_TRUE(qlib::qparams_valid(0.1f, 0.0f, -128.0f, 127.0f));
  EXPECT_TRUE(qlib::qparams_valid(std::numeric_limits<float>::max(), 127.0f, -128.0f, 127.0f));
  EXPECT_TRUE(qlib::qparams_valid(std::numeric_limits<float>::min(), -128.0f, -128.0f, 127.0f));
  // Below the normal range 1 / scale is infinite.
  EXPECT_FALSE(qlib::qparams_valid(std::numeric_limits<float>::denorm_min(), -128.0f, -128.0f, 127.0f));
  EXPECT_EQ(qlib::kMinScale, std::numeric_limits<float>::min());
  for (float s : {0.0f, -0.0f, -0.1f, NAN, INFINITY, -INFINITY})
    EXPECT_FALSE(qlib::qparams_valid(s, 0.0f, -128.0f, 127.0f)) << s;
  for (float z : {-129.0f, 128.0f, NAN, INFINITY})
    EXPECT_FALSE(qlib::qparams_valid(0.1f, z, -128.0f, 127.0f)) << z;
}

TEST(QuantMath, UpdateMinMax) {
  float lo = INFINITY, hi = -INFINITY;
  qlib::update_minmax(lo, hi, -1.0f, 2.0f, 0.0f);  // running: plain min / max
  qlib::update_minmax(lo, hi, -0.5f, 3.0f, 0.0f);
  EXPECT_EQ(lo, -1.0f);
  EXPECT_EQ(hi, 3.0f);
  float a = INFINITY, b = -INFINITY;
  qlib::update_minmax(a, b, INFINITY, -INFINITY, 0.25f);  // no finite value: unchanged
  EXPECT_EQ(a, INFINITY);
  qlib::update_minmax(a, b, -1.0f, 2.0f, 0.25f);  // first batch taken as is
  EXPECT_EQ(a, -1.0f);
  EXPECT_EQ(b, 2.0f);
  qlib::update_minmax(a, b, -3.0f, 6.0f, 0.25f);  // a + c * (v - a), step by step
  EXPECT_EQ(a, -1.0f + 0.25f * (-3.0f - -1.0f));
  EXPECT_EQ(b, 2.0f + 0.25f * (6.0f - 2.0f));
  const float c = 0.1f, a0 = 0.3f, v = 0.7f;  // rounding after the product, not fused
  float m = a0, M = -INFINITY;
  qlib::update_minmax(m, M, v, -INFINITY, c);
  const volatile float step = c * (v - a0);
  EXPECT_EQ(m, a0 + step);
  float big_lo = -3e38f, big_hi = 1.0f;  // v - avg overflows float32: the step in double
  qlib::update_minmax(big_lo, big_hi, 2.9e38f, 2.9e38f, 0.5f);
  const double a64 = -3e38f, v64 = 2.9e38f;
  EXPECT_EQ(big_lo, static_cast<float>(a64 + 0.5 * (v64 - a64)));
  EXPECT_TRUE(std::isfinite(big_lo));
}

TEST(QuantMath, ChooseQParams) {
  const float eps = std::numeric_limits<float>::epsilon();
  auto sym = qlib::choose_qparams_value(-2.0f, 1.0f, -128, 127, true, eps);
  EXPECT_EQ(sym.scale, 2.0f / 127.5f);
  EXPECT_EQ(sym.zero_point, 0);
  auto usym = qlib::choose_qparams_value(-2.0f, 1.0f, 0, 255, true, eps);
  EXPECT_EQ(usym.zero_point, 128);
  auto asym = qlib::choose_qparams_value(-1.0f, 3.0f, -128, 127, false, eps);
  EXPECT_EQ(asym.scale, 4.0f / 255.0f);
  EXPECT_EQ(asym.zero_point, static_cast<int32_t>(-128 - std::nearbyint(-1.0f / (4.0f / 255.0f))));
  // All-positive range still contains 0 exactly; a constant gives eps.
  auto pos = qlib::choose_qparams_value(2.0f, 3.0f, 0, 255, false, eps);
  EXPECT_EQ(pos.zero_point, 0);
  auto zero = qlib::choose_qparams_value(0.0f, 0.0f, -128, 127, false, eps);
  EXPECT_EQ(zero.scale, eps);
}

// Corrupt ranges get no grid (the grid search would not stop on them); an
// empty range is valid and gets no grid either; a float32-sized one does.
// An observer's range: no finite value -> [0, 0], max raised to min, then choose_qparams_value.
TEST(QuantMath, ObservedQParams) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::nanf("");
  const float eps = 1e-7f;
  auto same = [](qlib::QParams a, qlib::QParams b) {
    return a.scale == b.scale && a.zero_point == b.zero_point;
  };
  for (const bool sym : {true, false}) {
    const auto zero = qlib::choose_qparams_value(0.0f, 0.0f, 0, 255, sym, eps);
    EXPECT_TRUE(same(qlib::observed_qparams_value(inf, -inf, 0, 255, sym, eps), zero));
    EXPECT_TRUE(same(qlib::observed_qparams_value(nan, nan, 0, 255, sym, eps), zero));
    EXPECT_TRUE(same(qlib::observed_qparams_value(-1.5f, nan, 0, 255, sym, eps),
                     qlib::choose_qparams_value(-1.5f, -1.5f, 0, 255, sym, eps)));
    EXPECT_TRUE(same(qlib::observed_qparams_value(2.0f, 1.0f, -128, 127, sym, eps),
                     qlib::choose_qparams_value(2.0f, 2.0f, -128, 127, sym, eps)));
    EXPECT_TRUE(same(qlib::observed_qparams_value(-inf, 3.0f, -8, 7, sym, eps),
                     qlib::choose_qparams_value(0.0f, 3.0f, -8, 7, sym, eps)));
    EXPECT_TRUE(same(qlib::observed_qparams_value(-0.5f, 3.0f, -8, 7, sym, eps),
                     qlib::choose_qparams_value(-0.5f, 3.0f, -8, 7, sym, eps)));
  }
}

TEST(QuantMath, HistogramRangeValid) {
  const double inf = INFINITY, fmax = 3.4028234663852886e38;
  EXPECT_TRUE(qlib::histogram_range_valid(inf, -inf));
  EXPECT_TRUE(qlib::histogram_range_valid(-fmax, fmax));
  EXPECT_TRUE(qlib::histogram_range_valid(1.5, 1.5));
  for (auto [lo, hi] : {std::pair<double, double>{0.0, inf}, {-inf, 0.0}, {NAN, 1.0}, {0.0, NAN},
                        {-1e308, 1e308}, {2.0, 1.0}, {-inf, inf}}) {
    EXPECT_FALSE(qlib::histogram_range_valid(lo, hi)) << lo << " " << hi;
    EXPECT_EQ(qlib::histogram_grid(lo, hi, 2048).used, 0) << lo << " " << hi;
  }
  EXPECT_EQ(qlib::histogram_grid(inf, -inf, 2048).used, 0);
  EXPECT_EQ(qlib::histogram_grid(-fmax, fmax, 2048).used, 2048);
}

// F(b) - F(a) against a fine midpoint sum of (fake_quant(x) - x)^2 in float64,
// over intervals inside, across and outside the clipping range, spanning
// from part of one rounding cell to hundreds of cells.
TEST(QuantMath, SqErrorAntiderivativeMatchesMidpointSum) {
  std::mt19937 gen(7);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int trial = 0; trial < 200; ++trial) {
    const int bits = 2 + trial % 7;
    const double qmin = -std::ldexp(1.0, bits - 1), qmax = std::ldexp(1.0, bits - 1) - 1.0;
    const double scale = 0.01 + unit(gen), zp = std::floor(qmin + unit(gen) * (qmax - qmin));
    const qlib::SqErrorAntiderivative<ScalarMath, double> F(scale, zp, qmin, qmax);
    const double reach = (qmax - qmin + 8.0) * scale;
    const double a = (unit(gen) - 0.5) * 2.0 * reach;
    const double b = a + unit(gen) * unit(gen) * reach;
    const int steps = 200000;
    const double h = (b - a) / steps;
    double ref = 0.0;
    for (int i = 0; i < steps; ++i) {
      const double x = a + (i + 0.5) * h;
      const double q = std::fmin(std::fmax(std::nearbyint(x / scale) + zp, qmin), qmax);
      const double d = (q - zp) * scale - x;
      ref += d * d * h;
    }
    EXPECT_NEAR(F(b) - F(a), ref, 1e-6 * (1.0 + std::fabs(ref))) << "trial " << trial;
  }
}

// With at least as many levels as window bins each group is one bin: the same KL for any
// such level count, 2^40 included (which once looped 2^40 times), over random histograms
// The CPU search looks log(j) up in a table of glibc's values (WholeLog): the same KL,
// bit for bit, as calling log, for counts inside the table and past it.
TEST(QuantMath, EntropyKlSameWithLogTable) {
  std::mt19937 gen(5);
  const int64_t used = 300;
  std::vector<double> table(64);
  for (size_t j = 1; j < table.size(); ++j) table[j] = std::log(static_cast<double>(j));
  const qlib::WholeLog lg{table.data(), static_cast<int64_t>(table.size())};
  std::vector<int64_t> h(used);
  std::vector<double> cnt(used + 1), nz(used + 1), hl(used + 1), cnt2(used + 1), nz2(used + 1),
      hl2(used + 1);
  for (int trial = 0; trial < 10; ++trial) {
    for (auto& c : h) c = gen() % 3 == 0 ? 0 : static_cast<int64_t>(gen() % (trial < 5 ? 8 : 200));
    qlib::entropy_prefix(h.data(), used, cnt.data(), nz.data(), hl.data());
    qlib::entropy_prefix(h.data(), used, cnt2.data(), nz2.data(), hl2.data(), lg);
    ASSERT_EQ(hl, hl2);
    const int64_t z = static_cast<int64_t>(gen() % used);
    for (int64_t i = 7; i <= used; ++i) {
      const int64_t s = qlib::entropy_window_start(used, i, z);
      const double a = qlib::entropy_candidate_kl(h.data(), cnt.data(), nz.data(), hl.data(), used, s, i, 7);
      const double b = qlib::entropy_candidate_kl(h.data(), cnt.data(), nz.data(), hl.data(), used, s, i, 7, lg);
      EXPECT_TRUE(a == b || (std::isinf(a) && std::isinf(b))) << "trial " << trial << " i " << i;
    }
  }
}

// with empty bins and every window width.
TEST(QuantMath, EntropyKlLevelsPastTheWindow) {
  std::mt19937 gen(11);
  const int64_t used = 60;
  std::vector<int64_t> h(used);
  std::vector<double> cnt(used + 1), nz(used + 1), hl(used + 1);
  for (int trial = 0; trial < 20; ++trial) {
    for (auto& c : h) c = gen() % 4 == 0 ? 0 : static_cast<int64_t>(gen() % 1000);
    qlib::entropy_prefix(h.data(), used, cnt.data(), nz.data(), hl.data());
    const int64_t z = trial % 3 == 0 ? 0 : static_cast<int64_t>(gen() % used);
    for (int64_t i = 1; i <= used; ++i) {
      const int64_t s = qlib::entropy_window_start(used, i, z);
      const double kl = qlib::entropy_candidate_kl(h.data(), cnt.data(), nz.data(), hl.data(), used, s, i, i);
      for (const int64_t n : {i + 1, int64_t{1000}, int64_t{1} << 40}) {
        const double other = qlib::entropy_candidate_kl(h.data(), cnt.data(), nz.data(), hl.data(), used, s, i, n);
        EXPECT_TRUE(kl == other || (std::isinf(kl) && std::isinf(other))) << "i " << i << " n " << n;
      }
    }
  }
}

// The int4 codebook (k / 7): a weight of absmax * k / 7 gets code k + 8; a weight halfway
// between two values gets the lower; an all-zero block gets the value nearest 0; a block of
// subnormals (1 / absmax would overflow) still codes w / absmax.
TEST(QuantMath, CodebookCodes) {
  float cb[qlib::kCodebookSize], mid[qlib::kCodebookSize - 1];
  for (int j = 0; j < qlib::kCodebookSize; ++j) cb[j] = static_cast<float>(j - 8) / 7.0f;
  qlib::codebook_midpoints(cb, mid);
  const float absmax = 2.5f;
  for (int k = -7; k <= 7; ++k) {
    EXPECT_EQ(qlib::codebook_code(absmax * cb[k + 8], absmax, mid), k + 8) << k;
    EXPECT_EQ(qlib::codebook_value(k + 8, absmax, cb), cb[k + 8] * absmax);
  }
  EXPECT_EQ(qlib::codebook_code(mid[9] * absmax, absmax, mid), 9);  // on the midpoint: lower
  EXPECT_EQ(qlib::codebook_code(0.0f, 0.0f, mid), 8);
  const float tiny = 1e-41f;  // subnormal: 1 / tiny is inf
  EXPECT_EQ(qlib::codebook_code(tiny, tiny, mid), 15);
  EXPECT_EQ(qlib::codebook_code(-tiny, tiny, mid), 1);
  EXPECT_EQ(qlib::codebook_code(0.0f, tiny, mid), 8);
}

TEST(BlockLayout, ScaleIndexMatchesBruteForce) {
  const std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> cases = {
      {{6, 8}, {6, 1}}, {{6, 8}, {1, 8}}, {{6, 8}, {6, 2}}, {{6, 8}, {3, 4}},
      {{4, 6, 8}, {1, 6, 1}}, {{4, 6, 8}, {2, 1, 4}}, {{5, 1, 7}, {5, 1, 7}}, {{3, 4, 5, 6}, {3, 2, 5, 3}}};
  for (const auto& [xs, ss] : cases) {
    const auto L = qlib::BlockLayout::make(xs, ss, false);
    int64_t n = 1;
    for (auto v : xs) n *= v;
    for (int64_t i = 0; i < n; ++i) {
      int64_t rem = i, sidx = 0, sstride = 1;
      for (int64_t d = static_cast<int64_t>(xs.size()) - 1; d >= 0; --d) {
        const int64_t c = rem % xs[d];
        rem /= xs[d];
        sidx += (c / (xs[d] / ss[d])) * sstride;
        sstride *= ss[d];
      }
      ASSERT_EQ(L.scale_index(i), sidx) << "element " << i;
    }
  }
  const std::vector<int64_t> xs = {3, 5}, ss = {1, 1};
  const auto per_tensor = qlib::BlockLayout::make(xs, ss, true);
  EXPECT_EQ(per_tensor.inner_run, 15);
  EXPECT_EQ(per_tensor.scale_index(14), 0);
}

namespace {
at::Tensor call_fake_quant(const at::Tensor& x, const at::Tensor& s, const at::Tensor& z, int64_t lo, int64_t hi) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qlib::fake_quant", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>();
  return op.call(x, s, z, lo, hi);
}
}  // namespace

TEST(Dispatcher, FakeQuantMatchesATen) {
  at::manual_seed(0);
  const at::Tensor x = at::randn({1025, 17}) * 4;
  const at::Tensor s = at::full({1}, 0.031f);
  const at::Tensor z = at::full({1}, 3, at::kInt);
  EXPECT_TRUE(at::equal(call_fake_quant(x, s, z, -128, 127),
                        at::fake_quantize_per_tensor_affine(x, s, z, -128, 127)));
  const at::Tensor sc = at::rand({17}) * 0.1 + 0.01;
  const at::Tensor zc = at::randint(-5, 5, {17}, at::kInt);
  EXPECT_TRUE(at::equal(call_fake_quant(x, sc.view({1, 17}), zc.view({1, 17}), -8, 7),
                        at::fake_quantize_per_channel_affine(x, sc, zc, 1, -8, 7)));
  // With the STE mask: torch's *_cachemask ops' output and mask.
  static auto with_mask =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlib::fake_quant_with_mask", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, int64_t, int64_t)>();
  const auto [y, mask] = with_mask.call(x, sc.view({1, 17}), zc.view({1, 17}), -8, 7);
  const auto [ty, tmask] = at::fake_quantize_per_channel_affine_cachemask(x, sc, zc, 1, -8, 7);
  EXPECT_TRUE(at::equal(y, ty) && at::equal(mask, tmask));
}

TEST(Dispatcher, BadScaleNamesTheOp) {
  const at::Tensor x = at::randn({4});
  try {
    call_fake_quant(x, at::full({1}, -1.0f), at::zeros({1}, at::kInt), -128, 127);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("qlib::fake_quant: scale must be positive"), std::string::npos);
  }
}

// A range as wide as int64 is refused by its int32 check, before any width arithmetic
// (quant_max - quant_min overflowed int64 there: UB).
TEST(Dispatcher, Int64WideRangeRaises) {
  const at::Tensor x = at::randn({4});
  try {
    call_fake_quant(x, at::full({1}, 0.1f), at::zeros({1}, at::kInt), std::numeric_limits<int64_t>::min(),
                    std::numeric_limits<int64_t>::max());
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not fit in int32"), std::string::npos) << e.what();
  }
}

// Every int8 CPU kernel this CPU runs (vnni-emulated at least: the VNNI layout on AVX2),
// small and packed (M >= 32) paths, against an int64 reference.
TEST(Dispatcher, Int8GemmExactOnEveryCpuKernel) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("qlib::int8_gemm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  at::manual_seed(1);
  const std::vector<std::string> kernels = qlib::int8_cpu_kernels();
  EXPECT_GE(kernels.size(), 2u);
  for (const std::string& k : kernels) {
    qlib::set_int8_cpu_kernel(k);
    EXPECT_EQ(qlib::int8_cpu_kernel(), k);
    for (int64_t m : {3, 45}) {
      const at::Tensor a = at::randint(-128, 128, {m, 1031}, at::kChar);
      const at::Tensor b = at::randint(-128, 128, {19, 1031}, at::kChar);
      const at::Tensor ref = at::matmul(a.to(at::kLong), b.to(at::kLong).t());
      EXPECT_TRUE(at::equal(op.call(a, b).to(at::kLong), ref)) << "kernel " << k << ", M " << m;
    }
  }
  qlib::set_int8_cpu_kernel("auto");
  EXPECT_THROW(qlib::set_int8_cpu_kernel("avx9"), c10::Error);
}

// quantize_4bit -> linear_4bit through the dispatcher against a float64 product with the
// dequantized weight (the AVX512 and scalar decode paths: block sizes 64 and 7).
TEST(Dispatcher, Linear4bitMatchesDequantizedWeight) {
  auto& d = c10::Dispatcher::singleton();
  static auto quantize = d.findSchemaOrThrow("qlib::quantize_4bit", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
  static auto dequantize =
      d.findSchemaOrThrow("qlib::dequantize_4bit", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, at::ScalarType)>();
  static auto linear = d.findSchemaOrThrow("qlib::linear_4bit", "")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, int64_t, const std::optional<at::Tensor>&)>();
  at::manual_seed(2);
  const at::Tensor cb = at::arange(-8, 8, at::kFloat) / 7;
  const at::Tensor w = at::randn({37, 200});
  for (int64_t block : {64, 7}) {
    const auto [packed, absmax] = quantize.call(w, cb, block);
    const at::Tensor w_hat = dequantize.call(packed, absmax, cb, 200, block, at::kFloat);
    EXPECT_LE((w_hat - w).abs().max().item<float>(), (w.abs().max() / 14 * 1.0001).item<float>());
    for (int64_t m : {1, 5, 40}) {
      const at::Tensor x = at::randn({m, 200});
      const at::Tensor ref = at::matmul(x.to(at::kDouble), w_hat.to(at::kDouble).t());
      const at::Tensor y = linear.call(x, packed, absmax, cb, block, std::nullopt);
      EXPECT_TRUE(at::allclose(y.to(at::kDouble), ref, 1e-5, 1e-4)) << "block " << block << ", M " << m;
      // bfloat16 x (with block 64: the vdpbf16ps dots, the AMX tiles at M = 5 and 40, or the
      // panels, by CPU): bfloat16 W_hat and output, float32 sums.
      const at::Tensor xb = x.to(at::kBFloat16);
      const at::Tensor yb = linear.call(xb, packed, absmax, cb, block, std::nullopt);
      const at::Tensor refb = at::matmul(xb.to(at::kDouble), w_hat.to(at::kDouble).t());
      EXPECT_EQ(yb.scalar_type(), at::kBFloat16);
      EXPECT_TRUE(at::allclose(yb.to(at::kDouble), refb, 1e-2, 1e-2 * refb.abs().max().item<double>()))
          << "bfloat16, block " << block << ", M " << m << ", kernel " << qlib::fourbit_cpu_kernel();
    }
  }
}
