// Kernel families picked by name (the int8 and 4-bit CPU kernels, the CUDA int8 GEMM): chosen
// once from an environment variable or "auto", or set later; unknown and unsupported names
// raise.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/StringUtil.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

namespace qlib {

// The index held in `slot` (-1: not chosen yet). The first call chooses through
// set(name), name = the environment variable `env_var` or "auto"; a failure names the variable.
template <class Set>
int chosen_once(std::atomic<int>& slot, const char* env_var, Set&& set) {
  if (slot.load(std::memory_order_relaxed) < 0) {
    const char* env = std::getenv(env_var);
    try {
      set(env != nullptr && *env != '\0' ? env : "auto");
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "the environment variable ", env_var, "=", env, " is not usable: ",
                  e.what_without_backtrace());
    }
  }
  return slot.load(std::memory_order_relaxed);
}

// The names whose index `supported` accepts, in order.
template <size_t N, class Supported>
std::vector<std::string> supported_names(const std::array<const char*, N>& names, Supported&& supported) {
  std::vector<std::string> out;
  for (int k = 0; k < static_cast<int>(N); ++k)
    if (supported(k)) out.emplace_back(names[k]);
  return out;
}

// slot = the index of `name`, or `best` for "auto"; `who` (the setter) names the errors.
template <size_t N, class Supported>
void set_by_name(std::atomic<int>& slot, const char* who, const std::string& name,
                 const std::array<const char*, N>& names, Supported&& supported, int best) {
  if (name == "auto") {
    slot.store(best);
    return;
  }
  for (int k = 0; k < static_cast<int>(N); ++k) {
    if (name != names[k]) continue;
    TORCH_CHECK(supported(k), who, ": this CPU cannot run the '", name, "' kernel; it can run: ",
                c10::Join(", ", supported_names(names, supported)));
    slot.store(k);
    return;
  }
  TORCH_CHECK(false, who, ": unknown kernel '", name, "'; expected 'auto' or one of ", c10::Join(", ", names));
}

}  // namespace qlib
