// Which scale covers which element of x: the granularity is given by the
// shape of scale (DESIGN.md). Every dim d of x splits into scale.size(d)
// blocks of x.size(d) / scale.size(d) elements. Dims of size 1 are dropped
// and neighbours of the same kind merged, so that per-tensor, per-channel,
// per-token, per-group and 2-D blocks all reduce to a short list of
// segments (outer to inner) of a contiguous x.
#pragma once

#include <cstdint>
#include <vector>

#include "quant_math.h"

namespace qlib {

struct BlockLayout {
  static constexpr int kMaxSegments = 16;
  int num_segments = 0;
  int64_t extent[kMaxSegments];        // elements along the merged dim
  int64_t scale_stride[kMaxSegments];  // stride in scale; 0 within a block
  // Elements in the innermost segment; within such a run the scale index is
  // constant (inner segment is a block) or steps by 1 (inner is a scale dim).
  int64_t inner_run = 1;
  bool inner_steps_scale = false;

  // Index into the contiguous scale of the element at linear index i.
  QLIB_HD int64_t scale_index(int64_t i) const {
    int64_t s = 0;
    for (int d = num_segments - 1; d >= 0; --d) {
      const int64_t q = i / extent[d];
      s += (i - q * extent[d]) * scale_stride[d];
      i = q;
    }
    return s;
  }

  // Builds the layout from sizes; assumes x_sizes[d] % scale_sizes[d] == 0
  // (checked by the caller), or a one-element scale (per-tensor). More than
  // kMaxSegments segments give num_segments = -1.
  template <class Sizes>
  static BlockLayout make(const Sizes& x_sizes, const Sizes& scale_sizes, bool per_tensor) {
    BlockLayout L;
    const int64_t rank = static_cast<int64_t>(x_sizes.size());
    // Strides of the contiguous scale.
    std::vector<int64_t> stride(rank);
    int64_t acc = 1;
    for (int64_t d = rank - 1; d >= 0; --d) {
      stride[d] = acc;
      acc *= per_tensor ? 1 : scale_sizes[d];
    }
    bool too_many = false;
    auto push = [&L, &too_many](int64_t n, int64_t st) {
      if (n == 1 || too_many) return;
      const bool is_scale = st != 0;
      if (L.num_segments > 0) {
        const int last = L.num_segments - 1;
        const bool last_is_scale = L.scale_stride[last] != 0;
        // Merge with the previous segment of the same kind (scale is
        // contiguous, so two adjacent scale dims form one).
        if (last_is_scale == is_scale) {
          L.extent[last] *= n;
          L.scale_stride[last] = st;
          return;
        }
      }
      if (L.num_segments == kMaxSegments) {
        too_many = true;
        return;
      }
      L.extent[L.num_segments] = n;
      L.scale_stride[L.num_segments] = st;
      ++L.num_segments;
    };
    for (int64_t d = 0; d < rank; ++d) {
      const int64_t s = per_tensor ? 1 : scale_sizes[d];
      push(s, stride[d]);
      push(x_sizes[d] / s, 0);
    }
    if (too_many) {
      L.num_segments = -1;  // the caller raises
      return L;
    }
    if (L.num_segments > 0) {
      L.inner_run = L.extent[L.num_segments - 1];
      L.inner_steps_scale = L.scale_stride[L.num_segments - 1] != 0;
    }
    return L;
  }
};

}  // namespace qlib
