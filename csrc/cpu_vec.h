// SIMD helpers shared by the CPU kernels: float vectors, and loads/stores
// of float32, float16 and bfloat16 data as float vectors (at::vec).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <tuple>
#include <type_traits>

namespace qlib {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kGrain = 32768;  // elements per parallel_for grain

// quant_math.h's policy for SIMD vectors of floats.
struct VecMath {
  static Vec round(const Vec& v) { return v.round(); }
  static Vec clamp(const Vec& v, const Vec& lo, const Vec& hi) {
    return at::vec::minimum(at::vec::maximum(v, lo), hi);  // both keep NaN
  }
  static Vec in_range(const Vec& v, const Vec& lo, const Vec& hi) {
    return ((v >= lo) & (v <= hi)) & Vec(1.0f);
  }
  static Vec lt(const Vec& a, const Vec& b) { return (a < b) & Vec(1.0f); }
  static Vec select(const Vec& cond, const Vec& a, const Vec& b) {
    return Vec::blendv(b, a, cond != Vec(0.0f));
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

}  // namespace qlib
