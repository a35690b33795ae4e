// Whether the current CUDA stream is capturing a graph: then no op may read
// device values back (a host sync), so value checks are skipped.
#pragma once

#include <ATen/cuda/CUDAGraphsUtils.cuh>

namespace qlib {

inline bool capturing() {
  return at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
}

}  // namespace qlib
