// Vector packs for the CUDA kernels: N elements of T moved as one aligned
// load or store (16 bytes: one LDG.E.128 / STG.E.128).
#pragma once

#include <cstdint>

namespace qlib {

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

inline bool aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline bool aligned16(const void* p) { return aligned(p, 16); }

}  // namespace qlib
