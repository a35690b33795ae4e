// SIMD helpers shared by the CPU kernels: float vectors, and loads/stores
// of float32, float16 and bfloat16 data as float vectors (at::vec).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "quant_math.h"

namespace qlib {

using Vec = at::vec::Vectorized<float>;
using VecD = at::vec::Vectorized<double>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kGrain = 32768;  // elements per parallel_for grain

// Prefetches the data 4 KB past p. Loops that stream from DRAM with much work between their
// loads (the observers' binning, the 4-bit float32 dots) run ahead of the hardware prefetcher
// with it.
inline void prefetch_ahead(const void* p) {
  __builtin_prefetch(static_cast<const char*>(p) + 4096);
}

// quant_math.h's policy for SIMD vectors of floats.
struct VecMath {
  static Vec round(const Vec& v) { return v.round(); }
  static Vec clamp(const Vec& v, const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX2)
    // vmaxps / vminps return their second operand when either is NaN: v's NaN survives.
    return _mm256_min_ps(hi, _mm256_max_ps(lo, v));
#else
    return at::vec::minimum(at::vec::maximum(v, lo), hi);  // both keep NaN
#endif
  }
  static Vec in_range(const Vec& v, const Vec& lo, const Vec& hi) {
    return ((v >= lo) & (v <= hi)) & Vec(1.0f);
  }
  static Vec lt(const Vec& a, const Vec& b) { return (a < b) & Vec(1.0f); }
  static Vec select(const Vec& cond, const Vec& a, const Vec& b) {
    return Vec::blendv(b, a, cond != Vec(0.0f));
  }
  // Vectors of doubles, for the MSE search's error integrals.
  static VecD round(const VecD& v) { return v.round(); }
  static VecD lt(const VecD& a, const VecD& b) { return (a < b) & VecD(1.0); }
  static VecD select(const VecD& cond, const VecD& a, const VecD& b) {
    return VecD::blendv(b, a, cond != VecD(0.0));
  }
};

// Elements handled per step: one float vector, or (bf16/fp16) the two float
// vectors one Vectorized<T> converts to, so loads and stores stay full width.
template <class T>
constexpr int64_t kChunk = std::is_same_v<T, float> ? kVec : 2 * kVec;

// Loads n <= kChunk<T> elements as float vectors v[0], v[1].
template <class T>
void load_chunk(const T* p, int64_t n, Vec (&v)[2]) {
  if constexpr (std::is_same_v<T, float>) {
    v[0] = Vec::loadu(p, n);
  } else if (n == kChunk<T>) {
    std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  } else {
    float tmp[2 * kVec] = {};
    for (int64_t k = 0; k < n; ++k) tmp[k] = static_cast<float>(p[k]);
    v[0] = Vec::loadu(tmp);
    v[1] = Vec::loadu(tmp + kVec);
  }
}

// Stores the first n <= kChunk<T> floats of v[0], v[1] as T.
template <class T>
void store_chunk(T* p, const Vec (&v)[2], int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    v[0].store(p, n);
  } else if (n == kChunk<T>) {
    at::vec::convert_from_float<T>(v[0], v[1]).store(p);
  } else {
    at::vec::convert_from_float<T>(v[0], v[1]).store(p, n);
  }
}

// Loads n <= kVec elements as one float vector.
template <class T>
Vec load_float(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else if (n == kVec) {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  } else {
    Vec v[2];
    load_chunk(p, n, v);  // reads only n elements
    return v[0];
  }
}

// Integer codes <-> float vectors.
// One code from an offset code v (see store_offset_codes below).
template <class Q>
Q offset_to_code(float v, float zp) {
  return static_cast<Q>(static_cast<int32_t>(v != v ? zp : ScalarMath::round(v) + zp));
}

// Stores the 4 * kVec codes round(v[j]) + zp[j] to out as Q, where v[j] are
// offset codes (quant_math.h's offset_code: clamped, so every code fits Q) and
// zp[j] whole zero points; a NaN lane gives its zero point. Rounds half to even
// while converting (cvtps2dq in the default rounding mode, as nearbyint).
template <class Q>
__attribute__((always_inline)) inline void store_offset_codes(Q* out, const Vec (&v)[4],
                                                             const Vec (&zp)[4]) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256i i[4], z[4];
  for (int j = 0; j < 4; ++j) {
    i[j] = _mm256_cvtps_epi32(v[j]);  // NaN -> INT32_MIN
    z[j] = _mm256_cvtps_epi32(zp[j]);
  }
  // packs works within 128-bit lanes: 0xD8 / the dword permute restore the order.
  if constexpr (sizeof(Q) == 1) {
    // Offsets of 8-bit codes fit int16: drop NaN (-32768 after packing) and add
    // the zero point there, 16 lanes an op.
    const __m256i nan16 = _mm256_set1_epi16(INT16_MIN);
    __m256i h[2];
    for (int j = 0; j < 2; ++j) {
      const __m256i c = _mm256_packs_epi32(i[2 * j], i[2 * j + 1]);
      h[j] = _mm256_add_epi16(_mm256_andnot_si256(_mm256_cmpeq_epi16(c, nan16), c),
                              _mm256_packs_epi32(z[2 * j], z[2 * j + 1]));
    }
    const __m256i b = std::is_signed_v<Q> ? _mm256_packs_epi16(h[0], h[1])
                                          : _mm256_packus_epi16(h[0], h[1]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  } else {
    const __m256i nan32 = _mm256_set1_epi32(INT32_MIN);
    for (int j = 0; j < 4; ++j)
      i[j] = _mm256_add_epi32(_mm256_andnot_si256(_mm256_cmpeq_epi32(i[j], nan32), i[j]), z[j]);
    if constexpr (std::is_same_v<Q, int32_t>) {
      for (int j = 0; j < 4; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out) + j, i[j]);
    } else {
      for (int j = 0; j < 2; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out) + j,
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(i[2 * j], i[2 * j + 1]), 0xD8));
    }
  }
#else
  float tv[4 * kVec], tz[4 * kVec];
  for (int j = 0; j < 4; ++j) {
    v[j].store(tv + j * kVec);
    zp[j].store(tz + j * kVec);
  }
  for (int64_t k = 0; k < 4 * kVec; ++k) out[k] = offset_to_code<Q>(tv[k], tz[k]);
#endif
}

// Loads n <= kVec codes as floats.
template <class Q>
Vec load_codes(const Q* p, int64_t n = kVec) {
#if defined(CPU_CAPABILITY_AVX2)
  if (n == kVec) {
    __m256i i;
    if constexpr (std::is_same_v<Q, int32_t>) {
      i = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    } else if constexpr (sizeof(Q) == 2) {
      i = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    } else {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      i = std::is_signed_v<Q> ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b);
    }
    return _mm256_cvtepi32_ps(i);
  }
#endif
  float tmp[kVec] = {};
  for (int64_t k = 0; k < n; ++k) tmp[k] = static_cast<float>(p[k]);
  return Vec::loadu(tmp);
}

// Stores n <= kVec lanes of v (each 0.0f or 1.0f) as bools.
inline void store_mask(bool* p, const Vec& v, int64_t n = kVec) {
#if defined(CPU_CAPABILITY_AVX2)
  if (n == kVec) {
    // The 8 lanes' bits (1.0f shifted left by 2 sets the sign bit), each spread to a byte by a
    // table. Packing the lanes down to bytes (cvtt, extract, two packs) was slower: 219 against
    // 178 us for fake_quant_with_mask of 1M floats on one Zen 4 core.
    static constexpr auto kBytes = [] {
      std::array<uint64_t, 256> t{};
      for (int b = 0; b < 256; ++b)
        for (int k = 0; k < 8; ++k) t[b] |= static_cast<uint64_t>((b >> k) & 1) << (8 * k);
      return t;
    }();
    const __m256i sign = _mm256_slli_epi32(_mm256_castps_si256(v), 2);
    std::memcpy(p, &kBytes[_mm256_movemask_ps(_mm256_castsi256_ps(sign))], 8);
    return;
  }
#endif
  float tmp[kVec];
  v.store(tmp);
  for (int64_t k = 0; k < n; ++k) p[k] = tmp[k] != 0.0f;
}

// Loads n <= kVec bools as 0.0f / 1.0f (a bool's byte is 0 or 1).
inline Vec load_mask(const bool* p, int64_t n = kVec) {
  return load_codes(reinterpret_cast<const uint8_t*>(p), n);
}

// code_minus_zero_point of n <= kVec int32 codes (the subtraction in double: exact there, then
// one rounding to float, as from int64).
inline Vec codes_minus_zero_point(const int32_t* p, const Vec& zero_point, int64_t n = kVec) {
#if defined(CPU_CAPABILITY_AVX2)
  if (n == kVec) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256 zp = zero_point;
    const __m256 f = _mm256_cvtepi32_ps(q);
    const __m256i back = _mm256_cvttps_epi32(f);
    if (_mm256_movemask_epi8(_mm256_cmpeq_epi32(back, q)) == -1) {
      return _mm256_sub_ps(f, zp);  // every code exact in float: one rounding, as below
    }
    const __m256d lo = _mm256_sub_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(q)),
                                     _mm256_cvtps_pd(_mm256_castps256_ps128(zp)));
    const __m256d hi = _mm256_sub_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(q, 1)),
                                     _mm256_cvtps_pd(_mm256_extractf128_ps(zp, 1)));
    return _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
  }
#endif
  float zp[kVec], out[kVec] = {};
  zero_point.store(zp);
  for (int64_t k = 0; k < n; ++k) out[k] = code_minus_zero_point(p[k], zp[k]);
  return Vec::loadu(out);
}

}  // namespace qlib
