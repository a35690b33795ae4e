#include "warnings.h"

namespace qlib {

namespace {
std::atomic<WarnHandler> warn_handler{nullptr};
}

void set_warn_handler(WarnHandler handler) { warn_handler.store(handler); }

void warn(const std::string& message, std::atomic<bool>& warned) {
  if (const WarnHandler handler = warn_handler.load()) return handler(message);
  if (!warned.exchange(true)) TORCH_WARN(message);
}

}  // namespace qlib
