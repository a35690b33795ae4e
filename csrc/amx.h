// Intel AMX (tile unit) helpers shared by the int8 and 4-bit CPU kernels: CPUID checks with the
// Linux grant of the tile data state, and the one tile configuration both use (x86-64 only).
#pragma once

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cstdint>

namespace qlib {

// CPUID leaf 7 EDX bits: 22 AMX-BF16, 24 AMX-TILE, 25 AMX-INT8.
enum class AmxFeature { kBf16 = 22, kInt8 = 25 };

// AMX-TILE and `feature` in CPUID, and the tile data state granted by Linux (arch_prctl
// ARCH_REQ_XCOMP_PERM, once per process; without it the first tile instruction faults).
// False off Linux.
inline bool cpu_has_amx(AmxFeature feature) {
#if !defined(__linux__)
  (void)feature;
  return false;
#else
  static const unsigned edx = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &d) || !((d >> 24) & 1)) return 0u;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? d : 0u;
  }();
  return (edx >> static_cast<int>(feature)) & 1;
#endif
}

// Every tile 16 rows x 64 bytes (palette 1), per thread (the configuration is thread state).
// GCC's _tile_loadconfig tells the compiler that it reads 8 bytes (so the rest of the
// configuration went unwritten): the asm names all 64. GCC's tile load and store asm name no
// memory either: callers put compiler barriers around them.
__attribute__((target("amx-tile"))) inline void amx_configure() {
  struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  asm volatile("ldtilecfg %0" ::"m"(cfg));
}
__attribute__((target("amx-tile"))) inline void amx_release() { _tile_release(); }

}  // namespace qlib

#endif  // x86-64
