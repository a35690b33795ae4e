// Warnings from the ops. In Python they go through Python's warnings module (its filters,
// -W error and pytest.warns see them; a TORCH_WARN raised inside a torch.ops call does not
// reach it), elsewhere (the C++ tests) TORCH_WARN once per call site.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <atomic>
#include <string>

namespace qlib {

using WarnHandler = void (*)(const std::string& message);
void set_warn_handler(WarnHandler handler);  // module.cpp: Python's warnings.warn
void warn(const std::string& message, std::atomic<bool>& warned);

}  // namespace qlib

#define QLIB_WARN(...)                                   \
  do {                                                   \
    static std::atomic<bool> qlib_warned_{false};        \
    ::qlib::warn(::c10::str(__VA_ARGS__), qlib_warned_); \
  } while (false)
