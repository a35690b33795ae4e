// CPU kernels of the int8 ops: quantize_per_token, int8_gemm, int8_linear.
//
// The GEMM computes C[m, n] = sum_k A[m, k] * B[n, k] (both operands K-contiguous, the
// F.linear layout) with the AVX2 _mm256_maddubs_epi16 "sign transfer" trick:
//   maddubs(|b| as uint8, sign(a, b)) = pairwise a*b summed into int16,
// then _mm256_madd_epi16 with ones widens to int32. |b| <= 128 and |a| <= 127,
// so a pair sum is at most 2 * 128 * 127 = 32512 and never saturates: the
// fast path needs A (the sign operand) free of -128. int8_linear's activations
// are quantized to [-127, 127], so it always qualifies; int8_gemm scans its
// inputs and swaps the roles of a and b when only a holds -128, and falls back
// to a portable exact kernel when both do (or the CPU lacks AVX2).
// Threads: at::parallel_for over (M, N) tiles; cache blocking over K.
// That kernel now serves small M without a packed weight. With a weight pre-packed by
// int8_pack_weight (as Int8Linear does), at every M, or from M >= 32 (packing per call), the
// "packed" kernel below widens both operands to int16 and uses vpmaddwd (exact for every
// int8 input, 2 multiply uops per 32 MACs like fbgemm's u8*s8 path) on 6x16 register tiles;
// its panels also stream B linearly, which is what a small M (memory bound) needs. On CPUs
// with AVX512-VNNI or AVX-VNNI the packed kernel uses vpdpbusd instead (chosen at run
// time, see "packed kernels" below). Where the CPU has AMX-INT8 (and Linux grants it),
// int8_linear runs on the plain weight instead (no packing: "kernels on the plain
// weight"), and int8_gemm's M >= 32 on the tile unit ("AMX (tile) kernel").
//
// torch._int_mm on CPU measured ~20x slower than this kernel (and than fp32
// F.linear) in torch 2.14 on AVX2 machines, so it is not used here. (On an AMX Xeon it
// uses oneDNN's tiles, near the amx kernel's GEMM speed, but without the fused quantize and
// dequant: benchmarks/RESULTS.md.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <utility>
#include <atomic>
#include <memory>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <functional>
#include <limits>

#include "affine.h"
#include "amx.h"
#include "cpu_output.h"
#include "int8.h"
#include "quant_math.h"
#include "warnings.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QLIB_INT8_X86 1
// Compiled for AVX2 even when the rest of qlib is not; used only after a runtime check.
#define QLIB_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#else
#define QLIB_INT8_X86 0
#endif

#ifndef QLIB_INT8_MR
#define QLIB_INT8_MR 4
#endif
#ifndef QLIB_INT8_NR
#define QLIB_INT8_NR 2
#endif

namespace qlib {
namespace {

bool cpu_has_avx2() {
#if QLIB_INT8_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

constexpr std::array<const char*, 5> kInt8KernelNames = {"avx2", "vnni-emulated", "avx-vnni",
                                                         "avx512-vnni", "amx"};

bool int8_kernel_supported(Int8Kernel k) {
#if QLIB_INT8_X86
  switch (k) {
    case Int8Kernel::kAvx2:
    case Int8Kernel::kVnniEmulated:
      return cpu_has_avx2();
    case Int8Kernel::kAvxVnni:
      return cpu_has_avx2() && __builtin_cpu_supports("avxvnni");
    case Int8Kernel::kAvx512Vnni:
      return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512vnni");
    case Int8Kernel::kAmx:
      return cpu_has_avx2() && cpu_has_amx(AmxFeature::kInt8);
  }
#endif
  return false;
}

Int8Kernel best_int8_kernel() {
  for (Int8Kernel k : {Int8Kernel::kAmx, Int8Kernel::kAvx512Vnni, Int8Kernel::kAvxVnni})
    if (int8_kernel_supported(k)) return k;
  return Int8Kernel::kAvx2;
}

// The best kernel whose A operand is q + 128 as uint8 (vpdpbusd, or its AVX2 emulation) for
// the AMX layout: the amx kernel's small M, and AMX-packed weights on CPUs without AMX.
Int8Kernel best_u8_kernel() {
  for (Int8Kernel k : {Int8Kernel::kAvx512Vnni, Int8Kernel::kAvxVnni})
    if (int8_kernel_supported(k)) return k;
  return Int8Kernel::kVnniEmulated;
}

std::atomic<int> g_int8_kernel{-1};  // -1: not chosen yet

}  // namespace

Int8Kernel current_int8_kernel() {
  return static_cast<Int8Kernel>(chosen_once(g_int8_kernel, "QLIB_INT8_CPU_KERNEL", set_int8_cpu_kernel));
}

std::string int8_cpu_kernel() { return kInt8KernelNames[static_cast<int>(current_int8_kernel())]; }

std::vector<std::string> int8_cpu_kernels() {
  return supported_names(kInt8KernelNames, [](int k) { return int8_kernel_supported(static_cast<Int8Kernel>(k)); });
}

void set_int8_cpu_kernel(const std::string& name) {
  set_by_name(g_int8_kernel, "qlib.set_int8_cpu_kernel", name, kInt8KernelNames,
              [](int k) { return int8_kernel_supported(static_cast<Int8Kernel>(k)); },
              static_cast<int>(best_int8_kernel()));
}

namespace {

// Output addressing C[m * ldc_m + n * ldc_n]; swapping the strides computes C^T.
struct GemmOut {
  int32_t* c;
  int64_t ldc_m, ldc_n;
};

// Called after a tile [m0, m1) x [n0, n1) of C is complete (still hot in cache).
using TileEpilogue = std::function<void(int64_t m0, int64_t m1, int64_t n0, int64_t n1)>;

constexpr int64_t kMR = QLIB_INT8_MR;      // rows of A per micro-kernel
constexpr int64_t kNR = QLIB_INT8_NR;      // rows of B per micro-kernel
constexpr int64_t kMc = 64;     // rows of A per tile
constexpr int64_t kNc = 64;     // rows of B per tile
constexpr int64_t kKc = 2048;   // K per cache block (multiple of 32)

// ---------------------------------------------------------------- portable exact kernel
// Any int8 inputs; int32 accumulation is exact since K <= kInt8GemmMaxK.
void micro_scalar(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t kc,
                  int64_t mr, int64_t nr, GemmOut o, bool accumulate) {
  for (int64_t m = 0; m < mr; ++m) {
    const int8_t* ap = a + m * lda;
    for (int64_t n = 0; n < nr; ++n) {
      const int8_t* bp = b + n * ldb;
      int32_t s = 0;
      for (int64_t k = 0; k < kc; ++k) s += static_cast<int32_t>(ap[k]) * bp[k];
      int32_t& c = o.c[m * o.ldc_m + n * o.ldc_n];
      c = accumulate ? c + s : s;
    }
  }
}

#if QLIB_INT8_X86
QLIB_AVX2_FN inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// One 32-wide K step of the MR x NR micro-kernel.
template <int MR, int NR>
QLIB_AVX2_FN __attribute__((always_inline)) inline void micro_step(
    __m256i (&acc)[MR][NR], __m256i ones, const int8_t* ap, int64_t sa, const int8_t* bp,
    int64_t sb) {
  __m256i bu[NR];
#pragma GCC unroll 8
  for (int n = 0; n < NR; ++n)
    bu[n] = _mm256_abs_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + n * sb)));
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap + m * sa));
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      const __m256i bv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + n * sb));
      const __m256i p = _mm256_maddubs_epi16(bu[n], _mm256_sign_epi8(av, bv));
      acc[m][n] = _mm256_add_epi32(acc[m][n], _mm256_madd_epi16(p, ones));
    }
  }
}

// MR x NR block of dot products over kc (any kc; the K tail is zero padded).
// Requires: no -128 in A.
template <int MR, int NR>
QLIB_AVX2_FN void micro_avx2(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb,
                             int64_t kc, GemmOut o, bool accumulate) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_si256();

  int64_t k = 0;
  for (; k + 32 <= kc; k += 32) micro_step<MR, NR>(acc, ones, a + k, lda, b + k, ldb);
  if (k < kc) {
    alignas(32) int8_t ta[MR][32] = {};
    alignas(32) int8_t tb[NR][32] = {};
    const int64_t rest = kc - k;
    for (int m = 0; m < MR; ++m) std::memcpy(ta[m], a + m * lda + k, rest);
    for (int n = 0; n < NR; ++n) std::memcpy(tb[n], b + n * ldb + k, rest);
    micro_step<MR, NR>(acc, ones, &ta[0][0], 32, &tb[0][0], 32);
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      int32_t& c = o.c[m * o.ldc_m + n * o.ldc_n];
      const int32_t s = hsum_epi32(acc[m][n]);
      c = accumulate ? c + s : s;
    }
}

using MicroFn = void (*)(const int8_t*, int64_t, const int8_t*, int64_t, int64_t, GemmOut, bool);
template <int MR, int... N>
constexpr std::array<MicroFn, sizeof...(N)> micro_row(std::integer_sequence<int, N...>) {
  return {&micro_avx2<MR, N + 1>...};
}
template <int... M>
constexpr std::array<std::array<MicroFn, kNR>, kMR> micro_rows(std::integer_sequence<int, M...>) {
  return {micro_row<M + 1>(std::make_integer_sequence<int, kNR>{})...};
}
constexpr auto kMicroTable = micro_rows(std::make_integer_sequence<int, kMR>{});
MicroFn micro_table(int64_t mr, int64_t nr) { return kMicroTable[mr - 1][nr - 1]; }
#endif

// C = A B^T over all of M x N x K. fast: use the AVX2 kernel (A free of -128).
void gemm(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, GemmOut o, int64_t M,
          int64_t N, int64_t K, bool fast, const TileEpilogue& epilogue = nullptr) {
  if (M == 0 || N == 0) return;
  const int64_t mt = (M + kMc - 1) / kMc, nt = (N + kNc - 1) / kNc;
  // Small M: narrower N tiles so both threads get work.
  at::parallel_for(0, mt * nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / nt) * kMc, m1 = std::min(M, m0 + kMc);
      const int64_t n0 = (t % nt) * kNc, n1 = std::min(N, n0 + kNc);
      if (K == 0) {
        for (int64_t m = m0; m < m1; ++m)
          for (int64_t n = n0; n < n1; ++n) o.c[m * o.ldc_m + n * o.ldc_n] = 0;
      }
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kc = std::min(kKc, K - k0);
        const bool acc = k0 > 0;
        for (int64_t m = m0; m < m1; m += kMR) {
          const int64_t mr = std::min(kMR, m1 - m);
          for (int64_t n = n0; n < n1; n += kNR) {
            const int64_t nr = std::min(kNR, n1 - n);
            const GemmOut ot{o.c + m * o.ldc_m + n * o.ldc_n, o.ldc_m, o.ldc_n};
            const int8_t* ap = a + m * lda + k0;
            const int8_t* bp = b + n * ldb + k0;
#if QLIB_INT8_X86
            if (fast) {
              micro_table(mr, nr)(ap, lda, bp, ldb, kc, ot, acc);
              continue;
            }
#endif
            micro_scalar(ap, lda, bp, ldb, kc, mr, nr, ot, acc);
          }
        }
      }
      if (epilogue) epilogue(m0, m1, n0, n1);
    }
  });
}

// ---------------------------------------------------------------- packed kernels (pre-packed B)
// For large M the sign-transfer kernel is bound by its 3 vector-multiply-port ops (vpsignb,
// vpmaddubsw, vpmaddwd) per 32 MACs. The packed kernels instead keep A in row panels and B
// in column panels and run kPMR x 16 register tiles (12 int32 accumulators), one "step" of
// G k values per 32-bit word:
//   StepInt16 (AVX2, G = 2): both operands widened to int16, one vpmaddwd per 16 MACs; exact
//     for ALL int8 inputs (a pair sum is at most 2 * 128 * 128 = 2^15), no -128 scan.
//   VNNI (G = 4): vpdpbusd multiplies unsigned A by signed B, so A is stored as q + 128
//     (uint8) and the epilogue takes 128 * rowsum(B) off each column. The int32 sums wrap,
//     but mod 2^32 the difference is the exact sum of q * b, which fits int32 for
//     K <= kInt8GemmMaxK: so the wrapped difference is exact. One instruction per 32 MACs.
//     StepVnniEmulated computes vpdpbusd with AVX2 ops (bit-identical; it tests the VNNI
//     layout and offsets on CPUs without VNNI).
// Layouts (K padded to Kp, a multiple of 4, with zeros):
//   A: panels of R rows (PanelRows: kPMR, fewer at the end) hold, for each k word kw, R int32
//      words: row r0 + r's codes k = G kw .. G kw + G - 1 (int16 or q + 128 as uint8), r0 the
//      panel's first row.
//   B: 8-column panels; per k word, 8 x 4 bytes: (b[8p + j][G kw .. G kw + G - 1]) for
//      j = 0..7, so one load (widened for int16) lines up with a broadcast A word.
//   A packed weight (int8_pack_weight) is [B panels | int32 rowsum(B) per padded column |
//   a 32-byte tag: magic, layout, N, K, w's fingerprint]; the tag says which step can run it.
constexpr int64_t kPMR = 6;       // rows per micro-kernel
constexpr int64_t kPNR = 16;      // columns per micro-kernel (two 8-column panels)
constexpr int64_t kPMc = 96;      // rows per thread tile (multiple of kPMR)
constexpr int64_t kPNc = 256;     // columns per thread tile (multiple of kPNR)
constexpr int64_t kPKc = 1024;    // K per cache block (multiple of 4): a 16-column B strip is 16 KiB
constexpr int64_t kZmmMR = 12;    // rows per zmm micro-kernel (24 of the 32 zmm accumulate)

// How M rows split into A panels, one micro-kernel call each: kPMR rows, the last the rest;
// or, for steps with more registers (max_rows > kPMR) and M <= kPMc (one row tile), even
// panels of at most max_rows (7 = 7, 13 = 7 + 6, 16 = 8 + 8, 96 = 8 x 12). B streams past each
// panel once: at few rows a second pass (6 + 1, 6 + 2) costs as much as the first. (Even
// panels in every row tile measured the same as kPMR rows at M = 128 to 1024 on Zen 4.)
struct PanelRows {
  int64_t M;
  int64_t size = 0;   // even panels: `extra` of size + 1 rows, then panels of size (0: kPMR rows)
  int64_t extra = 0;
  PanelRows(int64_t m, int64_t max_rows) : M(m) {
    if (max_rows > kPMR && m > 0 && m <= kPMc) {
      const int64_t panels = (m + max_rows - 1) / max_rows;
      size = m / panels, extra = m % panels;
    }
  }
  int64_t first(int64_t r) const {  // of r's panel
    if (size == 0) return r / kPMR * kPMR;
    const int64_t big = extra * (size + 1);
    return r < big ? r / (size + 1) * (size + 1) : big + (r - big) / size * size;
  }
  int64_t rows(int64_t r) const {  // of r's panel
    if (size == 0) return std::min(kPMR, M - r / kPMR * kPMR);
    return r < extra * (size + 1) ? size + 1 : size;
  }
};

// Smallest M for the packed kernel: with a pre-packed weight it wins at every M (M = 1
// included: 1.2-1.6x the sign-transfer kernel at K = 4096); packing B per call (int8_gemm,
// unpacked int8_linear) pays off from M = 32.
int64_t packed_min_m(bool prepacked) {
  static const int64_t env = [] {
    const char* e = std::getenv("QLIB_INT8_PACKED_MIN_M");  // tuning knob (benchmarks)
    return e != nullptr ? std::atoll(e) : int64_t{-1};
  }();
  return env >= 0 ? env : prepacked ? 1 : 32;
}

// c - off mod 2^32.
inline int32_t wrap_sub(int32_t c, int32_t off) {
  return static_cast<int32_t>(static_cast<uint32_t>(c) - static_cast<uint32_t>(off));
}

#if QLIB_INT8_X86
// The sum of row[0, n) (n a multiple of 32): sums of the bytes + 128 (_mm256_sad_epu8), less 128 n.
QLIB_AVX2_FN int64_t row_sum_avx2(const int8_t* row, int64_t n) {
  const __m256i flip = _mm256_set1_epi8(-128), zero = _mm256_setzero_si256();
  __m256i acc = zero;
  for (int64_t k = 0; k < n; k += 32) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k));
    acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_xor_si256(v, flip), zero));
  }
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3] - 128 * n;
}
#endif

// Sum of row[k0, K) (a row of w: pack_b's tail, the zero-point term without a packed w).
int64_t row_sum(const int8_t* __restrict row, int64_t k0, int64_t K) {
  int64_t sum = 0, k = k0;  // |sum| <= 128 K fits int32 for K <= kInt8GemmMaxK
#if QLIB_INT8_X86
  if (K - k0 >= 32 && cpu_has_avx2()) {
    const int64_t n = (K - k0) / 32 * 32;
    sum = row_sum_avx2(row + k0, n), k += n;
  }
#endif
  for (; k < K; ++k) sum += row[k];
  return sum;
}

// Packed B layouts (the enum values, bits of an A code and 64 for AMX, are what the tag
// stores). kInt16Pairs / kU8Quads: 8-column panels, K padded to 4, N to 16. kAmxQuads: the
// AMX B-tile layout, 16-column panels (a k word is one 64-byte tile row), K padded to 64
// and N to 32; avx512-vnni (zmm) packs it, and every uint8 (VNNI) step runs it. kRows: no
// panels (the amx kernel reads w itself: "kernels on the plain weight" below), so a weight
// "packed" for it is only the tag.
enum class PackLayout : int32_t { kInt16Pairs = 16, kU8Quads = 8, kAmxQuads = 64, kRows = 128 };
constexpr PackLayout kPackLayouts[] = {PackLayout::kInt16Pairs, PackLayout::kU8Quads,
                                       PackLayout::kAmxQuads, PackLayout::kRows};
constexpr int32_t kPackMagic = 0x38424C51;  // "QLB8"
constexpr int64_t kPackTagBytes = 32;  // magic, layout, N, K, w's fingerprint, 3 x 0

// A fingerprint of b [N, K] (strides sn, sk): FNV-1a of its values on a grid of up to 16 x 16
// rows and columns spread over it. int8_linear_packed compares it with the packed one: a weight
// replaced where Python cannot repack (a compiled or exported graph after load_state_dict) then
// runs unpacked, not on the packing of the old one; int8_unpack_weight checks what it unpacks.
int32_t weight_fingerprint(const int8_t* b, int64_t sn, int64_t sk, int64_t N, int64_t K) {
  const int64_t rows = std::min<int64_t>(N, 16), cols = std::min<int64_t>(K, 16);
  int64_t col[16];
  for (int64_t j = 0; j < cols; ++j) col[j] = j * K / cols * sk;
  uint32_t h = 2166136261u;
  for (int64_t i = 0; i < rows; ++i) {
    const int8_t* row = b + i * N / rows * sn;
    for (int64_t j = 0; j < cols; ++j) h = (h ^ static_cast<uint8_t>(row[col[j]])) * 16777619u;
  }
  return static_cast<int32_t>(h);
}

bool is_amx(PackLayout l) { return l == PackLayout::kAmxQuads; }
bool has_panels(PackLayout l) { return l != PackLayout::kRows; }
int64_t panel_cols(PackLayout l) { return is_amx(l) ? 16 : 8; }
int64_t padded_k(int64_t K, PackLayout l) {
  const int64_t m = is_amx(l) ? 64 : has_panels(l) ? 4 : 1;
  return (K + m - 1) / m * m;
}
int64_t padded_n(int64_t N, PackLayout l) {
  const int64_t m = is_amx(l) ? 32 : has_panels(l) ? kPNR : 1;
  return (N + m - 1) / m * m;
}
int64_t panel_bytes(int64_t N, int64_t K, PackLayout l) {
  return has_panels(l) ? padded_n(N, l) * padded_k(K, l) : 0;
}

struct PackedB {
  at::Tensor buf;  // int8 [Np * Kp panels | Np int32 row sums | tag]
  const int8_t* data = nullptr;  // buf's (the kernels' loops read it per panel)
  int64_t N = 0, K = 0, Np = 0, Kp = 0;
  int32_t fingerprint = 0;  // of the weight packed (weight_fingerprint)
  PackLayout layout = PackLayout::kInt16Pairs;
  int64_t cols() const { return panel_cols(layout); }
  const int8_t* panel(int64_t n) const {  // n: a multiple of cols()
    return data + (n / cols()) * Kp * cols();
  }
  // Bytes from a panel's 8 columns to the next 8 (the next panel, or within a 16-column
  // one), and from one k word to the next.
  int64_t half_offset() const { return cols() == 8 ? Kp * 8 : 32; }
  int64_t word_bytes() const { return cols() * (layout == PackLayout::kInt16Pairs ? 2 : 4); }
  const int32_t* rowsum() const {
    return reinterpret_cast<const int32_t*>(data + panel_bytes(N, K, layout));
  }
};

// The panels' int32 row sums (the uint8 steps' offsets, a zero point's term).
int64_t rowsum_bytes(int64_t N, PackLayout l) { return has_panels(l) ? 4 * padded_n(N, l) : 0; }

int64_t packed_bytes(int64_t N, int64_t K, PackLayout l) {
  return panel_bytes(N, K, l) + rowsum_bytes(N, l) + kPackTagBytes;
}

#if QLIB_INT8_X86
#define QLIB_AVX512_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
// Rows src[i * ld], i < nrows (<= 16; the others zeros), k < kv -> one 16-column panel of the
// kAmxQuads layout at o (k words 64 bytes apart), zero padded to kc (a multiple of 64); adds
// row i's sum to sums[i]. A 16 x 16 transpose of 32-bit words per 64 k (4 rounds of 16
// shuffles); the sums are ones . words (vpdpbusd).
constexpr int64_t kPackAhead = 1024;  // prefetch distance along the rows (4096^2, M = 16: 1.0 -> 0.78 ms)
QLIB_AVX512_FN void pack_panel16_zmm(const int8_t* src, int64_t ld, int64_t nrows, int64_t kv,
                                     int64_t kc, int8_t* o, int32_t* sums) {
  const __m512i z = _mm512_setzero_si512(), one = _mm512_set1_epi8(1);
  __m512i s0 = z, s1 = z, s2 = z, s3 = z;
  for (int64_t k = 0; k < kc; k += 64) {
    __m512i r[16];
    if (nrows == 16 && kv - k >= 64) {
      for (int i = 0; i < 16; ++i) {
        r[i] = _mm512_loadu_si512(src + i * ld + k);
        if (k + kPackAhead < kv) _mm_prefetch(reinterpret_cast<const char*>(src + i * ld + k + kPackAhead), _MM_HINT_T0);
      }
    } else {
      const __mmask64 mask = kv - k >= 64 ? ~__mmask64{0} : kv > k ? (__mmask64{1} << (kv - k)) - 1 : 0;
      for (int i = 0; i < 16; ++i) r[i] = i < nrows ? _mm512_maskz_loadu_epi8(mask, src + i * ld + k) : z;
    }
    __m512i u[16];
    for (int g = 0; g < 4; ++g) {  // rows 4g .. 4g + 3: u[4g + j] lane L = their words 4L + j
      const __m512i* rg = r + 4 * g;
      const __m512i lo01 = _mm512_unpacklo_epi32(rg[0], rg[1]), hi01 = _mm512_unpackhi_epi32(rg[0], rg[1]);
      const __m512i lo23 = _mm512_unpacklo_epi32(rg[2], rg[3]), hi23 = _mm512_unpackhi_epi32(rg[2], rg[3]);
      u[4 * g + 0] = _mm512_unpacklo_epi64(lo01, lo23), u[4 * g + 1] = _mm512_unpackhi_epi64(lo01, lo23);
      u[4 * g + 2] = _mm512_unpacklo_epi64(hi01, hi23), u[4 * g + 3] = _mm512_unpackhi_epi64(hi01, hi23);
    }
    int8_t* out = o + (k / 4) * 64;
    for (int j = 0; j < 4; ++j) {
      const __m512i a_lo = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), a_hi = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
      const __m512i b_lo = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44), b_hi = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
      const __m512i t0 = _mm512_shuffle_i32x4(a_lo, b_lo, 0x88), t1 = _mm512_shuffle_i32x4(a_lo, b_lo, 0xDD);
      const __m512i t2 = _mm512_shuffle_i32x4(a_hi, b_hi, 0x88), t3 = _mm512_shuffle_i32x4(a_hi, b_hi, 0xDD);
      _mm512_storeu_si512(out + (j + 0) * 64, t0), _mm512_storeu_si512(out + (j + 4) * 64, t1);
      _mm512_storeu_si512(out + (j + 8) * 64, t2), _mm512_storeu_si512(out + (j + 12) * 64, t3);
      s0 = _mm512_dpbusd_epi32(s0, one, t0), s1 = _mm512_dpbusd_epi32(s1, one, t1);
      s2 = _mm512_dpbusd_epi32(s2, one, t2), s3 = _mm512_dpbusd_epi32(s3, one, t3);
    }
  }
  const __m512i s = _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3));
  _mm512_storeu_si512(sums, _mm512_add_epi32(_mm512_loadu_si512(sums), s));
}

#endif

// Packs rows src[j * ld], j < 8, k < K into 8 columns of panels of `layout` (on x86 an SSE2
// transpose of 16- or 32-bit units per 8 rows x 16 k): o is row 0's word 0, k words are pitch
// bytes apart, k in [K, Kp) zeros. sums[j]: row j's sum.
void pack_rows8(const int8_t* src, int64_t ld, int64_t K, int64_t Kp, PackLayout layout,
                int8_t* o, int64_t pitch, int32_t* sums) {
  const int g = layout == PackLayout::kInt16Pairs ? 2 : 4;  // k per word
  int64_t sum[8] = {};  // row sums, of the SIMD part as sums of b + 128
  int64_t k = 0;
#if QLIB_INT8_X86
  {
    __m128i acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm_setzero_si128();
    for (; k + 16 <= K; k += 16) {
      __m128i r[8], t[8], s[8];
      for (int j = 0; j < 8; ++j) {
        r[j] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j * ld + k));
        acc[j] = _mm_add_epi64(acc[j], _mm_sad_epu8(_mm_xor_si128(r[j], _mm_set1_epi8(-128)),
                                                    _mm_setzero_si128()));
      }
      int8_t* dst = o + (k / g) * pitch;
      const auto store = [&](int64_t word, int64_t half, __m128i v) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + word * pitch + half * 16), v);
      };
      if (layout == PackLayout::kInt16Pairs) {  // 8 words of 8 x 2 k
        for (int j = 0; j < 4; ++j) {
          t[2 * j] = _mm_unpacklo_epi16(r[2 * j], r[2 * j + 1]);
          t[2 * j + 1] = _mm_unpackhi_epi16(r[2 * j], r[2 * j + 1]);
        }
        s[0] = _mm_unpacklo_epi32(t[0], t[2]), s[1] = _mm_unpackhi_epi32(t[0], t[2]);
        s[2] = _mm_unpacklo_epi32(t[1], t[3]), s[3] = _mm_unpackhi_epi32(t[1], t[3]);
        s[4] = _mm_unpacklo_epi32(t[4], t[6]), s[5] = _mm_unpackhi_epi32(t[4], t[6]);
        s[6] = _mm_unpacklo_epi32(t[5], t[7]), s[7] = _mm_unpackhi_epi32(t[5], t[7]);
        for (int j = 0; j < 4; ++j) {
          store(2 * j, 0, _mm_unpacklo_epi64(s[j], s[j + 4]));
          store(2 * j + 1, 0, _mm_unpackhi_epi64(s[j], s[j + 4]));
        }
      } else {  // 4 words of 8 x 4 k: rows 0-3, then 4-7
        for (int h = 0; h < 2; ++h) {
          const __m128i* rh = r + 4 * h;
          const __m128i lo01 = _mm_unpacklo_epi32(rh[0], rh[1]), hi01 = _mm_unpackhi_epi32(rh[0], rh[1]);
          const __m128i lo23 = _mm_unpacklo_epi32(rh[2], rh[3]), hi23 = _mm_unpackhi_epi32(rh[2], rh[3]);
          store(0, h, _mm_unpacklo_epi64(lo01, lo23));
          store(1, h, _mm_unpackhi_epi64(lo01, lo23));
          store(2, h, _mm_unpacklo_epi64(hi01, hi23));
          store(3, h, _mm_unpackhi_epi64(hi01, hi23));
        }
      }
    }
    for (int j = 0; j < 8; ++j)
      sum[j] = _mm_cvtsi128_si64(acc[j]) + _mm_cvtsi128_si64(_mm_unpackhi_epi64(acc[j], acc[j])) - 128 * k;
  }
#endif
  for (int64_t j = 0; j < 8; ++j) sums[j] = static_cast<int32_t>(sum[j] + row_sum(src + j * ld, k, K));
  for (; k < Kp; ++k)  // the K tail, zero padded
    for (int64_t j = 0; j < 8; ++j) o[(k / g) * pitch + j * g + k % g] = k < K ? src[j * ld + k] : int8_t{0};
}

// Packs b [N, K] (row stride ldb) into panels of the given layout and appends row sums and
// the tag (kRows: the tag alone).
PackedB pack_b(const int8_t* b, int64_t ldb, int64_t N, int64_t K, PackLayout layout,
               const at::TensorOptions& opt) {
  PackedB p;
  p.N = N, p.K = K, p.Np = padded_n(N, layout), p.Kp = padded_k(K, layout), p.layout = layout;
  // (Huge pages for a big weight: its stream then crosses 2 MiB pages, not 4 KiB ones.)
  p.buf = empty_output({packed_bytes(N, K, layout)}, opt.dtype(at::kChar));
  int8_t* out = p.buf.data_ptr<int8_t>();
  p.data = out;
  int32_t* rowsum = reinterpret_cast<int32_t*>(out + panel_bytes(N, K, layout));
  const int g = layout == PackLayout::kInt16Pairs ? 2 : 4;  // k per word
  const int64_t cols = p.cols();
  at::parallel_for(0, has_panels(layout) ? p.Np / 8 : 0, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t pi = p0; pi < p1; ++pi) {  // 8 rows of b at a time
      const int64_t n0 = pi * 8;
      // Rows n0 .. n0 + 7 at src (row stride ld): the last ones past N from zeros.
      const int8_t* src = b + n0 * ldb;
      int64_t ld = ldb;
      std::vector<int8_t> rows;
      if (n0 + 8 > N) {
        rows.assign(8 * K, 0);
        for (int64_t j = 0; K > 0 && n0 + j < N; ++j) std::memcpy(rows.data() + j * K, src + j * ldb, K);  // (K = 0: null rows)
        src = rows.data(), ld = K;
      }
      pack_rows8(src, ld, K, p.Kp, layout, out + (n0 / cols) * p.Kp * cols + (n0 % cols) * g,
                 p.word_bytes(), rowsum + n0);
    }
  });
  const int32_t tag[8] = {kPackMagic, static_cast<int32_t>(layout), static_cast<int32_t>(N),
                          static_cast<int32_t>(K), weight_fingerprint(b, ldb, 1, N, K), 0, 0, 0};
  std::memcpy(out + panel_bytes(N, K, layout) + rowsum_bytes(N, layout), tag, sizeof(tag));
  return p;
}

// Reads a packed weight's tag: checks it is pack_b's output (for N x K, where given; -1: the
// tag's own) and takes its layout and shape from the tag.
PackedB unpack_tag(const char* op, const at::Tensor& w_packed, int64_t N = -1, int64_t K = -1) {
  const int64_t numel = w_packed.numel();
  TORCH_CHECK(w_packed.scalar_type() == at::kChar && w_packed.dim() == 1 &&
                  w_packed.is_contiguous() && numel >= kPackTagBytes && w_packed.is_cpu(),
              op, ": w_packed (", w_packed.scalar_type(), ", shape ", w_packed.sizes(), ", on ",
              w_packed.device(), w_packed.is_contiguous() ? "" : ", not contiguous",
              ") is not a CPU int8_pack_weight output (a contiguous 1-D int8 CPU tensor)");
  int32_t tag[8];
  std::memcpy(tag, w_packed.const_data_ptr<int8_t>() + numel - kPackTagBytes, sizeof(tag));
  const auto layout = static_cast<PackLayout>(tag[1]);
  const int64_t tn = tag[2], tk = tag[3];
  bool layout_ok = false;  // a known layout, whose packing of tn x tk has this size
  for (PackLayout l : kPackLayouts)
    layout_ok = layout_ok || (layout == l && tn >= 0 && tk >= 0 && numel == packed_bytes(tn, tk, l));
  TORCH_CHECK(tag[0] == kPackMagic && layout_ok, op, ": w_packed of ", numel,
              " bytes is not int8_pack_weight's output (its tag is corrupt)");
  TORCH_CHECK((N < 0 || N == tn) && (K < 0 || K == tk), op, ": w_packed holds a weight of shape [",
              tn, ", ", tk, "], not [", N, ", ", K, "]");
  PackedB p;
  p.N = tn, p.K = tk, p.layout = layout, p.Np = padded_n(tn, layout), p.Kp = padded_k(tk, layout);
  p.fingerprint = tag[4];
  p.buf = w_packed;
  p.data = w_packed.const_data_ptr<int8_t>();
  return p;
}

// Rows [n0, n0 + rows) of one panel (cols columns, g k a word) back to out (row stride K), in
// passes of kChunk k so that the panel's words a pass reads (16 KiB) stay in L1.
template <int G, int Cols>
void unpack_panel(const int8_t* panel, int64_t rows, int64_t K, int8_t* out) {
  constexpr int64_t kChunk = 1024;
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t k1 = std::min(K, k0 + kChunk), full = k0 + (k1 - k0) / G * G;
    for (int64_t c = 0; c < rows; ++c) {
      const int8_t* src = panel + c * G;
      int8_t* row = out + c * K;
      int64_t k = k0;
      for (; k < full; k += G) std::memcpy(row + k, src + k * Cols, G);  // (word k / G)
      for (; k < k1; ++k) row[k] = src[k / G * G * Cols + k % G];
    }
  }
}

// pack_b's panels back to the int8 weight [N, K]: w[n][k] lies at panel n / cols, k word
// k / g, column n % cols, byte k % g. Checks the weight's fingerprint against the tag's.
at::Tensor unpack_b(const char* op, const PackedB& p) {
  TORCH_CHECK(has_panels(p.layout), op, ": w_packed holds only a tag, not the weight (packed "
              "where the kernels read the plain weight: the amx kernel, or "
              "QLIB_INT8_PACKED_COPY=0); pass w_int8 with it");
  at::Tensor w = at::empty({p.N, p.K}, p.buf.options());
  int8_t* out = w.data_ptr<int8_t>();
  const int64_t cols = p.cols(), N = p.N, K = p.K;
  at::parallel_for(0, (N + cols - 1) / cols, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t pi = p0; pi < p1; ++pi) {
      const int8_t* panel = p.panel(pi * cols);
      const int64_t rows = std::min(cols, N - pi * cols);
      int8_t* dst = out + pi * cols * K;
      if (p.layout == PackLayout::kInt16Pairs) unpack_panel<2, 8>(panel, rows, K, dst);
      else if (cols == 8) unpack_panel<4, 8>(panel, rows, K, dst);
      else unpack_panel<4, 16>(panel, rows, K, dst);
    }
  });
  TORCH_CHECK(weight_fingerprint(out, K, 1, N, K) == p.fingerprint, op,
              ": w_packed's panels do not match the fingerprint in its tag (corrupt)");
  return w;
}

#if QLIB_INT8_X86
// One k word of the micro-kernel: c += a (broadcast A word) . b (B load) per 32-bit lane.
struct StepInt16 {
  using Elem = int16_t;
  static constexpr int G = 2;
  static constexpr int64_t kCols = 16;  // columns per micro-kernel call
  static constexpr int64_t kMaxRows = kPMR;  // rows per micro-kernel call
  QLIB_AVX2_FN __attribute__((always_inline)) static __m256i load_b(const int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  QLIB_AVX2_FN __attribute__((always_inline)) static __m256i dot(__m256i c, __m256i a, __m256i b) {
    return _mm256_add_epi32(c, _mm256_madd_epi16(a, b));
  }
};
struct StepU8 {
  using Elem = uint8_t;
  static constexpr int G = 4;
  static constexpr int64_t kCols = 16;
  static constexpr int64_t kMaxRows = kPMR;
  QLIB_AVX2_FN __attribute__((always_inline)) static __m256i load_b(const int8_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
};
// vpdpbusd with AVX2 ops: unsigned even / odd bytes of a times signed ones of b, as int16.
struct StepVnniEmulated : StepU8 {
  QLIB_AVX2_FN __attribute__((always_inline)) static __m256i dot(__m256i c, __m256i a, __m256i b) {
    const __m256i a_even = _mm256_and_si256(a, _mm256_set1_epi16(0xFF));
    const __m256i a_odd = _mm256_srli_epi16(a, 8);
    const __m256i b_even = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8);
    const __m256i b_odd = _mm256_srai_epi16(b, 8);
    return _mm256_add_epi32(c, _mm256_add_epi32(_mm256_madd_epi16(a_even, b_even),
                                                _mm256_madd_epi16(a_odd, b_odd)));
  }
};
// The real instruction as inline asm, so the compiler never emits VNNI code on its own: it
// runs only after the runtime CPU check. The byte encoding equals GCC's for
// _mm256_dpbusd_avx_epi32 (VEX).
struct StepAvxVnni : StepU8 {
  QLIB_AVX2_FN __attribute__((always_inline)) static __m256i dot(__m256i c, __m256i a, __m256i b) {
    asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(c) : "x"(a), "x"(b));
    return c;
  }
};

// AVX512-VNNI on zmm registers: 32 columns (two 16-column panels of the kAmxQuads layout)
// per micro-kernel call (micro_zmm, micro_zmm_thin for 1-2 rows), up to kZmmMR rows.
struct StepZmm {
  using Elem = uint8_t;
  static constexpr int G = 4;
  static constexpr int64_t kCols = 32;
  static constexpr int64_t kMaxRows = kZmmMR;
};

// Calls f(Step{}) with the step of `kernel` (for amx: the VNNI step it runs small M with).
template <class F>
void with_step(Int8Kernel kernel, F&& f) {
  switch (kernel) {
    case Int8Kernel::kAvx2: return f(StepInt16{});
    case Int8Kernel::kVnniEmulated: return f(StepVnniEmulated{});
    case Int8Kernel::kAvxVnni: return f(StepAvxVnni{});
    case Int8Kernel::kAvx512Vnni: return f(StepZmm{});
    case Int8Kernel::kAmx: {
      const Int8Kernel u8 = best_u8_kernel();
      TORCH_INTERNAL_ASSERT(u8 != Int8Kernel::kAmx);
      return with_step(u8, std::forward<F>(f));
    }
  }
}

// 4 x 8 int32 codes (k order) -> 32 int8 codes in k order.
QLIB_AVX2_FN inline __m256i codes32_int8(const __m256i (&c)[4]) {
  const __m256i p =
      _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
  return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Where quantize_rows_avx2 (or pack_a) puts codes in A panels: row r's codes k .. k + G - 1
// are the 32-bit word (k / G) * R + r - r0 of the panel of R rows from row r0 (PanelRows; no
// padding rows, so one row of x is read as one dense stream; a padded panel at M = 1 took 24 KB
// of L1 for 4 KB of codes, 1.12x slower at K = 4096 on Zen 4).
template <class Elem>
struct PanelCodes {
  static constexpr int G = 4 / sizeof(Elem);
  Elem* w;
  int64_t kp;  // padded K
  PanelRows split;
  int64_t rows(int64_t r) const { return split.rows(r); }  // of r's panel
  Elem* word0(int64_t r) const {  // row r's first word
    const int64_t r0 = split.first(r);
    return w + r0 * kp + (r - r0) * G;
  }
  static Elem code(int8_t c) {
    if constexpr (std::is_same_v<Elem, uint8_t>) return static_cast<uint8_t>(c + 128);
    else return c;
  }
  QLIB_AVX2_FN void put32(int64_t r, int64_t k, const __m256i (&c)[4]) const {
    alignas(32) int32_t words[32 / G];  // in k order
    if constexpr (std::is_same_v<Elem, uint8_t>) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(words),
                         _mm256_xor_si256(codes32_int8(c), _mm256_set1_epi8(-128)));
    } else {
      _mm256_store_si256(reinterpret_cast<__m256i*>(words),
                         _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8));
      _mm256_store_si256(reinterpret_cast<__m256i*>(words + 8),
                         _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0xD8));
    }
    put_words(r, k, words, 32 / G);
  }
  void put1(int64_t r, int64_t k, int8_t c) const {
    word0(r)[(k / G) * rows(r) * G + k % G] = code(c);
  }
  // quantize_rows_avx512's sink (uint8 panels only): 64 codes in k order; then up to 16 as
  // int32 lanes under m, k a multiple of 16 (the words they touch; the caller pads past K).
  QLIB_AVX512_FN void put64(int64_t r, int64_t k, __m512i c) const {
    static_assert(G == 4, "PanelCodes::put64: uint8 panels");
    alignas(64) int32_t words[16];
    _mm512_store_si512(words, _mm512_xor_si512(c, _mm512_set1_epi8(-128)));
    put_words(r, k, words, 16);
  }
  QLIB_AVX512_FN void put16(int64_t r, int64_t k, __mmask16 m, __m512i c) const {
    static_assert(G == 4, "PanelCodes::put16: uint8 panels");
    alignas(16) int32_t words[4];
    const __m128i b = _mm512_cvtsepi32_epi8(c);
    _mm_store_si128(reinterpret_cast<__m128i*>(words), _mm_xor_si128(b, _mm_set1_epi8(-128)));
    put_words(r, k, words, (__builtin_popcount(static_cast<unsigned>(m)) + 3) / 4);
  }
  void put_words(int64_t r, int64_t k, const int32_t* words, int n) const {
    const int64_t R = rows(r);
    int32_t* o = reinterpret_cast<int32_t*>(word0(r)) + (k / G) * R;
    for (int j = 0; j < n; ++j) o[j * R] = words[j];
  }
};

// a [M, K] int8 (row stride lda) -> A panels with K padded to kp (int8_gemm; int8_linear
// quantizes into them).
template <class Step>
at::Tensor pack_a(const int8_t* a, int64_t lda, int64_t M, int64_t K, int64_t kp,
                  const at::TensorOptions& opt) {
  using Elem = typename Step::Elem;
  at::Tensor w = at::empty({M * kp}, opt.dtype(std::is_same_v<Elem, uint8_t> ? at::kByte : at::kShort));
  const PanelCodes<Elem> sink{w.data_ptr<Elem>(), kp, PanelRows(M, Step::kMaxRows)};
  constexpr int G = PanelCodes<Elem>::G;
  at::parallel_for(0, M, std::max<int64_t>(1, 8192 / std::max<int64_t>(kp, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       const int8_t* ar = a + r * lda;
                       Elem* o = sink.word0(r);
                       const int64_t step = sink.rows(r) * G;
                       int64_t k = 0;
                       for (; k + G <= K; k += G, o += step)
                         for (int g = 0; g < G; ++g) o[g] = sink.code(ar[k + g]);
                       for (; k < kp; ++k) sink.put1(r, k, k < K ? ar[k] : 0);
                     }
                   });
  return w;
}

// C[R, 16] (row stride ldc) (+)= an A panel of R rows x 16 columns of B (8 at b, 8 at
// b + bstride, k words bword bytes apart) over kc k (a multiple of 4); R < kPMR only for the
// last rows of M.
template <int R, class Step>
QLIB_AVX2_FN __attribute__((noinline)) void micro_packed(const typename Step::Elem* a,
                                                         const int8_t* b, int64_t bstride,
                                                         int64_t bword, int64_t kc, int32_t* c,
                                                         int64_t ldc, bool accumulate) {
  static_assert(kPMR == 6 && R >= 1 && R <= kPMR, "micro_packed is written out for 6 rows");
  // Accumulators are named variables, loaded (or zeroed) up front and stored once after
  // the loop: with an __m256i array, or a branch after the loop, GCC 13 copies them to
  // the stack in every iteration.
  const __m256i z = _mm256_setzero_si256();
#define QLIB_LOAD(r)                                                                       \
  __m256i c##r##0 = (r < R && accumulate)                                                  \
                        ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * ldc)) \
                        : z;                                                               \
  __m256i c##r##1 = (r < R && accumulate)                                                  \
                        ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * ldc + 8)) \
                        : z;
  QLIB_LOAD(0) QLIB_LOAD(1) QLIB_LOAD(2) QLIB_LOAD(3) QLIB_LOAD(4) QLIB_LOAD(5)
#undef QLIB_LOAD
  const int8_t* b1 = b + bstride;
  const int32_t* ap = reinterpret_cast<const int32_t*>(a);
  const int64_t words = kc / Step::G;
  for (int64_t kw = 0; kw < words; ++kw, ap += R) {
    const __m256i w0 = Step::load_b(b + kw * bword);
    const __m256i w1 = Step::load_b(b1 + kw * bword);
#define QLIB_ROW(r)                                   \
  if constexpr (r < R) {                              \
    const __m256i av = _mm256_set1_epi32(ap[r]);      \
    c##r##0 = Step::dot(c##r##0, av, w0);             \
    c##r##1 = Step::dot(c##r##1, av, w1);             \
  }
    QLIB_ROW(0) QLIB_ROW(1) QLIB_ROW(2) QLIB_ROW(3) QLIB_ROW(4) QLIB_ROW(5)
#undef QLIB_ROW
  }
#define QLIB_STORE(r)                                                         \
  if constexpr (r < R) {                                                      \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc), c##r##0);     \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc + 8), c##r##1); \
  }
  QLIB_STORE(0) QLIB_STORE(1) QLIB_STORE(2) QLIB_STORE(3) QLIB_STORE(4) QLIB_STORE(5)
#undef QLIB_STORE
}

// micro_packed for R <= 2 rows (decode): with 2 R accumulators the dot products' latency,
// not the B stream, bounds it, so it keeps 4 / R k words in flight per row (8 accumulators)
// and adds them up at the end (mod 2^32, like every sum here).
template <int R, class Step>
QLIB_AVX2_FN __attribute__((noinline)) void micro_packed_thin(const typename Step::Elem* a,
                                                              const int8_t* b, int64_t bstride,
                                                              int64_t bword, int64_t kc,
                                                              int32_t* c, int64_t ldc,
                                                              bool accumulate) {
  static_assert(R == 1 || R == 2, "micro_packed_thin is for 1 or 2 rows");
  constexpr int U = 4 / R;  // k words in flight per row; chain j: row j / U
  const __m256i z = _mm256_setzero_si256();
  __m256i s00 = z, s01 = z, s10 = z, s11 = z, s20 = z, s21 = z, s30 = z, s31 = z;
  const int32_t* ap = reinterpret_cast<const int32_t*>(a);
  const int8_t* b1 = b + bstride;
  const int64_t words = kc / Step::G;
  int64_t kw = 0;
  for (; kw + U <= words; kw += U) {
#define QLIB_CHAIN(j)                                                            \
  {                                                                              \
    const int64_t w = kw + (j) % U;                                              \
    const __m256i av = _mm256_set1_epi32(ap[w * R + (j) / U]);                \
    s##j##0 = Step::dot(s##j##0, av, Step::load_b(b + w * bword));               \
    s##j##1 = Step::dot(s##j##1, av, Step::load_b(b1 + w * bword));              \
  }
    QLIB_CHAIN(0) QLIB_CHAIN(1) QLIB_CHAIN(2) QLIB_CHAIN(3)
#undef QLIB_CHAIN
  }
  for (; kw < words; ++kw) {  // the last < U words: chains 0 (row 0) and U (row 1)
    const __m256i w0 = Step::load_b(b + kw * bword), w1 = Step::load_b(b1 + kw * bword);
    const __m256i a0 = _mm256_set1_epi32(ap[kw * R]);
    s00 = Step::dot(s00, a0, w0), s01 = Step::dot(s01, a0, w1);
    if constexpr (R == 2) {
      const __m256i a1 = _mm256_set1_epi32(ap[kw * R + 1]);
      s20 = Step::dot(s20, a1, w0), s21 = Step::dot(s21, a1, w1);
    }
  }
  __m256i rows[2][2];
  if constexpr (R == 1) {
    rows[0][0] = _mm256_add_epi32(_mm256_add_epi32(s00, s10), _mm256_add_epi32(s20, s30));
    rows[0][1] = _mm256_add_epi32(_mm256_add_epi32(s01, s11), _mm256_add_epi32(s21, s31));
  } else {
    rows[0][0] = _mm256_add_epi32(s00, s10), rows[0][1] = _mm256_add_epi32(s01, s11);
    rows[1][0] = _mm256_add_epi32(s20, s30), rows[1][1] = _mm256_add_epi32(s21, s31);
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      __m256i* out = reinterpret_cast<__m256i*>(c + r * ldc + 8 * h);
      _mm256_storeu_si256(out, accumulate ? _mm256_add_epi32(_mm256_loadu_si256(out), rows[r][h])
                                          : rows[r][h]);
    }
}

template <class Step>
using MicroPackedFn = void (*)(const typename Step::Elem*, const int8_t*, int64_t, int64_t,
                               int64_t, int32_t*, int64_t, bool);
template <class Step>
constexpr MicroPackedFn<Step> kMicroPacked[kPMR] = {
    &micro_packed_thin<1, Step>, &micro_packed_thin<2, Step>, &micro_packed<3, Step>,
    &micro_packed<4, Step>, &micro_packed<5, Step>, &micro_packed<6, Step>};

// C[R, 32] (+)= R rows of an A panel x 32 columns of B in the kAmxQuads layout: 16 at b,
// 16 at b + bstride (the next panel), k words bword = 64 bytes apart. Same accumulator
// scheme as micro_packed; zmm registers (compiled for AVX512 here only, run after the check).
// Keeps loaded B vectors in registers: else GCC may fold a vector used by several rows into
// each vpdpbusd as a memory operand, one load per row (micro_zmm<3>: 6 zmm loads a k word, not
// 2; 1.1x slower than 4 rows at one thread on Zen 4, whose loads then bound the loop).
QLIB_AVX512_FN inline void in_registers(__m512i& v0, __m512i& v1) { asm("" : "+v"(v0), "+v"(v1)); }

template <int R>
QLIB_AVX512_FN __attribute__((noinline)) void micro_zmm(const uint8_t* a, const int8_t* b,
                                                       int64_t bstride, int64_t bword, int64_t kc,
                                                       int32_t* c, int64_t ldc, bool accumulate) {
  static_assert(kZmmMR == 12 && R >= 1 && R <= kZmmMR, "micro_zmm is written out for 12 rows");
  const __m512i z = _mm512_setzero_si512();
#define QLIB_LOAD(r)                                                               \
  __m512i c##r##0 = (r < R && accumulate) ? _mm512_loadu_si512(c + r * ldc) : z;   \
  __m512i c##r##1 = (r < R && accumulate) ? _mm512_loadu_si512(c + r * ldc + 16) : z;
  QLIB_LOAD(0) QLIB_LOAD(1) QLIB_LOAD(2) QLIB_LOAD(3) QLIB_LOAD(4) QLIB_LOAD(5)
  QLIB_LOAD(6) QLIB_LOAD(7) QLIB_LOAD(8) QLIB_LOAD(9) QLIB_LOAD(10) QLIB_LOAD(11)
#undef QLIB_LOAD
  const int8_t* b1 = b + bstride;
  const int32_t* ap = reinterpret_cast<const int32_t*>(a);
  const int64_t words = kc / 4;
  for (int64_t kw = 0; kw < words; ++kw, ap += R) {
    __m512i w0 = _mm512_loadu_si512(b + kw * bword), w1 = _mm512_loadu_si512(b1 + kw * bword);
    in_registers(w0, w1);
#define QLIB_ROW(r)                                   \
  if constexpr (r < R) {                              \
    const __m512i av = _mm512_set1_epi32(ap[r]);      \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, av, w0);   \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, av, w1);   \
  }
    QLIB_ROW(0) QLIB_ROW(1) QLIB_ROW(2) QLIB_ROW(3) QLIB_ROW(4) QLIB_ROW(5)
    QLIB_ROW(6) QLIB_ROW(7) QLIB_ROW(8) QLIB_ROW(9) QLIB_ROW(10) QLIB_ROW(11)
#undef QLIB_ROW
  }
#define QLIB_STORE(r)                                   \
  if constexpr (r < R) {                                \
    _mm512_storeu_si512(c + r * ldc, c##r##0);          \
    _mm512_storeu_si512(c + r * ldc + 16, c##r##1);     \
  }
  QLIB_STORE(0) QLIB_STORE(1) QLIB_STORE(2) QLIB_STORE(3) QLIB_STORE(4) QLIB_STORE(5)
  QLIB_STORE(6) QLIB_STORE(7) QLIB_STORE(8) QLIB_STORE(9) QLIB_STORE(10) QLIB_STORE(11)
#undef QLIB_STORE
}

// 1-2 rows (decode): micro_packed_thin's scheme on zmm, both 16-column panels at once (two B
// streams), 4 / R k words in flight per row.
template <int R>
QLIB_AVX512_FN __attribute__((noinline)) void micro_zmm_thin(const uint8_t* a, const int8_t* b,
                                                            int64_t bstride, int64_t bword,
                                                            int64_t kc, int32_t* c, int64_t ldc,
                                                            bool accumulate) {
  static_assert(R == 1 || R == 2, "micro_zmm_thin is for 1 or 2 rows");
  constexpr int U = 4 / R;  // k words in flight per row; chain j: row j / U
  const __m512i z = _mm512_setzero_si512();
  __m512i s00 = z, s01 = z, s10 = z, s11 = z, s20 = z, s21 = z, s30 = z, s31 = z;
  const int32_t* ap = reinterpret_cast<const int32_t*>(a);
  const int8_t* b1 = b + bstride;
  const int64_t words = kc / 4;
  int64_t kw = 0;
  for (; kw + U <= words; kw += U) {
    // Each word's two B vectors are loaded once: row 0 takes them in chain u, row 1 (R = 2)
    // in chain u + U.
#define QLIB_LOAD(u)                                                   \
  __m512i w##u##0 = _mm512_loadu_si512(b + (kw + u) * bword),          \
          w##u##1 = _mm512_loadu_si512(b1 + (kw + u) * bword);         \
  in_registers(w##u##0, w##u##1);
#define QLIB_CHAIN(j, u, r)                                            \
  {                                                                    \
    const __m512i av = _mm512_set1_epi32(ap[(kw + u) * R + r]);        \
    s##j##0 = _mm512_dpbusd_epi32(s##j##0, av, w##u##0);               \
    s##j##1 = _mm512_dpbusd_epi32(s##j##1, av, w##u##1);               \
  }
    if constexpr (R == 1) {
      QLIB_LOAD(0) QLIB_LOAD(1) QLIB_LOAD(2) QLIB_LOAD(3)
      QLIB_CHAIN(0, 0, 0) QLIB_CHAIN(1, 1, 0) QLIB_CHAIN(2, 2, 0) QLIB_CHAIN(3, 3, 0)
    } else {
      QLIB_LOAD(0) QLIB_LOAD(1)
      QLIB_CHAIN(0, 0, 0) QLIB_CHAIN(1, 1, 0) QLIB_CHAIN(2, 0, 1) QLIB_CHAIN(3, 1, 1)
    }
#undef QLIB_CHAIN
#undef QLIB_LOAD
  }
  for (; kw < words; ++kw) {  // the last < U words: chains 0 (row 0) and U (row 1)
    const __m512i w0 = _mm512_loadu_si512(b + kw * bword), w1 = _mm512_loadu_si512(b1 + kw * bword);
    const __m512i a0 = _mm512_set1_epi32(ap[kw * R]);
    s00 = _mm512_dpbusd_epi32(s00, a0, w0), s01 = _mm512_dpbusd_epi32(s01, a0, w1);
    if constexpr (R == 2) {
      const __m512i a1 = _mm512_set1_epi32(ap[kw * R + 1]);
      s20 = _mm512_dpbusd_epi32(s20, a1, w0), s21 = _mm512_dpbusd_epi32(s21, a1, w1);
    }
  }
  __m512i rows[2][2];
  if constexpr (R == 1) {
    rows[0][0] = _mm512_add_epi32(_mm512_add_epi32(s00, s10), _mm512_add_epi32(s20, s30));
    rows[0][1] = _mm512_add_epi32(_mm512_add_epi32(s01, s11), _mm512_add_epi32(s21, s31));
  } else {
    rows[0][0] = _mm512_add_epi32(s00, s10), rows[0][1] = _mm512_add_epi32(s01, s11);
    rows[1][0] = _mm512_add_epi32(s20, s30), rows[1][1] = _mm512_add_epi32(s21, s31);
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      int32_t* out = c + r * ldc + 16 * h;
      _mm512_storeu_si512(out, accumulate ? _mm512_add_epi32(_mm512_loadu_si512(out), rows[r][h])
                                          : rows[r][h]);
    }
}

constexpr MicroPackedFn<StepZmm> kMicroZmm[kZmmMR] = {
    &micro_zmm_thin<1>, &micro_zmm_thin<2>, &micro_zmm<3>, &micro_zmm<4>, &micro_zmm<5>, &micro_zmm<6>,
    &micro_zmm<7>, &micro_zmm<8>, &micro_zmm<9>, &micro_zmm<10>, &micro_zmm<11>, &micro_zmm<12>};

template <class Step>
MicroPackedFn<Step> micro_for(int64_t rows) {
  if constexpr (Step::kCols == 32) return kMicroZmm[rows - 1];
  else return kMicroPacked<Step>[rows - 1];
}

// Called with a finished tile of C: rows [m0, m1), columns [n0, n1), element (m, n) at
// ct[(m - m0) * ldt + (n - n0)]. From a uint8 (VNNI) step it still holds 128 * rowsum(B).
using PackedEpilogue =
    std::function<void(int64_t m0, int64_t m1, int64_t n0, int64_t n1, const int32_t* ct, int64_t ldt)>;
// The kernels on the plain weight also hand over the sums of w's rows n0 .. n1 - 1 when asked
// (a zero point's term), else nullptr.
using RowsEpilogue = std::function<void(int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                                        const int32_t* ct, int64_t ldt, const int32_t* rowsum)>;

// Hands out tiles [0, tiles) to P threads: each walks its own contiguous 1/P of them (its
// lane) from the front, then takes what is left of the other lanes from their back ends, so a
// descheduled thread (a shared machine) delays only its current tile. Each thread's tiles are
// neighbours in B: with one shared counter in tile order the threads took turns over
// neighbouring tiles and a weight streamed 1.1-1.5x slower at 3-16 rows of x (Zen 4; 4096^2
// and 4096 x 11008), and with a counter that turned between far-apart lanes not much faster.
class TileLanes {
 public:
  explicit TileLanes(int64_t tiles)
      : lanes_(std::clamp<int64_t>(at::get_num_threads(), 1, std::max<int64_t>(tiles, 1))),
        ranges_(new std::atomic<uint64_t>[lanes_]) {
    TORCH_INTERNAL_ASSERT(tiles < (int64_t{1} << 31), "int8 TileLanes: too many tiles");
    const int64_t per = (tiles + lanes_ - 1) / lanes_;
    for (int64_t l = 0; l < lanes_; ++l)
      ranges_[l] = pack(std::min(l * per, tiles), std::min((l + 1) * per, tiles));
  }
  int64_t lanes() const { return lanes_; }
  // The next tile for the thread of lane l: its own lane's front, else another lane's back;
  // -1 when none are left.
  int64_t take(int64_t l) {
    int64_t t = pop(l, true);
    for (int64_t j = 1; t < 0 && j < lanes_; ++j) t = pop((l + j) % lanes_, false);
    return t;
  }

 private:
  static uint64_t pack(int64_t front, int64_t back) { return static_cast<uint64_t>(front) << 32 | back; }
  int64_t pop(int64_t l, bool from_front) {  // one tile of lane l's range [front, back)
    uint64_t r = ranges_[l].load();
    for (;;) {
      const int64_t f = static_cast<int64_t>(r >> 32), b = static_cast<int64_t>(r & 0xFFFFFFFFu);
      if (f >= b) return -1;
      if (ranges_[l].compare_exchange_weak(r, from_front ? pack(f + 1, b) : pack(f, b - 1)))
        return from_front ? f : b - 1;
    }
  }
  const int64_t lanes_;
  const std::unique_ptr<std::atomic<uint64_t>[]> ranges_;  // per lane: front << 32 | back
};

// C = A B^T with A in panels (pack_a, quantize_rows_panels; K padded to pb.Kp) and B packed
// (pack_b) in a layout of Step's A type; each thread tile accumulates in a private int32
// buffer (L2 resident) and hands it to the epilogue.
template <class Step>
void gemm_packed(const typename Step::Elem* ap, int64_t M, const PackedB& pb,
                 const PackedEpilogue& epilogue) {
  constexpr bool int16_a = std::is_same_v<typename Step::Elem, int16_t>;
  constexpr int64_t cols = Step::kCols;  // per micro-kernel call
  TORCH_INTERNAL_ASSERT((pb.layout == PackLayout::kInt16Pairs) == int16_a &&
                            (cols == 16 || is_amx(pb.layout)),
                        "int8 gemm_packed: B layout mismatch");
  // From the first 8 or 16 columns of a call to the next (micro_zmm: the next 16-col panel).
  const int64_t bstride = cols == 32 ? pb.Kp * 16 : pb.half_offset();
  const int64_t N = pb.N, Kp = pb.Kp;
  const int64_t mt = (M + kPMc - 1) / kPMc;
  const PanelRows split(M, Step::kMaxRows);
  // Narrower column tiles when there are too few tiles to keep every thread busy.
  int64_t nc = kPNc;
  while (nc > 2 * cols && mt * ((N + nc - 1) / nc) < 4 * at::get_num_threads()) nc /= 2;
  const int64_t nt = (N + nc - 1) / nc;
  const int64_t tiles = mt * nt;
  // K blocks keep a tile's A panels in L2 while B strips stream past them; with a single
  // row panel, A is small anyway, and whole-K strips read B as long linear streams. The zmm
  // step runs whole-K strips at every M: 2-14% faster than K blocks of 1024 on Zen 4 (M = 16
  // to 1024, K = 2048 to 11008; stop 17), fewer C reloads and B stream restarts.
  const int64_t kblock = M <= kPMR || cols == 32 ? Kp : kPKc;
  TileLanes lanes(tiles);
  // (A thread given several lanes, as where parallel_for runs inline, takes all tiles in its first.)
  at::parallel_for(0, lanes.lanes(), 1, [&](int64_t lane, int64_t) {
    // Uninitialized: the first K block of every micro-kernel call overwrites its part.
    const std::unique_ptr<int32_t[]> ct(new int32_t[kPMc * kPNc]);
    for (int64_t t = lanes.take(lane); t >= 0; t = lanes.take(lane)) {
      // N-major tile order: consecutive tiles of a thread share the B strip.
      const int64_t m0 = (t % mt) * kPMc, m1 = std::min(M, m0 + kPMc);
      const int64_t n0 = (t / mt) * nc, n1 = std::min(N, n0 + nc);
      const int64_t npad = (n1 - n0 + cols - 1) / cols * cols;
      for (int64_t k0 = 0; k0 < Kp; k0 += kblock) {
        const int64_t kc = std::min(kblock, Kp - k0);
        for (int64_t n = 0; n < npad; n += cols) {
          const int8_t* bp = pb.panel(n0 + n) + k0 * pb.cols();
          for (int64_t m = 0, rows; m < m1 - m0; m += rows) {  // (tiles hold whole panels)
            rows = split.rows(m0 + m);
            micro_for<Step>(rows)(ap + (m0 + m) * Kp + k0 * rows, bp, bstride, pb.word_bytes(), kc,
                                  ct.get() + m * kPNc + n, kPNc, k0 > 0);
          }
        }
      }
      if (Kp == 0) std::fill(ct.get(), ct.get() + kPMc * kPNc, 0);
      epilogue(m0, m1, n0, n1, ct.get(), kPNc);
    }
  });
}

// gemm_packed on the plain weight w [N, K] (row stride ldw), for QLIB_INT8_PACKED_COPY=0: each
// thread packs the columns of one micro-kernel call over a K block (pack_panel16_zmm, else
// pack_rows8) into a private buffer and runs them against all rows of its tile. Tiles of
// kPlainMc rows (4x gemm_packed's: fewer re-packs, A's block of K still in L2) and K blocks of
// kPKc at every M. Uint8 steps' 128 * rowsum(w) is taken off in the tile; the epilogue gets
// the row sums when `sums` (a zero point's term).
constexpr int64_t kPlainMc = 384;  // rows per thread tile (multiple of kPMR)
template <class Step>
void gemm_panels_plain(const typename Step::Elem* ap, int64_t M, const int8_t* w, int64_t ldw,
                       int64_t N, int64_t K, PackLayout layout, bool sums,
                       const RowsEpilogue& epilogue) {
  constexpr bool u8_a = std::is_same_v<typename Step::Elem, uint8_t>;
  constexpr int64_t cols = Step::kCols;  // per micro-kernel call
  TORCH_INTERNAL_ASSERT((layout == PackLayout::kInt16Pairs) != u8_a && (cols == 16 || is_amx(layout)),
                        "int8 gemm_panels_plain: layout mismatch");
  const int64_t Kp = padded_k(K, layout), pc = panel_cols(layout);
  const int64_t g = layout == PackLayout::kInt16Pairs ? 2 : 4, pitch = pc * g;
  const int64_t mt = (M + kPlainMc - 1) / kPlainMc;
  const PanelRows split(M, Step::kMaxRows);
  int64_t nc = kPNc;
  while (nc > 2 * cols && mt * ((N + nc - 1) / nc) < 4 * at::get_num_threads()) nc /= 2;
  const int64_t tiles = mt * ((N + nc - 1) / nc);
  TileLanes lanes(tiles);
  at::parallel_for(0, lanes.lanes(), 1, [&](int64_t lane, int64_t) {  // (as in gemm_packed)
    // Per thread, kept (fresh buffers cost page faults every call).
    thread_local std::vector<int32_t> ct;
    thread_local std::vector<int8_t> group, tail;
    ct.resize(kPlainMc * kPNc);
    group.resize(cols * kPKc);
    tail.resize(8 * kPKc);
    int32_t rowsum[kPNc];
    for (int64_t t = lanes.take(lane); t >= 0; t = lanes.take(lane)) {
      const int64_t m0 = (t % mt) * kPlainMc, m1 = std::min(M, m0 + kPlainMc);
      const int64_t n0 = (t / mt) * nc, n1 = std::min(N, n0 + nc);
      const int64_t npad = (n1 - n0 + cols - 1) / cols * cols;
      std::fill(rowsum, rowsum + npad, 0);
      for (int64_t k0 = 0; k0 < Kp; k0 += kPKc) {
        const int64_t kc = std::min(kPKc, Kp - k0), kv = std::clamp<int64_t>(K - k0, 0, kc);
        // From the first 8 or 16 columns of a call to the next, in the group buffer.
        const int64_t bstride = cols == 32 ? kc * 16 : pc == 8 ? kc * 8 : 32;
        for (int64_t n = 0; n < npad; n += cols) {
          if constexpr (cols == 32) {  // two 16-column panels
            for (int64_t j = 0; j < cols; j += 16) {
              const int64_t row = n0 + n + j;
              pack_panel16_zmm(w + row * ldw + k0, ldw, std::clamp<int64_t>(N - row, 0, 16), kv, kc,
                               group.data() + j * kc, rowsum + n + j);
            }
          } else {
            for (int64_t j = 0; j < cols; j += 8) {  // 8 rows of w (past N: zeros)
              const int64_t row = n0 + n + j;
              const int8_t* src = w + row * ldw + k0;
              int64_t ld = ldw;
              if (row + 8 > N) {
                std::fill(tail.begin(), tail.begin() + 8 * kv, int8_t{0});
                for (int64_t i = 0; row + i < N; ++i) std::memcpy(tail.data() + i * kv, src + i * ldw, kv);
                src = tail.data(), ld = kv;
              }
              int32_t s8[8];
              pack_rows8(src, ld, kv, kc, layout, group.data() + (j / pc) * kc * pc + (j % pc) * g, pitch, s8);
              for (int i = 0; i < 8; ++i) rowsum[n + j + i] += s8[i];
            }
          }
          for (int64_t m = 0, rows; m < m1 - m0; m += rows) {
            rows = split.rows(m0 + m);
            micro_for<Step>(rows)(ap + (m0 + m) * Kp + k0 * rows, group.data(), bstride, pitch, kc,
                                  ct.data() + m * kPNc + n, kPNc, k0 > 0);
          }
        }
      }
      if (u8_a) {  // A was q + 128: less 128 * rowsum (mod 2^32)
        uint32_t off[kPNc];
        for (int64_t n = 0; n < n1 - n0; ++n) off[n] = static_cast<uint32_t>(rowsum[n]) * 128u;
        for (int64_t m = 0; m < m1 - m0; ++m) {
          uint32_t* c = reinterpret_cast<uint32_t*>(ct.data() + m * kPNc);
          for (int64_t n = 0; n < n1 - n0; ++n) c[n] -= off[n];
        }
      }
      epilogue(m0, m1, n0, n1, ct.data(), kPNc, sums ? rowsum : nullptr);
    }
  });
}

// ---------------------------------------------------------------- AMX (tile) kernel
// TDPBSSD multiplies signed int8 tiles into int32 tiles (exact, wrapping like the others):
// C (16 x 16 int32) += A (16 rows x 64 k) . B (16 k words x 16 columns x 4 k). A is row-major
// int8 with rows padded to 32 and K to pb.Kp (zeros); B is the kAmxQuads layout, one 16-column
// panel a 1 KiB tile per 64 k. Register blocking: 2 x 2 C tiles (32 x 32), tmm4-7; A in
// tmm0-1, B in tmm2-3.
constexpr int64_t kAMc = 128;   // rows per thread tile (multiple of 32)
constexpr int64_t kANc = 256;   // columns per thread tile (multiple of 32)
constexpr int64_t kAKc = 1024;  // K per cache block (multiple of 64): a 32-column B strip is 32 KiB

// Smallest M for the AMX kernel on a kAmxQuads weight (int8_gemm; a weight packed by avx512-vnni);
// below it the VNNI (zmm) step runs the same packed weight (the
// break-even measured on a Xeon with AMX at K = N = 768 and 4096: VNNI 2x faster at M <= 4,
// equal at 8, AMX 1.2x faster at 16).
int64_t amx_min_m() {
  static const int64_t env = [] {
    const char* e = std::getenv("QLIB_INT8_AMX_MIN_M");  // tuning knob (benchmarks)
    return e != nullptr ? std::atoll(e) : int64_t{-1};
  }();
  return env >= 0 ? env : 8;
}

int64_t amx_rows(int64_t M) { return (M + 31) / 32 * 32; }

#define QLIB_AMX_FN __attribute__((target("amx-tile,amx-int8")))


// ct[32, 16 NB] (row stride ldc, int32) (+)= A rows [32] x B columns [16 NB] over kc k; a: row
// 0, k0 of A (row stride lda); b0, b1: the two 16-column panels at k0 (b1 unused if NB = 1).
template <int NB>
QLIB_AMX_FN void micro_amx(const int8_t* a, int64_t lda, const int8_t* b0, const int8_t* b1,
                           int64_t kc, int32_t* c, int64_t ldc, bool accumulate) {
  static_assert(NB == 1 || NB == 2, "micro_amx: one or two B panels");
  const int64_t ldc_b = ldc * 4;
  asm volatile("" ::: "memory");  // A, B and c are written before the tile loads read them
  if (accumulate) {
    _tile_loadd(4, c, ldc_b);
    _tile_loadd(6, c + 16 * ldc, ldc_b);
    if constexpr (NB == 2) {
      _tile_loadd(5, c + 16, ldc_b);
      _tile_loadd(7, c + 16 * ldc + 16, ldc_b);
    }
  } else {
    _tile_zero(4);
    _tile_zero(6);
    if constexpr (NB == 2) {
      _tile_zero(5);
      _tile_zero(7);
    }
  }
  const int8_t* a1 = a + 16 * lda;
  for (int64_t k = 0; k < kc; k += 64) {
    _tile_loadd(0, a + k, lda);
    _tile_loadd(1, a1 + k, lda);
    _tile_loadd(2, b0 + k * 16, 64);
    _tile_dpbssd(4, 0, 2);
    _tile_dpbssd(6, 1, 2);
    if constexpr (NB == 2) {
      _tile_loadd(3, b1 + k * 16, 64);
      _tile_dpbssd(5, 0, 3);
      _tile_dpbssd(7, 1, 3);
    }
  }
  _tile_stored(4, c, ldc_b);
  _tile_stored(6, c + 16 * ldc, ldc_b);
  if constexpr (NB == 2) {
    _tile_stored(5, c + 16, ldc_b);
    _tile_stored(7, c + 16 * ldc + 16, ldc_b);
  }
  asm volatile("" ::: "memory");  // the tile stores wrote c
}

// C = A B^T on the AMX unit: a [amx_rows(M), pb.Kp] int8 row-major (see above), pb in the
// kAmxQuads layout; thread tiles as gemm_packed's, each handed to the epilogue.
void gemm_amx(const int8_t* a, int64_t M, const PackedB& pb, const PackedEpilogue& epilogue) {
  TORCH_INTERNAL_ASSERT(pb.layout == PackLayout::kAmxQuads, "int8 gemm_amx: B layout mismatch");
  const int64_t N = pb.N, Kp = pb.Kp;
  const int64_t mt = (M + kAMc - 1) / kAMc;
  int64_t nc = kANc;
  while (nc > 32 && mt * ((N + nc - 1) / nc) < 4 * at::get_num_threads()) nc /= 2;
  const int64_t nt = (N + nc - 1) / nc, tiles = mt * nt;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, tiles, 1, [&](int64_t, int64_t) {
    const std::unique_ptr<int32_t[]> ct(new int32_t[kAMc * kANc]);
    amx_configure();  // per thread: the tile configuration is thread state
    for (int64_t t = next++; t < tiles; t = next++) {
      const int64_t m0 = (t % mt) * kAMc, m1 = std::min(M, m0 + kAMc);
      const int64_t n0 = (t / mt) * nc, n1 = std::min(N, n0 + nc);
      const int64_t mpad = amx_rows(m1 - m0), npad = (n1 - n0 + 31) / 32 * 32;
      for (int64_t k0 = 0; k0 < Kp; k0 += kAKc) {
        const int64_t kc = std::min(kAKc, Kp - k0);
        for (int64_t n = 0; n < npad; n += 32) {
          const int8_t* b0 = pb.panel(n0 + n) + k0 * 16;
          for (int64_t m = 0; m < mpad; m += 32)
            micro_amx<2>(a + (m0 + m) * Kp + k0, Kp, b0, b0 + Kp * 16, kc, ct.get() + m * kANc + n,
                      kANc, k0 > 0);
        }
      }
      if (Kp == 0) std::fill(ct.get(), ct.get() + kAMc * kANc, 0);
      epilogue(m0, m1, n0, n1, ct.get(), kANc);
    }
    amx_release();
  });
}

// a [M, K] (row stride lda) -> gemm_amx's A: [amx_rows(M), Kp], zero padded.
at::Tensor pack_a_amx(const int8_t* a, int64_t lda, int64_t M, int64_t K, int64_t Kp,
                      const at::TensorOptions& opt) {
  at::Tensor w = at::zeros({amx_rows(M), Kp}, opt.dtype(at::kChar));
  int8_t* o = w.data_ptr<int8_t>();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(Kp, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) std::memcpy(o + r * Kp, a + r * lda, K);
                   });
  return w;
}

// ---------------------------------------------------------------- kernels on the plain weight
// Under the amx kernel a weight is used as it lies (kRows: int8_pack_weight keeps only a tag),
// so Int8Linear holds 1 byte a weight. The kernels read w [N, K] (row stride ldw), nothing
// packed, so a weight changed where Python cannot repack still runs exactly; with a zero point
// they hand the epilogue the row sums they take on the way:
//   M > kRowsDotMaxM: C^T = W X^T on the tiles (gemm_amx_rows): 32 rows of w are two A tiles
//     as they lie (tileloadd takes the row stride), x's codes are packed per call into B tiles
//     (pack_b's kAmxQuads layout, x as the "B" of M rows), and each finished thread tile is
//     transposed for the epilogue.
//   Else dot products along rows on zmm (gemm_rows_dot): vpdpbusd over 64 k of up to 4 rows of
//     x by 4 of w, the 4 sums of a row of x reduced together at the end.
// With QLIB_INT8_PACKED_COPY=0 the other kernels run on the plain weight too: avx512-vnni the dot
// kernel, then x's rows in the lanes (gemm_lanes_plain) to 48 rows, then gemm_panels_plain.

// Dword j of the result of _mm512_permutexvar_epi32(this, v) is v's (j % 4) * 4 + j / 4: a 4 x 4
// transpose of 128-bit lanes of 4 dwords (what two rounds of unpack / pack leave lane-major).
QLIB_AVX512_FN inline __m512i transpose4x4_dwords() {
  return _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
}

// dst[16 x 16] (row stride ldd) = src[16 x 16]^T (row stride lds), 32-bit values.
QLIB_AVX512_FN inline void transpose16(const int32_t* src, int64_t lds, int32_t* dst, int64_t ldd) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * lds);
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: rows i, i + 1 interleaved
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + j], lane L: rows i .. i + 3 at column 4 L + j
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // output row 4 L + j: lane q from r[4 q + j]'s lane L
    const __m512i x0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);
    const __m512i x1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xDD);
    const __m512i y0 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
    const __m512i y1 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xDD);
    _mm512_storeu_si512(dst + j * ldd, _mm512_shuffle_i32x4(x0, y0, 0x88));
    _mm512_storeu_si512(dst + (4 + j) * ldd, _mm512_shuffle_i32x4(x1, y1, 0x88));
    _mm512_storeu_si512(dst + (8 + j) * ldd, _mm512_shuffle_i32x4(x0, y0, 0xDD));
    _mm512_storeu_si512(dst + (12 + j) * ldd, _mm512_shuffle_i32x4(x1, y1, 0xDD));
  }
}

// C = X W^T on the AMX unit from w [N, K] (row stride ldw, K > 0) and xb, x's codes packed by
// pack_b (kAmxQuads; xb.N = M). Thread tiles of kAMc rows of w x kANc rows of x, handed to the
// epilogue transposed (rows of x first). Tile loads read 64 k at a time, past K into the next
// row (B is zero there); reads past w's end are avoided by taking the rows from Nb on (the
// last 32; all of them when K < 64, where a read may pass several rows) from a zero-padded copy.
void gemm_amx_rows(const int8_t* w, int64_t ldw, int64_t N, int64_t K, const PackedB& xb,
                   bool sums, const RowsEpilogue& epilogue) {
  const int64_t M = xb.N, Kp = xb.Kp, Np = amx_rows(N);
  // sums: a B tile of ones in its first column (k < K) gives each 32 rows' sums.
  std::vector<int8_t> ones(sums ? Kp * 16 : 0, 0);
  for (int64_t k = 0; k < K && sums; ++k) ones[(k / 4) * 64 + k % 4] = 1;
  const int64_t Nb = K < 64 ? 0 : (N - 1) / 32 * 32;
  std::vector<int8_t> copy((Np - Nb) * Kp, 0);
  for (int64_t n = Nb; n < N; ++n) std::memcpy(copy.data() + (n - Nb) * Kp, w + n * ldw, K);
  const int64_t rt = (N + kAMc - 1) / kAMc;
  int64_t nc = kANc;
  while (nc > 32 && rt * ((M + nc - 1) / nc) < 4 * at::get_num_threads()) nc /= 2;
  const int64_t tiles = rt * ((M + nc - 1) / nc);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, tiles, 1, [&](int64_t, int64_t) {
    // [rows of w][rows of x], then transposed; kept per thread (fresh 128 KB buffers cost page
    // faults every call).
    thread_local std::vector<int32_t> ct(kAMc * kANc), ctt(kANc * kAMc), rs(kAMc * 16);
    int32_t rowsum[kAMc];
    amx_configure();
    for (int64_t t = next++; t < tiles; t = next++) {
      const int64_t r0 = (t % rt) * kAMc, r1 = std::min(N, r0 + kAMc);
      const int64_t m0 = (t / rt) * nc, m1 = std::min(M, m0 + nc);
      // Rows of x in 16s (a last 16 of a 32-row pair alone: one B tile).
      const int64_t rpad = amx_rows(r1 - r0), mpad = (m1 - m0 + 15) / 16 * 16;
      for (int64_t r = 0; r < rpad; r += 32) {  // 32 rows of w streamed along K
        const int64_t n = r0 + r;
        const int8_t* a = n < Nb ? w + n * ldw : copy.data() + (n - Nb) * Kp;
        const int64_t lda = n < Nb ? ldw : Kp;
        for (int64_t k0 = 0; k0 < Kp; k0 += kAKc) {
          const int64_t kc = std::min(kAKc, Kp - k0);
          for (int64_t m = 0; m < mpad; m += 32) {
            const int8_t* b0 = xb.panel(m0 + m) + k0 * 16;
            int32_t* c = ct.data() + r * kANc + m;
            if (mpad - m >= 32) micro_amx<2>(a + k0, lda, b0, b0 + Kp * 16, kc, c, kANc, k0 > 0);
            else micro_amx<1>(a + k0, lda, b0, nullptr, kc, c, kANc, k0 > 0);
          }
          if (sums) micro_amx<1>(a + k0, lda, ones.data() + k0 * 16, nullptr, kc, rs.data() + r * 16, 16, k0 > 0);
          for (int64_t i = r; i < r + 32 && k0 + kc == Kp; i += 16)  // done: transposed (hot)
            for (int64_t m = 0; m < mpad; m += 16)
              transpose16(ct.data() + i * kANc + m, kANc, ctt.data() + m * kAMc + i, kAMc);
        }
      }
      for (int64_t i = 0; i < r1 - r0 && sums; ++i) rowsum[i] = rs[i * 16];
      epilogue(m0, m1, r0, r1, ctt.data(), kAMc, sums ? rowsum : nullptr);
    }
    amx_release();
  });
}

// The sums of v0 .. v3's lanes, in that order.
QLIB_AVX512_FN __attribute__((always_inline)) inline __m128i sum4(__m512i v0, __m512i v1, __m512i v2,
                                                                 __m512i v3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  // Per 128-bit lane: partial sums of v0 .. v3 in that order.
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// c[r * ldc + i] = sum_k x_r[k] * w_i[k] for R <= 4 rows of x's codes (row stride ldx) and the
// first nw <= 4 rows of w (row stride ldw) on vpdpbusd (unsigned by signed bytes): w ^ 0x80
// (w + 128) is the unsigned operand, so the sums are taken less 128 * xsum[r] (x's row sums).
// Masked loads take the K tail. Sums: also the sums of the nw rows of w into rs (a fifth row
// of x, of ones). (Named accumulators, not an array: GCC kept an array's in memory.)
template <int R, bool Sums>
QLIB_AVX512_FN __attribute__((noinline)) void dot_rows_zmm(const int8_t* x, int64_t ldx,
                                                          const int32_t* xsum, const int8_t* w,
                                                          int64_t ldw, int64_t nw, int64_t K,
                                                          int32_t* c, int64_t ldc, int32_t* rs) {
  static_assert(R >= 1 && R <= 4, "dot_rows_zmm is written out for 4 rows of x");
  const __m512i z = _mm512_setzero_si512(), flip = _mm512_set1_epi8(-128), one = _mm512_set1_epi8(1);
  __m512i a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
  __m512i a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z;
  __m512i s0 = z, s1 = z, s2 = z, s3 = z;
  const int8_t* w0 = w;  // rows past nw repeat the last (computed, not stored)
  const int8_t* w1 = w + std::min<int64_t>(1, nw - 1) * ldw;
  const int8_t* w2 = w + std::min<int64_t>(2, nw - 1) * ldw;
  const int8_t* w3 = w + std::min<int64_t>(3, nw - 1) * ldw;
  // One 64-k step under `mask` (a masked 0 of w becomes 128, against x's masked 0).
#define QLIB_ROW(r)                                                                  \
  if constexpr (r < R) {                                                             \
    const __m512i xv = _mm512_maskz_loadu_epi8(mask, x + r * ldx + k);              \
    a##r##0 = _mm512_dpbusd_epi32(a##r##0, v0, xv);                              \
    a##r##1 = _mm512_dpbusd_epi32(a##r##1, v1, xv);                              \
    a##r##2 = _mm512_dpbusd_epi32(a##r##2, v2, xv);                              \
    a##r##3 = _mm512_dpbusd_epi32(a##r##3, v3, xv);                              \
  }
#define QLIB_STEP                                                                    \
  {                                                                                  \
    __m512i v0 = _mm512_maskz_loadu_epi8(mask, w0 + k), v1 = _mm512_maskz_loadu_epi8(mask, w1 + k); \
    __m512i v2 = _mm512_maskz_loadu_epi8(mask, w2 + k), v3 = _mm512_maskz_loadu_epi8(mask, w3 + k); \
    v0 = _mm512_xor_si512(v0, flip), v1 = _mm512_xor_si512(v1, flip);                \
    v2 = _mm512_xor_si512(v2, flip), v3 = _mm512_xor_si512(v3, flip);                \
    QLIB_ROW(0) QLIB_ROW(1) QLIB_ROW(2) QLIB_ROW(3)                                  \
    if constexpr (Sums) {                                                            \
      const __m512i ones = _mm512_maskz_mov_epi8(mask, one);                          \
      s0 = _mm512_dpbusd_epi32(s0, v0, ones), s1 = _mm512_dpbusd_epi32(s1, v1, ones);  \
      s2 = _mm512_dpbusd_epi32(s2, v2, ones), s3 = _mm512_dpbusd_epi32(s3, v3, ones);  \
    }                                                                                \
  }
  if constexpr (R >= 3) {  // 3-4 rows of x: the 4 weight rows interleaved, x loaded once for them
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 mask = K - k >= 64 ? ~__mmask64{0} : (__mmask64{1} << (K - k)) - 1;
      QLIB_STEP
    }
  }
#undef QLIB_STEP
#undef QLIB_ROW
  // 1-2 rows of x: weight row i over all of K, then the next, so that the 4 rows are one
  // sequential stream (4 interleaved ones were 1.2-2x slower with w streaming from memory on
  // Zen 4; at 3-4 rows of x, reloading x for every weight row cost more). Two 64-k steps in
  // flight (odd ones into e_r, t), four for one row of x (also f0, g0: torch.ao / qlib 1.33 ->
  // 1.40 at 768 x 3072, 1.18 -> 1.24 at 4096 x 11008, stop 39), so that vpdpbusd's latency
  // does not bound it.
#define QLIB_X(r, i)                                                                 \
  if constexpr (r < R) {                                                             \
    a##r##i = _mm512_dpbusd_epi32(a##r##i, v, _mm512_loadu_si512(x + r * ldx + k)); \
    e##r = _mm512_dpbusd_epi32(e##r, u, _mm512_loadu_si512(x + r * ldx + k + 64));   \
  }
#define QLIB_TAIL(r, i)                                                              \
  if constexpr (r < R)                                                               \
    a##r##i = _mm512_dpbusd_epi32(a##r##i, v, _mm512_maskz_loadu_epi8(mask, x + r * ldx + k));
#define QLIB_FOLD(r, i) \
  if constexpr (r < R) a##r##i = _mm512_add_epi32(a##r##i, e##r);
#define QLIB_W_ROW(i)                                                                          \
  if (i < nw) {  /* (rows past nw: not stored, not read) */                                   \
    __m512i e0 = z, e1 = z, t = z, f0 = z, g0 = z;                                             \
    int64_t k = 0;                                                                             \
    if constexpr (R == 1) for (; k + 256 <= K; k += 256) {  /* (four steps in flight) */       \
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(w##i + k), flip);                 \
      const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(w##i + k + 64), flip);            \
      const __m512i v2 = _mm512_xor_si512(_mm512_loadu_si512(w##i + k + 128), flip);          \
      const __m512i u2 = _mm512_xor_si512(_mm512_loadu_si512(w##i + k + 192), flip);          \
      a0##i = _mm512_dpbusd_epi32(a0##i, v, _mm512_loadu_si512(x + k));                       \
      e0 = _mm512_dpbusd_epi32(e0, u, _mm512_loadu_si512(x + k + 64));                         \
      f0 = _mm512_dpbusd_epi32(f0, v2, _mm512_loadu_si512(x + k + 128));                       \
      g0 = _mm512_dpbusd_epi32(g0, u2, _mm512_loadu_si512(x + k + 192));                       \
      if constexpr (Sums) {                                                                    \
        s##i = _mm512_dpbusd_epi32(s##i, v, one), t = _mm512_dpbusd_epi32(t, u, one);           \
        s##i = _mm512_dpbusd_epi32(s##i, v2, one), t = _mm512_dpbusd_epi32(t, u2, one);         \
      }                                                                                        \
    }                                                                                          \
    e0 = _mm512_add_epi32(e0, _mm512_add_epi32(f0, g0));                                       \
    for (; k + 128 <= K; k += 128) {                                                           \
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(w##i + k), flip);                 \
      const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(w##i + k + 64), flip);            \
      QLIB_X(0, i) QLIB_X(1, i)                                                                \
      if constexpr (Sums) s##i = _mm512_dpbusd_epi32(s##i, v, one), t = _mm512_dpbusd_epi32(t, u, one); \
    }                                                                                          \
    for (; k < K; k += 64) {                                                                   \
      const __mmask64 mask = K - k >= 64 ? ~__mmask64{0} : (__mmask64{1} << (K - k)) - 1;      \
      const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w##i + k), flip);      \
      QLIB_TAIL(0, i) QLIB_TAIL(1, i)                                                          \
      if constexpr (Sums) s##i = _mm512_dpbusd_epi32(s##i, v, _mm512_maskz_mov_epi8(mask, one)); \
    }                                                                                          \
    QLIB_FOLD(0, i) QLIB_FOLD(1, i)                                                            \
    if constexpr (Sums) s##i = _mm512_add_epi32(s##i, t);                                      \
  }
  if constexpr (R <= 2) { QLIB_W_ROW(0) QLIB_W_ROW(1) QLIB_W_ROW(2) QLIB_W_ROW(3) }
#undef QLIB_W_ROW
#undef QLIB_FOLD
#undef QLIB_TAIL
#undef QLIB_X
  // The accumulators go through memory: reduced in registers, GCC stored each every step.
  alignas(64) int32_t acc[R][4][16];
#define QLIB_SAVE(r)                                                \
  if constexpr (r < R) {                                            \
    _mm512_store_si512(acc[r][0], a##r##0);                         \
    _mm512_store_si512(acc[r][1], a##r##1);                         \
    _mm512_store_si512(acc[r][2], a##r##2);                         \
    _mm512_store_si512(acc[r][3], a##r##3);                         \
  }
  QLIB_SAVE(0) QLIB_SAVE(1) QLIB_SAVE(2) QLIB_SAVE(3)
#undef QLIB_SAVE
  alignas(64) int32_t sacc[4][16];
  if constexpr (Sums) {
    _mm512_store_si512(sacc[0], s0), _mm512_store_si512(sacc[1], s1);
    _mm512_store_si512(sacc[2], s2), _mm512_store_si512(sacc[3], s3);
  }
  for (int r = 0; r < R; ++r) {  // less 128 * xsum (mod 2^32, like every sum here)
    __m128i sums = sum4(_mm512_load_si512(acc[r][0]), _mm512_load_si512(acc[r][1]),
                        _mm512_load_si512(acc[r][2]), _mm512_load_si512(acc[r][3]));
    sums = _mm_sub_epi32(sums, _mm_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(xsum[r]) * 128u)));
    _mm_mask_storeu_epi32(c + r * ldc, static_cast<__mmask8>((1u << nw) - 1), sums);  // (a loop: a memcpy call)
  }
  if constexpr (Sums) {  // sum(w + 128) - 128 K
    const __m128i sums = _mm_sub_epi32(
        sum4(_mm512_load_si512(sacc[0]), _mm512_load_si512(sacc[1]), _mm512_load_si512(sacc[2]),
             _mm512_load_si512(sacc[3])),
        _mm_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(K) * 128u)));
    _mm_mask_storeu_epi32(rs, static_cast<__mmask8>((1u << nw) - 1), sums);
  }
}

// Up to this M the dot kernel runs, from the next the tiles (Xeon with AMX, stop 33, at M = 3-4:
// dot 1.15x faster with the weight streaming from memory (4096^2), the tiles 1.2-1.3x faster
// with it in L2 (768 x 3072); at M = 7 the tiles either way).
constexpr int64_t kRowsDotMaxM = 4;
// Up to this M the dot kernel (one weight stream a thread) runs on the plain weight even where a
// packing is given with it: on Zen 4 (stop 38) 1-2 rows ran 1.1-1.5x faster than the packed
// kernel's two panel streams (4096 x 11008 from memory: 0.42-0.55 against 0.56-0.78 ms), 3-4
// rows slower; since TileLanes 0.94-1.12x its speed (stop 39, second session). Int8Linear keeps
// only the packing since stop 40, so this runs there only under amx or without a packing.
constexpr int64_t kDotOverPackedMaxM = 2;
bool dot_over_packed(Int8Kernel kernel, int64_t M) {
  return (kernel == Int8Kernel::kAmx || kernel == Int8Kernel::kAvx512Vnni) && M <= kDotOverPackedMaxM;
}

// C = X W^T for few rows of x on dot_rows_zmm: x [M, K] codes (contiguous, K > 0), w
// [N, K] (row stride ldw), handed to the epilogue in blocks of kDotBlock rows of w.
constexpr int64_t kDotBlock = 64;
void gemm_rows_dot(const int8_t* x, int64_t M, const int32_t* xsum, const int8_t* w, int64_t ldw,
                   int64_t N, int64_t K, bool sums, const RowsEpilogue& epilogue) {
  TORCH_INTERNAL_ASSERT(M <= kRowsDotMaxM, "int8 gemm_rows_dot: for few rows of x");
  using Dot = void (*)(const int8_t*, int64_t, const int32_t*, const int8_t*, int64_t, int64_t,
                       int64_t, int32_t*, int64_t, int32_t*);
  static constexpr Dot kDot[2][4] = {
      {dot_rows_zmm<1, false>, dot_rows_zmm<2, false>, dot_rows_zmm<3, false>, dot_rows_zmm<4, false>},
      {dot_rows_zmm<1, true>, dot_rows_zmm<2, true>, dot_rows_zmm<3, true>, dot_rows_zmm<4, true>}};
  at::parallel_for(0, (N + kDotBlock - 1) / kDotBlock, 1, [&](int64_t b0, int64_t b1) {
    int32_t c[kRowsDotMaxM * kDotBlock], rowsum[kDotBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kDotBlock, n1 = std::min(N, n0 + kDotBlock);
      for (int64_t n = n0; n < n1; n += 4)
        kDot[sums][M - 1](x, K, xsum, w + n * ldw, ldw, std::min<int64_t>(4, n1 - n), K,
                          c + n - n0, kDotBlock, rowsum + n - n0);
      epilogue(0, M, n0, n1, c, kDotBlock, sums ? rowsum : nullptr);
    }
  });
}

// 5-48 rows of x on the plain weight under avx512-vnni (gemm_lanes_plain, QLIB_INT8_PACKED_COPY=0):
// C^T = W X^T with x's rows in the lanes. x's codes are laid out in panels of g = 16 / W rows, a
// zmm holding W k words (4 W k) of each of its g rows; 4 W k of a weight row, broadcast where they
// lie and taken + 128 (^ 0x80, the unsigned operand), multiply the zmm of up to 4 panels: each
// vpdpbusd does up to 64 MACs, as the packed kernel's, and nothing of w is packed or transposed;
// the sums are taken less 128 * x's row sums. (Stop 36 had x + 128 and a row of ones for w's row
// sums: an extra panel at 8, 12, 16 .. rows; the xor is 1.03-1.12x faster at 8-48 rows on Zen 4.)
// Cost against the packed copy: Xeon with AMX, stop 36, 0.9-1.1x at 8-16 rows with w streaming
// from memory, 1.05-1.3x with w in L2; Zen 4, stop 37, 1.07-1.12x at 16 rows (RESULTS).
// Up to this M (a multiple of 16); from the next, gemm_panels_plain (the two about equal at 48-64
// rows, lanes 1.05-1.2x faster at 17-32).
constexpr int64_t kRowsLanesMaxM = 48;
inline int32_t load_i32(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return v; }
inline int64_t load_i64(const int8_t* p) { int64_t v; std::memcpy(&v, p, 8); return v; }

// ct[r * ldc + 16 / W * p + j] = sum_k x_pj[k] * (w_r[k] + 128) for r < nw <= kLanesRows rows of
// w (row stride ldw) and P panels of 16 / W rows of x (panel p at xp + p * pstride, laid out by
// lanes_pack<W>). (Named accumulators: GCC kept an array's in memory.)
constexpr int64_t kLanesRows = 6;
template <int W, int P>
QLIB_AVX512_FN __attribute__((noinline)) void lanes_zmm(const int8_t* xp, int64_t pstride, const int8_t* w,
                                                       int64_t ldw, int64_t nw, int64_t K, int32_t* ct,
                                                       int64_t ldc) {
  static_assert(P >= 1 && P <= 4, "lanes_zmm: 1-4 panels");
  constexpr int64_t kStep = 4 * W;  // k per zmm of a panel
  const __m512i z = _mm512_setzero_si512(), flipw = _mm512_set1_epi8(-128);
#define QLIB_ACC(r) __m512i a##r##0 = z, a##r##1 = z, a##r##2 = z, a##r##3 = z;
  QLIB_ACC(0) QLIB_ACC(1) QLIB_ACC(2) QLIB_ACC(3) QLIB_ACC(4) QLIB_ACC(5)
#undef QLIB_ACC
  // Rows past nw repeat the last (computed, not stored).
#define QLIB_W(r) const int8_t* w##r = w + std::min<int64_t>(r, nw - 1) * ldw;
  QLIB_W(0) QLIB_W(1) QLIB_W(2) QLIB_W(3) QLIB_W(4) QLIB_W(5)
#undef QLIB_W
#define QLIB_BCAST(p)                                                                            \
  (W == 1   ? _mm512_set1_epi32(load_i32(p))                                                     \
   : W == 2 ? _mm512_set1_epi64(load_i64(p))                                                     \
   : W == 4 ? _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))      \
   : W == 8 ? _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))   \
            : _mm512_loadu_si512(p))
// One step: the panels' zmm at xk against 4 W k of each row of w (B(w_r)); Odd (P = 1): into the
// second accumulators, a second chain a row.
#define QLIB_ROW(r, B, Odd)                                                                      \
  {                                                                                              \
    const __m512i b = _mm512_xor_si512(B(w##r), flipw);                                          \
    if constexpr (Odd) {                                                                         \
      a##r##1 = _mm512_dpbusd_epi32(a##r##1, b, x0);                                             \
    } else {                                                                                     \
      a##r##0 = _mm512_dpbusd_epi32(a##r##0, b, x0);                                             \
      if constexpr (P > 1) a##r##1 = _mm512_dpbusd_epi32(a##r##1, b, x1);                        \
      if constexpr (P > 2) a##r##2 = _mm512_dpbusd_epi32(a##r##2, b, x2);                        \
      if constexpr (P > 3) a##r##3 = _mm512_dpbusd_epi32(a##r##3, b, x3);                        \
    }                                                                                            \
  }
#define QLIB_STEP(B, Odd)                                                                        \
  {                                                                                              \
    const __m512i x0 = _mm512_loadu_si512(xk);                                                   \
    const __m512i x1 = P > 1 ? _mm512_loadu_si512(xk + pstride) : x0;                            \
    const __m512i x2 = P > 2 ? _mm512_loadu_si512(xk + 2 * pstride) : x0;                        \
    const __m512i x3 = P > 3 ? _mm512_loadu_si512(xk + 3 * pstride) : x0;                        \
    QLIB_ROW(0, B, Odd) QLIB_ROW(1, B, Odd) QLIB_ROW(2, B, Odd)                                  \
    QLIB_ROW(3, B, Odd) QLIB_ROW(4, B, Odd) QLIB_ROW(5, B, Odd)                                  \
  }
#define QLIB_AT(p) QLIB_BCAST(p + kk)
#define QLIB_BLOCK(k0, Odd)                                                                      \
  _Pragma("GCC unroll 16") for (int64_t kk = k0; kk < k0 + 64; kk += kStep, xk += 64)            \
      QLIB_STEP(QLIB_AT, Odd)
  int64_t k = 0;
  const int8_t* xk = xp;
  if constexpr (P == 1)  // odd 64 k into the second panel's (unused) accumulators
    for (; k + 128 <= K; k += 128) {
      QLIB_BLOCK(k, false)
      QLIB_BLOCK(k + 64, true)
    }
  for (; k + 64 <= K; k += 64) QLIB_BLOCK(k, false)
  for (; k + kStep <= K; k += kStep, xk += 64) {
    const int64_t kk = k;
    QLIB_STEP(QLIB_AT, false)
  }
#undef QLIB_BLOCK
#undef QLIB_AT
  if (k < K) {  // a last part step: the rows' last k, then zeros
    alignas(64) int8_t pad[kLanesRows][64] = {};
#define QLIB_PAD(r) std::memcpy(pad[r], w##r + k, K - k), w##r = pad[r];
    QLIB_PAD(0) QLIB_PAD(1) QLIB_PAD(2) QLIB_PAD(3) QLIB_PAD(4) QLIB_PAD(5)
#undef QLIB_PAD
    QLIB_STEP(QLIB_BCAST, false)
  }
#undef QLIB_STEP
#undef QLIB_ROW
#undef QLIB_BCAST
  alignas(64) int32_t acc[kLanesRows][P][16];
#define QLIB_SAVE(r)                                                   \
  if constexpr (P == 1) a##r##0 = _mm512_add_epi32(a##r##0, a##r##1);  \
  _mm512_store_si512(acc[r][0], a##r##0);                              \
  if constexpr (P > 1) _mm512_store_si512(acc[r][P > 1], a##r##1);     \
  if constexpr (P > 2) _mm512_store_si512(acc[r][P > 2 ? 2 : 0], a##r##2); \
  if constexpr (P > 3) _mm512_store_si512(acc[r][P > 3 ? 3 : 0], a##r##3);
  QLIB_SAVE(0) QLIB_SAVE(1) QLIB_SAVE(2) QLIB_SAVE(3) QLIB_SAVE(4) QLIB_SAVE(5)
#undef QLIB_SAVE
  constexpr int g = 16 / W;
  constexpr __mmask16 kStarts = W == 1 ? 0xFFFF : W == 2 ? 0x5555 : W == 4 ? 0x1111 : W == 8 ? 0x0101 : 1;
  if constexpr (W == 4) {  // per 128-bit lane j (row j of each panel): the 4 panels' sums, transposed
    const __m512i order = transpose4x4_dwords();
    for (int64_t r = 0; r < nw; ++r) {
      const __m512i v0 = _mm512_load_si512(acc[r][0]);
      const __m512i v1 = P > 1 ? _mm512_load_si512(acc[r][P > 1]) : z;
      const __m512i v2 = P > 2 ? _mm512_load_si512(acc[r][P > 2 ? 2 : 0]) : z;
      const __m512i v3 = P > 3 ? _mm512_load_si512(acc[r][P > 3 ? 3 : 0]) : z;
      const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
      const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
      const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
      _mm512_mask_storeu_epi32(ct + r * ldc, (1 << (4 * P)) - 1, _mm512_permutexvar_epi32(order, u));
    }
    return;
  }
  if constexpr (W == 16 && P == 1) {  // whole sums, four rows at a time
    for (int64_t r = 0; r < nw; r += 4) {
      const __m512i v0 = _mm512_load_si512(acc[r][0]);
      const __m512i v1 = r + 1 < nw ? _mm512_load_si512(acc[r + 1][0]) : z;
      const __m512i v2 = r + 2 < nw ? _mm512_load_si512(acc[r + 2][0]) : z;
      const __m512i v3 = r + 3 < nw ? _mm512_load_si512(acc[r + 3][0]) : z;
      alignas(16) int32_t t[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), sum4(v0, v1, v2, v3));
      for (int64_t i = 0; i < 4 && r + i < nw; ++i) ct[(r + i) * ldc] = t[i];
    }
    return;
  }
  for (int64_t r = 0; r < nw; ++r)
    for (int p = 0; p < P; ++p) {  // row j of a panel: the sum of lanes j W .. j W + W - 1
      __m512i v = _mm512_load_si512(acc[r][p]);
      if constexpr (W >= 2) v = _mm512_add_epi32(v, _mm512_alignr_epi32(v, v, 1));
      if constexpr (W >= 4) v = _mm512_add_epi32(v, _mm512_alignr_epi32(v, v, 2));
      if constexpr (W >= 8) v = _mm512_add_epi32(v, _mm512_alignr_epi32(v, v, 4));
      if constexpr (W >= 16) v = _mm512_add_epi32(v, _mm512_alignr_epi32(v, v, 8));
      _mm512_mask_storeu_epi32(ct + r * ldc + g * p, (1 << g) - 1, _mm512_maskz_compress_epi32(kStarts, v));
    }
}

// Rows r0 .. r0 + 16 / W - 1 of q ([rows, K]; past `rows`: left as is) as a panel for lanes_zmm<W>
// in xp (Kp * 16 / W bytes, zeroed: K's padding stays 0): per 4 W k one zmm, whose bytes
// j * 4 W .. j * 4 W + 4 W - 1 are row r0 + j's.
template <int W>
void lanes_pack(const int8_t* q, int64_t K, int64_t r0, int64_t rows, int8_t* xp) {
  constexpr int64_t kStep = 4 * W;
  for (int64_t j = 0; j < 16 / W && r0 + j < rows; ++j) {
    const int8_t* row = q + (r0 + j) * K;
    int64_t k = 0;
    for (; k + kStep <= K; k += kStep) std::memcpy(xp + k * (16 / W) + j * kStep, row + k, kStep);
    if (k < K) std::memcpy(xp + k * (16 / W) + j * kStep, row + k, K - k);
  }
}

// ctt [nn rows of w][ldc] (lanes 0 .. M - 1: rows of x) less 128 * xsum[m] (mod 2^32),
// transposed into ct [M rounded up to 16][ldt]. What the transposes read past nn rows and M
// lanes is zeroed first (never written by the kernels).
QLIB_AVX512_FN void lanes_finish(int32_t* ctt, int64_t ldc, int64_t nn, int64_t M, const int32_t* xsum,
                                 int32_t* ct, int64_t ldt) {
  const int64_t mp = (M + 15) / 16 * 16;
  for (int64_t m = 0; m < M; m += 16) {
    const __mmask16 valid = M - m >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (M - m)) - 1);
    const __m512i off = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(valid, xsum + m), 7);
    for (int64_t n = 0; n < nn; ++n)
      _mm512_storeu_si512(ctt + n * ldc + m,
                          _mm512_maskz_sub_epi32(valid, _mm512_maskz_loadu_epi32(valid, ctt + n * ldc + m), off));
  }
  for (int64_t n = nn; n < (nn + 15) / 16 * 16; ++n) std::fill(ctt + n * ldc, ctt + n * ldc + mp, 0);
  for (int64_t m = 0; m < M; m += 16)
    for (int64_t i = 0; i < nn; i += 16) transpose16(ctt + i * ldc + m, ldc, ct + m * ldt + i, ldt);
}

void gemm_lanes_plain(const int8_t* q, int64_t M, const int8_t* w, int64_t ldw, int64_t N, int64_t K,
                      bool sums, const RowsEpilogue& epilogue) {
  TORCH_INTERNAL_ASSERT(M > kRowsDotMaxM && M <= kRowsLanesMaxM, "int8 gemm_lanes_plain: for 5-", kRowsLanesMaxM,
                        " rows of x");
  // x's codes in panels (K padded to Kp with zeros); their row sums for the offset.
  const int64_t Kp = (K + 63) / 64 * 64;
  alignas(64) int32_t xsum[kRowsLanesMaxM];
  for (int64_t m = 0; m < M; ++m) xsum[m] = static_cast<int32_t>(row_sum(q + m * K, 0, K));
  // The rows in P panels of 4 (W = 4: 16 k of w a broadcast, shared by the up to 4 panels of a
  // call), and the last 1 or 2 in a panel of their own (W = 16 or 8) rather than fill a panel
  // with zeros (the MACs bound it): as many vpdpbusd as rows, but 3 rows left over fill a panel.
  // w's row sums (a zero point's term) by a pass over its rows, only when asked.
  int64_t P = M / 4, rest = M - 4 * P;
  if (rest == 3) P += 1, rest = 0;
  const int64_t panel = Kp * 4;
  std::vector<int8_t> xp(panel * P + Kp * rest, 0);
  for (int64_t p = 0; p < P; ++p) lanes_pack<4>(q, K, 4 * p, M, xp.data() + panel * p);
  if (rest == 1) lanes_pack<16>(q, K, 4 * P, M, xp.data() + panel * P);
  if (rest == 2) lanes_pack<8>(q, K, 4 * P, M, xp.data() + panel * P);
  using Lanes = void (*)(const int8_t*, int64_t, const int8_t*, int64_t, int64_t, int64_t, int32_t*, int64_t);
  static constexpr Lanes kPanels[4] = {lanes_zmm<4, 1>, lanes_zmm<4, 2>, lanes_zmm<4, 3>, lanes_zmm<4, 4>};
  const Lanes lanes_rest = rest == 1 ? lanes_zmm<16, 1> : lanes_zmm<8, 1>;
  constexpr int64_t kLd = kRowsLanesMaxM;  // ctt's row stride
  at::parallel_for(0, (N + kDotBlock - 1) / kDotBlock, 1, [&](int64_t b0, int64_t b1) {
    // [w rows][x rows], then transposed
    alignas(64) int32_t ctt[kDotBlock * kLd], ct[kRowsLanesMaxM * kDotBlock];
    int32_t rowsum[kDotBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kDotBlock, n1 = std::min(N, n0 + kDotBlock);
      for (int64_t n = n0; n < n1; n += kLanesRows) {
        const int64_t nw = std::min(kLanesRows, n1 - n);
        int32_t* c = ctt + (n - n0) * kLd;
        for (int64_t p = 0; p < P; p += 4)  // (the rows of w in L1 after the first call)
          kPanels[std::min<int64_t>(4, P - p) - 1](xp.data() + panel * p, panel, w + n * ldw, ldw, nw, K,
                                                   c + 4 * p, kLd);
        if (rest > 0) lanes_rest(xp.data() + panel * P, 0, w + n * ldw, ldw, nw, K, c + 4 * P, kLd);
      }
      lanes_finish(ctt, kLd, n1 - n0, M, xsum, ct, kDotBlock);
      for (int64_t n = n0; n < n1 && sums; ++n) rowsum[n - n0] = static_cast<int32_t>(row_sum(w + n * ldw, 0, K));
      epilogue(0, M, n0, n1, ct, kDotBlock, sums ? rowsum : nullptr);
    }
  });
}
#endif

PackLayout kernel_layout(Int8Kernel kernel) {
  switch (kernel) {
    case Int8Kernel::kAvx2: return PackLayout::kInt16Pairs;
    case Int8Kernel::kAmx:
    case Int8Kernel::kAvx512Vnni: return PackLayout::kAmxQuads;
    default: return PackLayout::kU8Quads;
  }
}

// The layout int8_pack_weight packs for `kernel`. By default amx reads the weight as it lies
// (kRows) and the other kernels have their panels (Int8Linear then keeps only those, in place
// of the plain weight). QLIB_INT8_PACKED_COPY (read once) = 1 gives every kernel its panels
// (amx: 1.1-1.3x faster from M = 32), = 0 none: the others then run on the plain weight
// (avx512-vnni: 0.8-1.3x the packed time at every M on a Xeon with AMX, stop 36; 1.0-1.26x at
// 1 thread on Zen 4; on 2 threads 1.5-1.6x at 3-4 rows and 1.1-1.3x at 8-16 streaming 4096^2,
// stop 39; 0.9-1.07x at 1-2 rows, stop 40; avx-vnni / avx2 1.2-1.8x at M = 1-16; RESULTS).
PackLayout weight_layout(Int8Kernel kernel) {
  static const int packed_copy = [] {  // -1: unset
    const char* e = std::getenv("QLIB_INT8_PACKED_COPY");
    if (e == nullptr || *e == '\0') return -1;
    TORCH_CHECK(std::string(e) == "0" || std::string(e) == "1",
                "the environment variable QLIB_INT8_PACKED_COPY=", e, " must be 0 or 1");
    return *e - '0';
  }();
  const bool copy = packed_copy == -1 ? kernel != Int8Kernel::kAmx : packed_copy == 1;
  return copy ? kernel_layout(kernel) : PackLayout::kRows;
}

// The kernel that runs a weight packed in `layout`: this process's, or (a weight packed on
// another machine, e.g. inside an exported program) one this CPU has for that layout: AVX2
// for the int16 one, else the best uint8 (VNNI) step, which runs the AMX layout too; a kRows
// one runs unpacked on this process's kernel. Exact either way; only slower.
Int8Kernel kernel_for_layout(PackLayout layout) {
  const Int8Kernel current = current_int8_kernel();
  if (kernel_layout(current) == layout || weight_layout(current) == layout) return current;
  QLIB_WARN("qlib int8: a weight was packed for another int8 CPU kernel than this "
                  "process's '", int8_cpu_kernel(), "'; it runs exactly but not at full "
                  "speed. Re-pack it (int8_pack_weight, Int8Linear.repack()).");
  if (!has_panels(layout)) return current;
  if (layout == PackLayout::kInt16Pairs) return Int8Kernel::kAvx2;
  if (is_amx(layout) && int8_kernel_supported(Int8Kernel::kAmx)) return Int8Kernel::kAmx;
  if (is_amx(layout)) return best_u8_kernel();
  return int8_kernel_supported(Int8Kernel::kAvxVnni) ? Int8Kernel::kAvxVnni  // 8-column panels
                                                     : Int8Kernel::kVnniEmulated;
}

// What the packed kernel's int32 sums hold beyond sum a * b, per column: 128 * rowsum(B)
// when A was stored as q + 128 (a uint8 step), nothing for the int16 step and AMX. Taken
// off with wrap_sub (exact mod 2^32).
std::vector<int32_t> packed_offsets(const PackedB& pb, bool a_is_u8) {
  std::vector<int32_t> off(pb.N, 0);
  if (a_is_u8)
    for (int64_t n = 0; n < pb.N; ++n)
      off[n] = static_cast<int32_t>(static_cast<uint32_t>(pb.rowsum()[n]) * 128u);
  return off;
}

bool contains_int8_min(const int8_t* p, int64_t rows, int64_t cols, int64_t ld) {
  std::atomic<bool> found{false};
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1 && !found.load(std::memory_order_relaxed); ++r) {
                       const int8_t* row = p + r * ld;
                       int any = 0;
                       for (int64_t k = 0; k < cols; ++k) any |= row[k] == -128;
                       if (any) found.store(true, std::memory_order_relaxed);
                     }
                   });
  return found.load();
}

// K-contiguous view of a 2-D int8 operand (copies only if the last stride is not 1).
at::Tensor k_contiguous(const at::Tensor& t) {
  return (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(t.size(1), 1) &&
          t.storage_offset() >= 0)
             ? t
             : t.contiguous();
}

at::Tensor int8_gemm_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  const char* op = "qlib::int8_gemm";
  check_int8_gemm_args(op, a_in, b_in);
  // (Read at every M: a bad QLIB_INT8_CPU_KERNEL raises whatever the path.)
  [[maybe_unused]] const Int8Kernel kernel = current_int8_kernel();
  const at::Tensor a = k_contiguous(a_in), b = k_contiguous(b_in);
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  at::Tensor c = at::empty({M, N}, a.options().dtype(at::kInt));
  if (c.numel() == 0) return c;
  const int8_t* ap = a.const_data_ptr<int8_t>();
  const int8_t* bp = b.const_data_ptr<int8_t>();
  int32_t* cp = c.data_ptr<int32_t>();
  const int64_t lda = a.stride(0), ldb = b.stride(0);
#if QLIB_INT8_X86
  if (cpu_has_avx2() && K > 0 && M >= packed_min_m(false)) {
    const PackedB pb = pack_b(bp, ldb, N, K, kernel_layout(kernel), a.options());
    std::vector<int32_t> off;
    const PackedEpilogue store = [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                                     const int32_t* ct, int64_t ldt) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = n0; n < n1; ++n)
          cp[m * N + n] = wrap_sub(ct[(m - m0) * ldt + n - n0], off[n]);
    };
    if (kernel == Int8Kernel::kAmx) {  // (M >= packed_min_m, at least amx_min_m by default)
      off = packed_offsets(pb, false);
      gemm_amx(pack_a_amx(ap, lda, M, K, pb.Kp, a.options()).const_data_ptr<int8_t>(), M, pb, store);
      return c;
    }
    with_step(kernel, [&](auto step) {
      using Elem = typename decltype(step)::Elem;
      off = packed_offsets(pb, std::is_same_v<Elem, uint8_t>);
      const at::Tensor ap_panels = pack_a<decltype(step)>(ap, lda, M, K, pb.Kp, a.options());
      gemm_packed<decltype(step)>(ap_panels.const_data_ptr<Elem>(), M, pb, store);
    });
    return c;
  }
#endif
  if (cpu_has_avx2() && K > 0) {
    if (!contains_int8_min(ap, M, K, lda)) {
      gemm(ap, lda, bp, ldb, {cp, N, 1}, M, N, K, true);
      return c;
    }
    if (!contains_int8_min(bp, N, K, ldb)) {  // C^T = B A^T with B as the sign operand
      gemm(bp, ldb, ap, lda, {cp, 1, N}, N, M, K, true);
      return c;
    }
  }
  gemm(ap, lda, bp, ldb, {cp, N, 1}, M, N, K, false);
  return c;
}

// ---------------------------------------------------------------- activation quantization
// Quantizes rows [r0, r1) of x (contiguous [rows, K]) into q (codes: see Int8ActCodes) and
// writes each row's scale: fixed_scale > 0 for static per-tensor, else per-token from the
// row's absolute max. A row holding NaN gets a NaN scale, so its int8_linear outputs are
// NaN (as F.linear's would be) instead of the NaN silently becoming code 0.
constexpr float kNaNf = std::numeric_limits<float>::quiet_NaN();

template <class T>
void quantize_rows_scalar(const T* x, int8_t* q, float* scale, int64_t r0, int64_t r1, int64_t K,
                          float fixed_scale, Int8ActCodes codes) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * K;
    int8_t* qr = q + r * K;
    float s = fixed_scale;
    if (!(fixed_scale > 0.0f)) {
      float amax = 0.0f;
      for (int64_t k = 0; k < K; ++k) amax = fmaxf(amax, std::fabs(static_cast<float>(xr[k])));
      s = int8_token_scale(amax);
    }
    const float inv = 1.0f / s;
    bool nan_seen = false;
    for (int64_t k = 0; k < K; ++k) {
      const float v = static_cast<float>(xr[k]);
      nan_seen = nan_seen || v != v;
      qr[k] = int8_act_code(v, inv, codes);
    }
    scale[r] = nan_seen ? kNaNf : s;
  }
}

#if QLIB_INT8_X86
template <class T>
QLIB_AVX2_FN inline __m256 load8_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<T, at::Half>) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
}

// int8_act_code of 8 lanes: zp, lo, hi are the broadcast Int8ActCodes.
QLIB_AVX2_FN inline __m256i codes8(__m256 x, __m256 inv, __m256 zp, __m256 lo, __m256 hi) {
  __m256 r = _mm256_round_ps(_mm256_mul_ps(x, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm256_and_ps(r, _mm256_cmp_ps(r, r, _CMP_ORD_Q));  // NaN -> 0, then the zero point
  r = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, zp), lo), hi);
  return _mm256_cvtps_epi32(r);
}

// Where quantize_rows_avx2 puts its codes: row-major int8 (q[r * K + k]), or A panels
// (PanelCodes).
struct Int8RowCodes {
  int8_t* q;
  int64_t ld;  // row stride
  QLIB_AVX2_FN void put32(int64_t r, int64_t k, const __m256i (&c)[4]) const {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + r * ld + k), codes32_int8(c));
  }
  void put1(int64_t r, int64_t k, int8_t c) const { q[r * ld + k] = c; }
  QLIB_AVX512_FN void put64(int64_t r, int64_t k, __m512i c) const { _mm512_storeu_si512(q + r * ld + k, c); }
  QLIB_AVX512_FN void put16(int64_t r, int64_t k, __mmask16 m, __m512i c) const {
    _mm512_mask_cvtsepi32_storeu_epi8(q + r * ld + k, m, c);
  }
};

template <class T, class Sink>
QLIB_AVX2_FN void quantize_rows_avx2(const T* x, const Sink& sink, float* scale, int64_t r0,
                                     int64_t r1, int64_t K, float fixed_scale,
                                     Int8ActCodes codes) {
  const __m256 zp = _mm256_set1_ps(codes.zero_point), lo = _mm256_set1_ps(codes.qmin),
               hi = _mm256_set1_ps(codes.qmax);
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * K;
    float s = fixed_scale;
    if (!(fixed_scale > 0.0f)) {
      __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps();
      int64_t k = 0;
      // max_ps(v, m) returns m when v is NaN: NaNs are ignored, as fmaxf does.
      for (; k + 16 <= K; k += 16) {
        m0 = _mm256_max_ps(_mm256_and_ps(load8_float(xr + k), sign_mask), m0);
        m1 = _mm256_max_ps(_mm256_and_ps(load8_float(xr + k + 8), sign_mask), m1);
      }
      const __m256 m = _mm256_max_ps(m0, m1);  // no NaN lanes: a plain horizontal max
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
      // std::max(amax, NaN) keeps amax: NaNs are ignored here too.
      for (; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(xr[k])));
      s = int8_token_scale(amax);
    }
    const float inv_s = 1.0f / s;
    const __m256 inv = _mm256_set1_ps(inv_s);
    __m256 nan_seen = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      __m256 v[4];
      for (int u = 0; u < 4; ++u) {
        v[u] = load8_float(xr + k + 8 * u);
        nan_seen = _mm256_or_ps(nan_seen, _mm256_cmp_ps(v[u], v[u], _CMP_UNORD_Q));
      }
      __m256i c[4];
      for (int u = 0; u < 4; ++u) c[u] = codes8(v[u], inv, zp, lo, hi);
      sink.put32(r, k, c);
    }
    bool any_nan = _mm256_movemask_ps(nan_seen) != 0;
    for (; k < K; ++k) {
      const float v = static_cast<float>(xr[k]);
      any_nan = any_nan || v != v;
      sink.put1(r, k, int8_act_code(v, inv_s, codes));
    }
    scale[r] = any_nan ? kNaNf : s;
  }
}

// 16 values at p as float (lanes outside m: 0).
template <class T>
QLIB_AVX512_FN inline __m512 load16_float(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<T, at::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  } else {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
}

// quantize_rows_avx2 on zmm, the same float ops lane by lane (NaN products zeroed by the
// rounding's mask, as the AVX2 and-mask does); the K tail masked. The avx512-vnni and amx
// kernels quantize with it, row-major (Int8RowCodes; AMX Xeon, stop 36: quantize_per_token
// 1.3-1.4x faster, int8_linear under amx 1.0-1.1x) or into A panels (PanelCodes).
template <class T, class Sink>
QLIB_AVX512_FN void quantize_rows_avx512(const T* x, const Sink& sink, float* scale, int64_t r0,
                                         int64_t r1, int64_t K, float fixed_scale, Int8ActCodes codes) {
  const __m512 zp = _mm512_set1_ps(codes.zero_point), lo = _mm512_set1_ps(codes.qmin),
               hi = _mm512_set1_ps(codes.qmax);
  // packs_epi16 of two packs_epi32 leaves, per 128-bit lane L, 4 codes of each of the 4 vectors.
  const __m512i order = transpose4x4_dwords();
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * K;
    float s = fixed_scale;
    if (!(fixed_scale > 0.0f)) {
      __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
      int64_t k = 0;
      // max_ps(v, m) returns m when v is NaN: NaNs are ignored, as fmaxf does.
      for (; k + 32 <= K; k += 32) {
        m0 = _mm512_max_ps(_mm512_abs_ps(load16_float(xr + k, 0xFFFF)), m0);
        m1 = _mm512_max_ps(_mm512_abs_ps(load16_float(xr + k + 16, 0xFFFF)), m1);
      }
      for (; k < K; k += 16) {
        const __mmask16 tail = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
        m0 = _mm512_max_ps(_mm512_abs_ps(load16_float(xr + k, tail)), m0);
      }
      s = int8_token_scale(_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)));  // (no NaN lanes)
    }
    const __m512 inv = _mm512_set1_ps(1.0f / s);
    __mmask16 nan_seen = 0;
    // The codes of the 16 values at p under mask m, as int32.
    const auto codes16 = [&](__mmask16 m, const T* p) QLIB_AVX512_FN {
      const __m512 v = load16_float(p, m);
      nan_seen |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __m512 xv = _mm512_mul_ps(v, inv);  // (NaN also from Inf * 0: an Inf row's 1 / scale)
      const __m512 c = _mm512_maskz_roundscale_ps(_mm512_cmp_ps_mask(xv, xv, _CMP_ORD_Q), xv,
                                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_add_ps(c, zp), lo), hi));
    };
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {  // 64 codes packed in registers
      const __m512i c01 = _mm512_packs_epi32(codes16(0xFFFF, xr + k), codes16(0xFFFF, xr + k + 16));
      const __m512i c23 = _mm512_packs_epi32(codes16(0xFFFF, xr + k + 32), codes16(0xFFFF, xr + k + 48));
      sink.put64(r, k, _mm512_permutexvar_epi32(order, _mm512_packs_epi16(c01, c23)));
    }
    for (; k < K; k += 16) {
      const __mmask16 m = K - k >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (K - k)) - 1);
      sink.put16(r, k, m, codes16(m, xr + k));
    }
    scale[r] = nan_seen != 0 ? kNaNf : s;
  }
}

bool quantize_on_zmm() {
  const Int8Kernel k = current_int8_kernel();
  return k == Int8Kernel::kAvx512Vnni || k == Int8Kernel::kAmx;
}
#endif

// Product of all but the last dimension.
int64_t leading_rows(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

// x: contiguous [rows, K]; scale: [rows] out (see quantize_rows_scalar).
void quantize_rows(const at::Tensor& x, int8_t* q, float* scale, float fixed_scale,
                   Int8ActCodes codes = {}) {
  const int64_t K = x.size(-1);
  const int64_t rows = leading_rows(x);
  if (K == 0) {
    const float s = fixed_scale > 0.0f ? fixed_scale : int8_token_scale(0.0f);
    for (int64_t r = 0; r < rows; ++r) scale[r] = s;
    return;
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / K);
#if QLIB_INT8_X86
  const bool zmm = quantize_on_zmm();
#endif
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "qlib_quantize_rows", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
#if QLIB_INT8_X86
      if (zmm) {
        quantize_rows_avx512(xp, Int8RowCodes{q, K}, scale, r0, r1, K, fixed_scale, codes);
        return;
      }
      if (cpu_has_avx2()) {
        quantize_rows_avx2(xp, Int8RowCodes{q, K}, scale, r0, r1, K, fixed_scale, codes);
        return;
      }
#endif
      quantize_rows_scalar(xp, q, scale, r0, r1, K, fixed_scale, codes);
    });
  });
}

#if QLIB_INT8_X86
// quantize_rows, writing the codes straight into gemm_packed's A panels (one pass over x,
// no int8 copy): x contiguous [M, K] with K > 0; on zmm for the zmm step.
template <class Step>
at::Tensor quantize_rows_panels(const at::Tensor& x, int64_t M, int64_t K, int64_t kp, float* scale,
                                float fixed_scale, Int8ActCodes codes) {
  using Elem = typename Step::Elem;
  const int64_t panels = (M + kPMR - 1) / kPMR;
  at::Tensor w = at::empty({M * kp}, x.options().dtype(std::is_same_v<Elem, uint8_t> ? at::kByte : at::kShort));
  const PanelCodes<Elem> sink{w.data_ptr<Elem>(), kp, PanelRows(M, Step::kMaxRows)};
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "qlib_quantize_rows_panels", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, panels, std::max<int64_t>(1, 16384 / (K * kPMR)),
                     [&](int64_t p0, int64_t p1) {
                       // (whole panels a thread: rows of one panel share cache lines)
                       const int64_t r0 = sink.split.first(p0 * kPMR);
                       const int64_t r1 = p1 * kPMR >= M ? M : sink.split.first(p1 * kPMR);
                       if constexpr (std::is_same_v<Step, StepZmm>)  // (AVX512: this step's kernel)
                         quantize_rows_avx512(xp, sink, scale, r0, r1, K, fixed_scale, codes);
                       else
                         quantize_rows_avx2(xp, sink, scale, r0, r1, K, fixed_scale, codes);
                       for (int64_t r = r0; r < r1; ++r)  // K padding: code 0 (B is 0 there)
                         for (int64_t k = K; k < kp; ++k) sink.put1(r, k, 0);
                     });
  });
  return w;
}

// quantize_rows into gemm_amx's A: int8 [amx_rows(M), kp], row-major, zero padded.
at::Tensor quantize_rows_amx(const at::Tensor& x, int64_t M, int64_t K, int64_t kp, float* scale,
                             float fixed_scale, Int8ActCodes codes) {
  const int64_t rows = amx_rows(M);
  at::Tensor w = at::empty({rows, kp}, x.options().dtype(at::kChar));
  int8_t* q = w.data_ptr<int8_t>();
  std::memset(q + M * kp, 0, (rows - M) * kp);
  const bool zmm = quantize_on_zmm();
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "qlib_quantize_rows_amx", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t r0, int64_t r1) {
      if (zmm) quantize_rows_avx512(xp, Int8RowCodes{q, kp}, scale, r0, r1, K, fixed_scale, codes);
      else quantize_rows_avx2(xp, Int8RowCodes{q, kp}, scale, r0, r1, K, fixed_scale, codes);
      for (int64_t r = r0; r < r1; ++r) std::memset(q + r * kp + K, 0, kp - K);
    });
  });
  return w;
}
#endif

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x_in) {
  const char* op = "qlib::quantize_per_token";
  check_int8_float_input(op, "x", x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor q = empty_output(x.sizes(), x.options().dtype(at::kChar));
  std::vector<int64_t> sshape(x.sizes().begin(), x.sizes().end());
  sshape.back() = 1;
  at::Tensor scale = at::empty(sshape, x.options().dtype(at::kFloat));
  quantize_rows(x, q.data_ptr<int8_t>(), scale.data_ptr<float>(), 0.0f);
  return {q, scale};
}

// ---------------------------------------------------------------- int8_linear
// The dequant epilogue of n columns: out[j] = float(double(c[j] - off[j]) - zw[j]) * (s * ws[j])
// (+ b[j], fused: one rounding, as the CUDA epilogues); c - off wraps (exact mod 2^32), the
// zero-point term zw (nullptr: none) is taken off in double since the difference may pass int32.
inline float dequant_value(int32_t c, int32_t off, const int32_t* zw, float s, float ws,
                           const float* b) {
  const int32_t d = wrap_sub(c, off);
  const float v = zw != nullptr ? static_cast<float>(static_cast<double>(d) - *zw)
                                : static_cast<float>(d);
  return b != nullptr ? std::fma(v, s * ws, *b) : v * (s * ws);
}

#if QLIB_INT8_X86
// The first n / 8 * 8 columns of dequant_values; returns how many it did.
QLIB_AVX2_FN int64_t dequant_values_avx2(const int32_t* c, const int32_t* off, const int32_t* zw,
                                         float s, const float* ws, const float* b, float* out,
                                         int64_t n) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i d = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + j)),
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + j)));
    __m256 v;
    if (zw != nullptr) {
      const __m256i z = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(zw + j));
      const __m256d lo = _mm256_sub_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(d)),
                                       _mm256_cvtepi32_pd(_mm256_castsi256_si128(z)));
      const __m256d hi = _mm256_sub_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(d, 1)),
                                       _mm256_cvtepi32_pd(_mm256_extracti128_si256(z, 1)));
      v = _mm256_set_m128(_mm256_cvtpd_ps(hi), _mm256_cvtpd_ps(lo));
    } else {
      v = _mm256_cvtepi32_ps(d);
    }
    const __m256 sc = _mm256_mul_ps(sv, _mm256_loadu_ps(ws + j));
    v = b != nullptr ? _mm256_fmadd_ps(v, sc, _mm256_loadu_ps(b + j)) : _mm256_mul_ps(v, sc);
    _mm256_storeu_ps(out + j, v);
  }
  return j;
}
#endif

void dequant_values(const int32_t* c, const int32_t* off, const int32_t* zw, float s,
                    const float* ws, const float* b, float* out, int64_t n) {
  int64_t j = 0;
#if QLIB_INT8_X86
  if (cpu_has_avx2()) j = dequant_values_avx2(c, off, zw, s, ws, b, out, n);
#endif
  for (; j < n; ++j)
    out[j] = dequant_value(c[j], off[j], zw != nullptr ? zw + j : nullptr, s, ws[j],
                           b != nullptr ? b + j : nullptr);
}

// packed: w_in already packed by int8_pack_weight (CPU layout), or nullptr to pack per call.
// w_values = false: w_in only gives the shape (packed, with panels, is the weight; AVX2, K > 0).
at::Tensor int8_linear_impl(const char* op, const at::Tensor& x_in, const at::Tensor& w_in,
                            const at::Tensor& w_scale_in, const std::optional<at::Tensor>& bias_in,
                            const std::optional<at::Tensor>& act_scale,
                            const std::optional<at::Tensor>& act_zero_point, int64_t act_quant_min,
                            int64_t act_quant_max, const PackedB* packed, bool w_values = true) {
  check_int8_linear_args(op, x_in, w_in, w_scale_in, bias_in, act_scale, act_zero_point,
                         act_quant_min, act_quant_max);
  const int64_t N = w_in.size(0);
  const at::Tensor x = x_in.contiguous();
  const int64_t K = w_in.size(1);
  const int64_t M = leading_rows(x);
  at::Tensor out = empty_output(int8_linear_out_shape(x, N), x.options());
  if (out.numel() == 0) return out;
  const at::Tensor w = w_values ? k_contiguous(w_in) : w_in;
  const at::Tensor w_scale = w_scale_in.reshape({N}).contiguous();
  const at::Tensor bias =
      bias_in.has_value() ? bias_in->to(at::kFloat).contiguous() : at::Tensor();

  float fixed = 0.0f;  // static act_scale, or 0: per-token
  if (act_scale.has_value()) {
    fixed = act_scale->item<float>();
    TORCH_CHECK(std::isfinite(fixed) && fixed >= kMinScale, op,
                ": act_scale must be positive and finite, at least ", kMinScale,
                " (so that 1 / scale is finite), got ", fixed);
  }
  Int8ActCodes codes{0.0f, static_cast<float>(act_quant_min), static_cast<float>(act_quant_max)};
  int64_t z = 0;
  if (act_zero_point.has_value()) {
    z = act_zero_point->item<int64_t>();
    TORCH_CHECK(act_quant_min <= z && z <= act_quant_max, op, ": act_zero_point ", z,
                " is outside [act_quant_min, act_quant_max] = [", act_quant_min, ", ",
                act_quant_max, "]");
    codes.zero_point = static_cast<float>(z);
  }
  // amx runs the kernels on the plain weight at every M, packed as kRows (a tag only) or not;
  // a kRows weight runs unpacked under the other kernels (and warns).
  const Int8Kernel kernel_now = current_int8_kernel();
  const bool plain_kernel = !has_panels(weight_layout(kernel_now));
  if (packed != nullptr && !has_panels(packed->layout)) {  // a tag: the kernels read w
    if (!plain_kernel) kernel_for_layout(packed->layout);  // (for its warning)
    packed = nullptr;
  }
  // On the plain weight: few rows on the dot kernel (AVX512; without it, gemm's sign-transfer
  // kernel below), the rest on amx's tiles, avx512-vnni's lanes to 48 rows, or on panels packed
  // as the threads go.
  const bool zmm_dot = kernel_now == Int8Kernel::kAmx || kernel_now == Int8Kernel::kAvx512Vnni;
  const bool rows_path = QLIB_INT8_X86 && K > 0 && w_values &&
                         ((plain_kernel && packed == nullptr && (zmm_dot || M > kRowsDotMaxM)) ||
                          dot_over_packed(kernel_now, M));
  const bool rows_dot = rows_path && M <= kRowsDotMaxM;
  const bool rows_lanes = rows_path && !rows_dot && kernel_now == Int8Kernel::kAvx512Vnni &&
                          M <= kRowsLanesMaxM;
  const bool rows_panels = rows_path && !rows_dot && !rows_lanes && kernel_now != Int8Kernel::kAmx;
  // Elsewhere the packed kernel at large M, with a pre-packed weight, or when codes reach -128
  // (which gemm's sign-transfer kernel cannot take).
  const bool packed_path = !rows_path && QLIB_INT8_X86 && cpu_has_avx2() && K > 0 &&
                           (!w_values || M >= packed_min_m(packed != nullptr) ||
                            act_quant_min < kInt8ActQmin);
  TORCH_INTERNAL_ASSERT(w_values || (packed_path && packed != nullptr));
  PackedB packed_here;
  if (packed_path && packed == nullptr) {
    packed_here = pack_b(w.const_data_ptr<int8_t>(), w.stride(0), N, K,
                         kernel_layout(current_int8_kernel()), x.options());
    packed = &packed_here;
  }
  // With a zero point z the GEMM sums q * w, and sum (q - z) * w = that - zw[n], with
  // zw[n] = z * (sum of w's row n); zw is all zeros without one. Both terms fit int32 for
  // K <= kInt8GemmMaxK, their difference (|q - z| <= 255) not always: it is taken in
  // double (exact; int32 -> double vectorizes on AVX2, int64 -> float does not).
  std::vector<int32_t> zw(N, 0);
  if (z != 0 && !rows_path) {  // (the kernels on the plain weight hand over the row sums)
    if (packed != nullptr) {
      for (int64_t n = 0; n < N; ++n) zw[n] = static_cast<int32_t>(z * packed->rowsum()[n]);
    } else {
      const int8_t* wp = w.const_data_ptr<int8_t>();
      const int64_t ldw = w.stride(0);
      at::parallel_for(0, N, std::max<int64_t>(1, 262144 / std::max<int64_t>(K, 1)),
                       [&](int64_t n0, int64_t n1) {
                         for (int64_t n = n0; n < n1; ++n)
                           zw[n] = static_cast<int32_t>(z * row_sum(wp + n * ldw, 0, K));
                       });
    }
  }
  // The packed kernel's extra per-column term (from a uint8 step; set below), else zeros.
  std::vector<int32_t> off(N, 0);
  at::Tensor sa = at::empty({M}, x.options().dtype(at::kFloat));  // row scales (NaN: NaN row)
  at::Tensor q;
  if (!packed_path && !rows_panels) {
    q = at::empty({M, K}, x.options().dtype(at::kChar));
    quantize_rows(x, q.data_ptr<int8_t>(), sa.data_ptr<float>(), fixed, codes);
  }

  const float* swp = w_scale.const_data_ptr<float>();
  const float* sap = sa.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;

  QLIB_DISPATCH_FLOAT(x.scalar_type(), "int8_linear_cpu", [&] {
    scalar_t* op_ = out.data_ptr<scalar_t>();
    // Dequantizes int32 row segment cr[0, n1 - n0) of row m (columns [n0, n1)) into out.
    // (zwp: the zero-point terms of columns n0 .., or nullptr.)
    const auto dequant_row = [&](int64_t m, int64_t n0, int64_t n1, const int32_t* cr, const int32_t* zwp) {
      float row[std::max({kNc, kPNc, kANc})];
      float* dst = row;
      if constexpr (std::is_same_v<scalar_t, float>) dst = reinterpret_cast<float*>(op_ + m * N + n0);
      dequant_values(cr, off.data() + n0, zwp, sap[m], swp + n0, bp != nullptr ? bp + n0 : nullptr,
                     dst, n1 - n0);
      if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(row, op_ + m * N + n0, n1 - n0);
    };
#if QLIB_INT8_X86
    const PackedEpilogue dequant = [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                                       const int32_t* ct, int64_t ldt) {
      for (int64_t m = m0; m < m1; ++m)
        dequant_row(m, n0, n1, ct + (m - m0) * ldt, z != 0 ? zw.data() + n0 : nullptr);
    };
    if (rows_path) {  // (nothing stored is used: a weight changed behind a graph runs exactly)
      const RowsEpilogue dequant_rows = [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                                            const int32_t* ct, int64_t ldt, const int32_t* rowsum) {
        int32_t zwt[std::max({kAMc, kDotBlock, kPNc})];  // z * the row sums (|z| <= 128: fits int32)
        for (int64_t n = n0; n < n1 && rowsum != nullptr; ++n)
          zwt[n - n0] = static_cast<int32_t>(z * rowsum[n - n0]);
        for (int64_t m = m0; m < m1; ++m)
          dequant_row(m, n0, n1, ct + (m - m0) * ldt, rowsum != nullptr ? zwt : nullptr);
      };
      const int8_t* wp = w.const_data_ptr<int8_t>();
      if (rows_panels) {
        with_step(kernel_now, [&](auto step) {
          using Elem = typename decltype(step)::Elem;
          const PackLayout layout = kernel_layout(kernel_now);
          const at::Tensor a = quantize_rows_panels<decltype(step)>(x, M, K, padded_k(K, layout),
                                                          sa.data_ptr<float>(), fixed, codes);
          gemm_panels_plain<decltype(step)>(a.const_data_ptr<Elem>(), M, wp, w.stride(0), N, K,
                                            layout, z != 0, dequant_rows);
        });
        return;
      }
      int8_t* qp = q.data_ptr<int8_t>();
      if (rows_lanes) {
        gemm_lanes_plain(qp, M, wp, w.stride(0), N, K, z != 0, dequant_rows);
        return;
      }
      if (!rows_dot) {
        const PackedB xb = pack_b(qp, K, M, K, PackLayout::kAmxQuads, x.options());
        gemm_amx_rows(wp, w.stride(0), N, K, xb, z != 0, dequant_rows);
        return;
      }
      int32_t xsum[kRowsDotMaxM];
      for (int64_t m = 0; m < M; ++m) xsum[m] = static_cast<int32_t>(row_sum(qp + m * K, 0, K));
      gemm_rows_dot(qp, M, xsum, wp, w.stride(0), N, K, z != 0, dequant_rows);
      return;
    }
    if (packed_path) {
      const Int8Kernel kernel = kernel_for_layout(packed->layout);
      if (kernel == Int8Kernel::kAmx && M >= amx_min_m()) {
        const at::Tensor a = quantize_rows_amx(x, M, K, packed->Kp, sa.data_ptr<float>(), fixed, codes);
        gemm_amx(a.const_data_ptr<int8_t>(), M, *packed, dequant);
        return;
      }
      with_step(kernel, [&](auto step) {
        using Elem = typename decltype(step)::Elem;
        off = packed_offsets(*packed, std::is_same_v<Elem, uint8_t>);
        const at::Tensor a =
            quantize_rows_panels<decltype(step)>(x, M, K, packed->Kp, sa.data_ptr<float>(), fixed, codes);
        gemm_packed<decltype(step)>(a.const_data_ptr<Elem>(), M, *packed, dequant);
      });
      return;
    }
#endif
    at::Tensor c = at::empty({M, N}, x.options().dtype(at::kInt));
    const int32_t* cp = c.const_data_ptr<int32_t>();
    const TileEpilogue epilogue = [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
      for (int64_t m = m0; m < m1; ++m) dequant_row(m, n0, n1, cp + m * N + n0, z != 0 ? zw.data() + n0 : nullptr);
    };
    gemm(q.const_data_ptr<int8_t>(), K, w.const_data_ptr<int8_t>(), w.stride(0),
         {c.data_ptr<int32_t>(), N, 1}, M, N, K, cpu_has_avx2(), epilogue);
  });
  return out;
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& act_scale,
                           const std::optional<at::Tensor>& act_zero_point, int64_t act_quant_min,
                           int64_t act_quant_max) {
  return int8_linear_impl("qlib::int8_linear", x, w, w_scale, bias, act_scale, act_zero_point,
                          act_quant_min, act_quant_max, nullptr);
}

// ---------------------------------------------------------------- pre-packed weights
// int8_pack_weight: w [N, K] int8 -> the packed B panels of the large-M kernel (1-D int8),
// computed once (e.g. at Int8Linear load time) instead of on every call.
at::Tensor int8_pack_weight_cpu(const at::Tensor& w_in) {
  const char* op = "qlib::int8_pack_weight";
  TORCH_CHECK(w_in.scalar_type() == at::kChar && w_in.dim() == 2, op,
              ": w must be a 2-D int8 [N, K] tensor, got ", w_in.scalar_type(), " of shape ",
              w_in.sizes());
  TORCH_CHECK(w_in.size(1) <= kInt8GemmMaxK, op, ": K = ", w_in.size(1), " exceeds ",
              kInt8GemmMaxK, ", the longest int8 dot product that is exact in int32");
  // The tag holds N as int32 (checked before k_contiguous may copy w).
  TORCH_CHECK(w_in.size(0) <= INT32_MAX, op, ": N = ", w_in.size(0), " rows exceed ", INT32_MAX,
              ", the most a packed weight's tag holds");
  const at::Tensor w = k_contiguous(w_in);
  return pack_b(w.const_data_ptr<int8_t>(), w.stride(0), w.size(0), w.size(1),
                weight_layout(current_int8_kernel()), w.options())
      .buf;
}

// int8_unpack_weight: int8_pack_weight's output back to w_int8 [N, K] (the layouts with
// panels; Int8Linear keeps only the packing and unpacks for its state_dict and `weight`).
at::Tensor int8_unpack_weight_cpu(const at::Tensor& w_packed, int64_t N, int64_t K) {
  const char* op = "qlib::int8_unpack_weight";
  TORCH_CHECK(N >= 0 && K >= 0, op, ": N and K must be >= 0, got ", N, " and ", K);
  return unpack_b(op, unpack_tag(op, w_packed, N, K));
}

// int8_linear with w_packed = int8_pack_weight(w_int8). With w_int8, w_int8 serves the
// kernels that read the weight itself (1-2 rows on avx512-vnni / amx); without it (Int8Linear
// keeping only the packing) the packed kernels run at every M.
at::Tensor int8_linear_packed_cpu(const at::Tensor& x, const at::Tensor& w_packed,
                                  const std::optional<at::Tensor>& w_opt, const at::Tensor& w_scale,
                                  const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& act_scale,
                                  const std::optional<at::Tensor>& act_zero_point,
                                  int64_t act_quant_min, int64_t act_quant_max) {
  const char* op = "qlib::int8_linear_packed";
  PackedB pb;
  if (!w_opt.has_value()) {
    pb = unpack_tag(op, w_packed);
    check_int8_float_input(op, "x", x);
    TORCH_CHECK(x.size(-1) == pb.K && w_scale.numel() == pb.N, op, ": x of shape ", x.sizes(),
                " and w_scale of shape ", w_scale.sizes(), " do not match w_packed, a weight of "
                "shape [", pb.N, ", ", pb.K, "] (x needs K = ", pb.K, " features, w_scale N = ",
                pb.N, " scales)");
    // The packed kernels need AVX2 and K > 0; elsewhere the weight is unpacked for the call.
    if (QLIB_INT8_X86 && cpu_has_avx2() && pb.K > 0 && has_panels(pb.layout)) {
      const at::Tensor shape_only = at::zeros({1, 1}, w_packed.options()).expand({pb.N, pb.K});
      return int8_linear_impl(op, x, shape_only, w_scale, bias, act_scale, act_zero_point,
                              act_quant_min, act_quant_max, &pb, /*w_values=*/false);
    }
    return int8_linear_impl(op, x, unpack_b(op, pb), w_scale, bias, act_scale, act_zero_point,
                            act_quant_min, act_quant_max, nullptr);
  }
  const at::Tensor& w = *w_opt;
  const PackedB* ppb = nullptr;
  if (w.dim() == 2 && w_packed.numel() > 0) {
    pb = unpack_tag(op, w_packed, w.size(0), w.size(1));
    TORCH_CHECK(w_packed.device() == w.device(), op, ": w_packed is on ", w_packed.device(),
                " but w_int8 is on ", w.device());
    ppb = &pb;
    // (No fingerprint read where the kernel reads w itself: no stale packing to guard against.)
    if (w.scalar_type() == at::kChar && !dot_over_packed(current_int8_kernel(), leading_rows(x)) &&
        pb.fingerprint != weight_fingerprint(w.const_data_ptr<int8_t>(), w.stride(0), w.stride(1),
                                             w.size(0), w.size(1))) {
      QLIB_WARN(op, ": w_int8 holds other values than the weight w_packed was packed from "
                      "(a weight loaded into a compiled or exported graph?); running the unpacked "
                      "kernel. Call Int8Linear.repack() in eager mode, or compile / export after loading");
      ppb = nullptr;
    }
  }
  return int8_linear_impl(op, x, w, w_scale, bias, act_scale, act_zero_point, act_quant_min,
                          act_quant_max, ppb);
}

}  // namespace

bool int8_packed_copy() { return has_panels(weight_layout(current_int8_kernel())); }

TORCH_LIBRARY_IMPL(qlib, CPU, m) {
  m.impl("quantize_per_token", &quantize_per_token_cpu);
  m.impl("int8_gemm", &int8_gemm_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_pack_weight", &int8_pack_weight_cpu);
  m.impl("int8_linear_packed", &int8_linear_packed_cpu);
  m.impl("int8_unpack_weight", &int8_unpack_weight_cpu);
}

}  // namespace qlib
