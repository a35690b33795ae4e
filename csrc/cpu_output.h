// Fresh outputs of the CPU kernels. PyTorch's CPU allocator hands out big
// tensors as fresh mmaps, and first touching them 4 KiB page by page was most
// of a 64 MB elementwise op's time. Asking the kernel for transparent huge
// pages on the tensor's 2 MiB-aligned interior (only what the tensor covers)
// cuts that about 3x; it is a hint, and nothing changes where THP is off.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace qlib {

// QLIB_HUGE_PAGES=0 turns the hint off (e.g. where THP compaction stalls hurt more).
inline bool huge_page_hint_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("QLIB_HUGE_PAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

inline void advise_huge_pages(void* data, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  constexpr int64_t kMinBytes = int64_t{8} << 20;  // smaller ones come from malloc's heap
  if (nbytes < kMinBytes || !huge_page_hint_enabled()) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)nbytes;
#endif
}

// at::empty, plus the huge-page hint for big CPU tensors.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.is_cpu()) advise_huge_pages(t.data_ptr(), t.nbytes());
  return t;
}

}  // namespace qlib
