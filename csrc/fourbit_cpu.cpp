// CPU kernels of the 4-bit ops: quantize_4bit, dequantize_4bit, linear_4bit (formulas in
// quant_math.h, checks in fourbit.h). AVX512 decodes 16 codes a step with one vpermps through
// the codebook scaled by the block's absmax (block sizes that are multiples of 16; else a
// scalar loop). linear_4bit at M <= 32 dots each weight row with the rows of x (8 at a
// time) as it decodes it: float32 FMAs (dot_few_rows, 2-4 weight rows a call up to 4 rows of
// x; dot_rows_avx512 for blocks of 16k), or for a bfloat16 x on AVX512-BF16 CPUs bfloat16
// W_hat and vdpbf16ps, 1-4 weight rows a call (on AMX CPUs up to 2 rows of x take W_hat
// rounded to bfloat16 in dot_few_rows: vdpbf16ps runs at half rate there); at larger
// M it decodes panels of rows and runs ATen's GEMM on each. On CPUs with AMX-BF16, a bfloat16
// x of kAmxMinM to kAmxMaxM rows runs on the tile unit instead: W_hat decoded to bfloat16
// tiles as it is read, tdpbf16ps against x packed once a call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <type_traits>
#include <vector>

#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "amx.h"
#include "cpu_vec.h"
#include "fourbit.h"
#include "kernel_choice.h"

namespace qlib {
namespace {

// linear_4bit: up to kFusedMaxM rows of x (kFusedMaxMBf16 with bfloat16 dots), each weight row
// is decoded as it is read and dotted with kDotRows rows of x at a time; more rows decode
// panels for ATen's GEMM. The fused kernel's time grows with M / kDotRows; a bfloat16 GEMM
// (oneDNN) overtakes it past 24 rows (stop 24, Zen 4; 16 before stop 24's faster bfloat16
// dots), a float32 one past 32 (stop 20, Zen 4; stop 22 on a Xeon: 28-40 rows by shape, with
// the per-thread panels).
constexpr int64_t kFusedMaxM = 32;
constexpr int64_t kFusedMaxMBf16 = 24;
constexpr int64_t kDotRows = 8;

// The code of weight k in a packed row.
inline int packed_code(const uint8_t* row, int64_t k) { return (row[k >> 1] >> ((k & 1) * 4)) & 15; }

// The kernel family in use (fourbit.h), chosen once (QLIB_FOURBIT_CPU_KERNEL or the best) or set.
std::atomic<int> g_fourbit_kernel{-1};

bool fourbit_kernel_supported(FourbitKernel k) {
  switch (k) {
    case FourbitKernel::kScalar:
      return true;
#if defined(__x86_64__)
    case FourbitKernel::kAvx512:
      return __builtin_cpu_supports("avx512f");
    case FourbitKernel::kAvx512Bf16:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512bf16");
    case FourbitKernel::kAmxBf16:
      return fourbit_kernel_supported(FourbitKernel::kAvx512Bf16) && cpu_has_amx(AmxFeature::kBf16);
#endif
    default:
      return false;
  }
}

FourbitKernel current_fourbit_kernel() {
  return static_cast<FourbitKernel>(chosen_once(g_fourbit_kernel, "QLIB_FOURBIT_CPU_KERNEL", set_fourbit_cpu_kernel));
}

// At least kernel family k in use (the families are ordered: each runs what the one before does).
bool uses(FourbitKernel k) { return current_fourbit_kernel() >= k; }

// Weights [k0, k1) of a packed row, one block (scale a), as float32.
void decode_span_scalar(const uint8_t* row, int64_t k0, int64_t k1, float a, const float* cb,
                        float* out) {
  for (int64_t k = k0; k < k1; ++k) out[k] = codebook_value(packed_code(row, k), a, cb);
}

#if defined(__x86_64__)
#define QLIB_AVX512F_FN __attribute__((target("avx2,fma,avx512f")))

// The M <= kDotRows dot products sums[m] = x[m] . W_hat[k0, k0 + K) of one weight row,
// decoded on the fly (row and absmax start at k0; x's rows are ldx elements apart, in
// split_steps order). Per block the 16 codebook values are scaled by absmax once
// (codebook_value's products), then looked up per code with one permute. Two accumulators a
// row (the two halves of a step). The kernels need block_size % 16 == 0 (float32) or % 32 == 0
// (bfloat16).

// The sum of v's 16 lanes (halves added pairwise; GCC 12's _mm512_reduce_add_ps warns of an
// uninitialized operand in its own header).
QLIB_AVX512F_FN inline float lane_sum(__m512 v) {
  const __m512d d = _mm512_castps_pd(v);
  const __m256 h = _mm256_add_ps(_mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, d, 0)),
                                 _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xF, d, 1)));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// sums[m] = row m's A (1 or 2) accumulators and its scalar tail, added up.
template <int A, int M>
QLIB_AVX512F_FN inline void store_sums(const __m512 (&acc)[A][M], const float* tail, float* sums) {
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) sums[m] = lane_sum(A == 2 ? _mm512_add_ps(acc[0][m], acc[A - 1][m]) : acc[0][m]) + tail[m];
}

// v rounded to bfloat16 exactly as at::BFloat16 rounds (to nearest even on the bits, subnormals
// kept, NaN as 0x7FC0), as float32 bits (the low 16 zero).
QLIB_AVX512F_FN inline __m512i bf16_rounded_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_maskz_srli_epi32(0xFFFF, bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))),
                                     _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}

// The codes of packed bytes in k order (low nibble first): of bytes 0-7 in `first`, of bytes
// 8-15 in `second`, one a byte.
QLIB_AVX512F_FN inline void split_codes(__m128i bytes, __m128i& first, __m128i& second) {
  const __m128i nibble = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, nibble);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
  first = _mm_unpacklo_epi8(lo, hi);
  second = _mm_unpackhi_epi8(lo, hi);
}

// values[code] for 16 codes (one a byte; vpermps reads the low 4 bits): one vpermps. (maskz:
// GCC 12 warns on the plain forms' undefined pass-through.)
QLIB_AVX512F_FN inline __m512 lookup16(__m128i codes, __m512 values) {
  return _mm512_maskz_permutexvar_ps(0xFFFF, _mm512_maskz_cvtepu8_epi32(0xFFFF, codes), values);
}

// W_hat of the 16 codes of 8 bytes, in k order (values: a block's 16 W_hat values).
QLIB_AVX512F_FN inline __m512 f32_weights16(const uint8_t* bytes8, __m512 values) {
  __m128i first, second;
  split_codes(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes8)), first, second);
  return lookup16(first, values);
}

// decode_row for block_size % 16 == 0.
QLIB_AVX512F_FN void decode_row_avx512(const uint8_t* row, const float* absmax, int64_t K,
                                       int64_t block_size, const float* cb, float* out) {
  const __m512 lut = _mm512_loadu_ps(cb);
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += block_size, ++b) {
    const int64_t k1 = std::min(k0 + block_size, K);
    const __m512 values = _mm512_mul_ps(lut, _mm512_set1_ps(absmax[b]));
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) _mm512_storeu_ps(out + k, f32_weights16(row + k / 2, values));
    decode_span_scalar(row, k, k1, absmax[b], cb, out);
  }
}

// float32 x: 32 codes (16 bytes) a step (blocks of 16k, or K a tile's rest: else dot_few_rows).
template <int M>
QLIB_AVX512F_FN void dot_rows_avx512(const uint8_t* row, const float* absmax, int64_t K,
                                     int64_t block_size, const float* cb, const float* x,
                                     int64_t ldx, float* sums) {
  const __m512 lut = _mm512_loadu_ps(cb);
  __m512 acc[2][M];
  float tail[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps(), tail[m] = 0.0f;
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += block_size, ++b) {
    const int64_t k1 = std::min(k0 + block_size, K);
    const __m512 values = _mm512_mul_ps(lut, _mm512_set1_ps(absmax[b]));
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {  // x in split order: 16 even k, then 16 odd k
      const __m512i bytes = _mm512_maskz_cvtepu8_epi32(
          0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + (k >> 1))));
      const __m512 w0 = _mm512_maskz_permutexvar_ps(0xFFFF, bytes, values);  // low nibbles
      const __m512 w1 = _mm512_maskz_permutexvar_ps(0xFFFF, _mm512_maskz_srli_epi32(0xFFFF, bytes, 4), values);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        acc[0][m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + k), w0, acc[0][m]);
        acc[1][m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + k + 16), w1, acc[1][m]);
      }
    }
    if (k + 16 <= k1) {  // x as is
      const __m512 w = f32_weights16(row + (k >> 1), values);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) acc[0][m] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * ldx + k), w, acc[0][m]);
      k += 16;
    }
    for (; k < k1; ++k) {
      const float w = codebook_value(packed_code(row, k), absmax[b], cb);
      for (int m = 0; m < M; ++m) tail[m] += x[m * ldx + k] * w;
    }
  }
  store_sums<2, M>(acc, tail, sums);
}

// M rows of x (float32, ldx apart, in dot_rows_avx512's split order; up to kFewRows with R > 1,
// kDotRows with R = 1) dotted with R weight rows at once (ldp bytes and lda blocks apart), for K
// and block_size multiples of 32:
// one loop over the 32-code steps, x's loads shared, float32 FMAs. kBf16W: W_hat rounded to
// bfloat16 first (as at::BFloat16 rounds), for a bfloat16 x on CPUs whose bfloat16 kernels
// round it so. On an AMX Xeon one row runs 1.05-1.45x the vdpbf16ps kernel in bfloat16
// (vdpbf16ps retires at half the FMAs' rate there) and 1.3-2x the one-row float32 kernel
// (call and loop control); two rows 1.2-1.7x. 5-8 rows (R = 1) 1.05-1.2x dot_rows_avx512 (one
// loop over the steps; stop 22).
constexpr int64_t kFewRows = 4;
template <int M, int R, bool kBf16W>
QLIB_AVX512F_FN void dot_few_rows(const uint8_t* rows, int64_t ldp, const float* absmax, int64_t lda,
                                  int64_t K, int64_t block_size, const float* cb, const float* x,
                                  int64_t ldx, float* sums, int64_t lds) {
  const __m512 lut = _mm512_loadu_ps(cb);
  __m512 acc[R][2][M];
  __m512 values[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    values[r] = _mm512_setzero_ps();  // (set at k = 0; GCC cannot tell)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][0][m] = acc[r][1][m] = _mm512_setzero_ps();
  }
  for (int64_t k = 0, b = 0, next = 0; k < K; k += 32) {
    if (k == next) {  // a block starts
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        values[r] = _mm512_mul_ps(lut, _mm512_set1_ps(absmax[r * lda + b]));
        if constexpr (kBf16W) values[r] = _mm512_castsi512_ps(bf16_rounded_bits(values[r]));
      }
      ++b, next += block_size;
    }
    __m512 x0[M], x1[M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) x0[m] = _mm512_loadu_ps(x + m * ldx + k), x1[m] = _mm512_loadu_ps(x + m * ldx + k + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {  // low nibbles (even k), then high nibbles (odd k)
      prefetch_ahead(rows + r * ldp + (k >> 1));
      const __m512i bytes = _mm512_maskz_cvtepu8_epi32(
          0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + r * ldp + (k >> 1))));
      const __m512 w0 = _mm512_maskz_permutexvar_ps(0xFFFF, bytes, values[r]);
      const __m512 w1 = _mm512_maskz_permutexvar_ps(0xFFFF, _mm512_maskz_srli_epi32(0xFFFF, bytes, 4), values[r]);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        acc[r][0][m] = _mm512_fmadd_ps(x0[m], w0, acc[r][0][m]);
        acc[r][1][m] = _mm512_fmadd_ps(x1[m], w1, acc[r][1][m]);
      }
    }
  }
  const float tail[M] = {};
  float part[M];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    store_sums<2, M>(acc[r], tail, part);
    for (int m = 0; m < M; ++m) sums[m * lds + r] = part[m];
  }
}

#define QLIB_AVX512BF16_FN __attribute__((target("avx2,fma,avx512f,avx512bw,avx512bf16")))

// bfloat16 W_hat of 32 codes from 16 bytes: values holds a block's 16 bfloat16 W_hat values
// twice. Byte i zero-extended to a dword, its high word replaced by the dword shifted by 12,
// holds the low nibble in word 2i (with one bit of the high nibble: hence the table of 32)
// and the high nibble in word 2i + 1.
QLIB_AVX512BF16_FN inline __m512bh bf16_weights(const uint8_t* bytes16, __m512i values) {
  const __m512i d = _mm512_maskz_cvtepu8_epi32(
      0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes16)));
  const __m512i idx = _mm512_mask_blend_epi16(0xAAAAAAAAu, d, _mm512_maskz_slli_epi32(0xFFFF, d, 12));
  return reinterpret_cast<__m512bh>(_mm512_maskz_permutexvar_epi16(~0u, idx, values));
}

// v as bfloat16 (bf16_rounded_bits), 16 bits a value.
QLIB_AVX512BF16_FN inline __m256i bf16_round_exact(__m512 v) {
  return _mm512_maskz_cvtepi32_epi16(0xFFFF, _mm512_maskz_srli_epi32(0xFFFF, bf16_rounded_bits(v), 16));
}

// A block's 16 W_hat values (codebook * absmax) as bfloat16, twice: the 32-entry vpermw table
// of bf16_weights and dot_rows_bf16. kExact: as at::BFloat16 (bf16_round_exact); else
// vcvtneps2bf16, which rounds alike but flushes subnormals to zero, as vdpbf16ps and tdpbf16ps
// read them anyway.
template <bool kExact>
QLIB_AVX512BF16_FN inline __m512i bf16_block_values(__m512 lut, float absmax) {
  const __m512 v = _mm512_mul_ps(lut, _mm512_set1_ps(absmax));
  const __m256i half = kExact ? bf16_round_exact(v) : reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  return _mm512_maskz_inserti64x4(0xFF, _mm512_castsi256_si512(half), half, 1);
}

// W_hat[0, len) of one row from a block start (row and absmax there) into bfloat16: in k order
// (panels, dequantize_4bit), 32 codes a step, exactly at::BFloat16 of the float32 value; or
// when kSplit in split_steps' order (step 64) for the AMX tiles, zero padded to a multiple of
// 32, subnormal values flushed (bf16_block_values).
template <bool kSplit>
QLIB_AVX512BF16_FN void decode_span_bf16(const uint8_t* row, const float* absmax, int64_t len,
                                         int64_t block_size, const float* cb, at::BFloat16* out) {
  const __m512 lut = _mm512_loadu_ps(cb);
  for (int64_t k0 = 0, b = 0; k0 < len; k0 += block_size, ++b) {
    const int64_t k1 = std::min(k0 + block_size, len);
    const __m512i values = bf16_block_values<!kSplit>(lut, absmax[b]);
    int64_t k = k0;
    for (; kSplit && k + 64 <= k1; k += 64) {
      const __m512i bytes = _mm512_maskz_cvtepu8_epi16(
          ~0u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + (k >> 1))));
      _mm512_storeu_si512(out + k, _mm512_maskz_permutexvar_epi16(~0u, bytes, values));
      _mm512_storeu_si512(out + k + 32, _mm512_maskz_permutexvar_epi16(
                                            ~0u, _mm512_maskz_srli_epi16(~0u, bytes, 4), values));
    }
    for (; k + 32 <= k1; k += 32)
      _mm512_storeu_si512(out + k, reinterpret_cast<__m512i>(bf16_weights(row + (k >> 1), values)));
    for (; k < k1; ++k) out[k] = static_cast<at::BFloat16>(codebook_value(packed_code(row, k), absmax[b], cb));
  }
  for (int64_t k = len; kSplit && k % 32 != 0; ++k) out[k] = at::BFloat16(0.0f);
}

QLIB_AVX512BF16_FN inline __m512bh bf16_load(const at::BFloat16* p) {
  return reinterpret_cast<__m512bh>(_mm512_loadu_si512(p));
}

// bfloat16 x: W_hat rounded to bfloat16 (a block's 16 values as bfloat16, round to nearest
// even as at::BFloat16), 64 codes (32 bytes) a step, vdpbf16ps: 32 products a row and
// instruction, summed in float32. R weight rows a call (ldp bytes, lda blocks apart) share the
// loads of x; sums[r * kDotRows + m]. A accumulators a weight row and row of x (two while
// they fit the registers).
template <int M, int R>
QLIB_AVX512BF16_FN void dot_rows_bf16(const uint8_t* rows, int64_t ldp, const float* absmax, int64_t lda,
                                      int64_t K, int64_t block_size, const float* cb,
                                      const at::BFloat16* x, int64_t ldx, float* sums) {
  constexpr int A = 2 * R * M <= 16 ? 2 : 1;
  const __m512 lut = _mm512_loadu_ps(cb);
  __m512 acc[R][A][M];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 2
      for (int a = 0; a < A; ++a) acc[r][a][m] = _mm512_setzero_ps();
  // Steps of 64 or 32 up to K32; the last K % 32 weights (all in the last block: block_size %
  // 32 == 0) after the loop, which keeps their scalar sums out of it.
  const int64_t K32 = K - K % 32;
  for (int64_t k0 = 0, b = 0; k0 < K32; k0 += block_size, ++b) {
    const int64_t k1 = std::min(k0 + block_size, K32);
    __m512i values[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) values[r] = bf16_block_values<false>(lut, absmax[r * lda + b]);
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {  // x in split order: 32 even k, then 32 odd k
      __m512bh w0[R], w1[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i bytes = _mm512_maskz_cvtepu8_epi16(
            ~0u, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + r * ldp + (k >> 1))));
        // vpermw reads 5 index bits: the low nibble and one bit of the high one (hence the
        // table of 32); shifted by 4, the high nibble alone.
        w0[r] = reinterpret_cast<__m512bh>(_mm512_maskz_permutexvar_epi16(~0u, bytes, values[r]));
        w1[r] = reinterpret_cast<__m512bh>(
            _mm512_maskz_permutexvar_epi16(~0u, _mm512_maskz_srli_epi16(~0u, bytes, 4), values[r]));
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        __m512bh x0 = bf16_load(x + m * ldx + k), x1 = bf16_load(x + m * ldx + k + 32);
        // Held in registers for the R weight rows: GCC reloaded them for each (a load a
        // vdpbf16ps, which bounds the loop on Zen 4).
        __asm__("" : "+v"(x0), "+v"(x1));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          acc[r][0][m] = _mm512_dpbf16_ps(acc[r][0][m], x0, w0[r]);
          acc[r][A - 1][m] = _mm512_dpbf16_ps(acc[r][A - 1][m], x1, w1[r]);
        }
      }
    }
    if (k + 32 <= k1) {  // x as is
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512bh w = bf16_weights(rows + r * ldp + (k >> 1), values[r]);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[r][0][m] = _mm512_dpbf16_ps(acc[r][0][m], bf16_load(x + m * ldx + k), w);
      }
    }
  }
  float tail[R][M] = {};
  for (int64_t k = K32; k < K; ++k)
    for (int r = 0; r < R; ++r) {
      const float w = static_cast<float>(static_cast<at::BFloat16>(
          codebook_value(packed_code(rows + r * ldp, k), absmax[r * lda + k / block_size], cb)));
      for (int m = 0; m < M; ++m) tail[r][m] += static_cast<float>(x[m * ldx + k]) * w;
    }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) store_sums<A, M>(acc[r], tail[r], sums + r * kDotRows);
}

// ---------------------------------------------------------------- AMX-BF16 (tile) kernel
// A bfloat16 x up to kAmxMaxM rows: y^T = W_hat x^T with tdpbf16ps (bfloat16 pairs, float32
// sums). A: 16 weight rows x 32 k of W_hat, decoded (split order, as the dot kernels') into a
// buffer kAmxKBlock k at a time; B: 32 k x 16 rows of x in the tile's pair layout, packed once
// a call (pack_x_amx); C: 16 weight rows x 16 rows of x, up to 4 C tiles (64 rows of x) held
// over the whole K (more rows: a pass over the weight for each 64). Each sum runs over k in the
// same order whatever M is. From kAmxMinM rows (1-2 rows waste most of a tile: the dot kernels
// are faster) to kAmxMaxM (past it the panels' GEMM is; x's tiles no longer stay in L2):
// measured on a Xeon with AMX (stops 20-21; a 2 x 2 blocking of 32 weight rows with the sums in
// memory was slower up to 64 rows).
constexpr int64_t kAmxMinM = 3;
constexpr int64_t kAmxMaxM = 256;
constexpr int64_t kAmxKBlock = 256;

#define QLIB_AMX_BF16_FN __attribute__((target("avx2,fma,avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))

// C tiles 4 .. 3 + T (float32, 16 weight rows x 16 rows of x each) over all of K for 16 weight
// rows (rows: their packed rows, ldp apart; absmax: lda apart; rows past `valid` stay zero in
// abuf) and T tiles of packed x (xt: the first, tiles of one 16-row group nch chunks apart),
// stored to c (T x 16 x 16). W_hat is decoded kb k (whole blocks) at a time into abuf, 16 rows
// ldb bfloat16 apart: each block to abuf's start, or when `full` to its own k there (then,
// unless `decode`, abuf already holds it all).
template <int T>
QLIB_AMX_BF16_FN void amx_tiles(const uint8_t* rows, int64_t ldp, const float* absmax, int64_t lda,
                                int64_t valid, int64_t K, int64_t block_size, const float* cb,
                                const at::BFloat16* xt, int64_t nch, int64_t kb, at::BFloat16* abuf,
                                int64_t ldb, float* c, bool full, bool decode) {
  const int64_t stride = ldb * 2;
  _tile_zero(4);
  if constexpr (T > 1) _tile_zero(5);
  if constexpr (T > 2) _tile_zero(6);
  if constexpr (T > 3) _tile_zero(7);
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t len = std::min(kb, K - k0);
    at::BFloat16* a = full ? abuf + k0 : abuf;
    for (int64_t r = 0; decode && r < valid; ++r)
      decode_span_bf16<true>(rows + r * ldp + k0 / 2, absmax + r * lda + k0 / block_size, len,
                             block_size, cb, a + r * ldb);
    asm volatile("" ::: "memory");  // abuf is written before the tile loads read it
    for (int64_t c0 = 0; c0 < len; c0 += 32) {
      const at::BFloat16* b = xt + (k0 + c0) * 16;  // chunk (k0 + c0) / 32, 512 values a chunk
      _tile_loadd(0, a + c0, stride);
      _tile_loadd(1, b, 64);
      _tile_dpbf16ps(4, 0, 1);
      if constexpr (T > 1) {
        _tile_loadd(2, b + nch * 512, 64);
        _tile_dpbf16ps(5, 0, 2);
      }
      if constexpr (T > 2) {
        _tile_loadd(3, b + 2 * nch * 512, 64);
        _tile_dpbf16ps(6, 0, 3);
      }
      if constexpr (T > 3) {
        _tile_loadd(1, b + 3 * nch * 512, 64);
        _tile_dpbf16ps(7, 0, 1);
      }
    }
    asm volatile("" ::: "memory");  // the tile loads are done before abuf is written again
  }
  _tile_stored(4, c, 64);
  if constexpr (T > 1) _tile_stored(5, c + 256, 64);
  if constexpr (T > 2) _tile_stored(6, c + 512, 64);
  if constexpr (T > 3) _tile_stored(7, c + 768, 64);
  asm volatile("" ::: "memory");  // the tile stores wrote c
}
#endif

// A core's L1d (level 1) or L2 (level 2) in bytes, per sysconf, or fallback where it does not say.
int64_t cache_bytes(int level, int64_t fallback) {
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
  const long bytes = sysconf(level == 1 ? _SC_LEVEL1_DCACHE_SIZE : _SC_LEVEL2_CACHE_SIZE);
  return bytes > 0 ? bytes : fallback;
#else
  return fallback;
#endif
}

// Bytes of x the fused kernel keeps in L1 beside the weight it streams: L1d less 16 KB, 16-48 KB
// (Zen 4, 32 KB: 16 KB; a 48 KB L1d: 32 KB, 1.07-1.2x faster than 16 KB at K >= 3072, 8-32
// rows; 64 KB, past L1, 0.75-0.9x).
int64_t x_l1_bytes() {
  static const int64_t bytes = std::clamp<int64_t>(cache_bytes(1, 32768) - 16384, 16384, 49152);
  return bytes;
}

// Rows a parallel_for grain holds: about kGrain weights.
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(K, 1)); }

// The dot kernels' main steps decode `step` weights from step / 2 bytes as the low nibbles
// (even k), then the high nibbles (odd k). x's rows [M, K] in that order, each full step of a
// block in split order (its even k, then its odd k), the rest as is, into rows 64 bytes more
// than a multiple of 64 bytes apart: rows a multiple of 4 KB apart (K = 4096 in bfloat16)
// would all fall in one L1 set, too many for its 8 ways at 8 rows. Returns [M, ld] (the
// first K columns used).
template <typename T>
at::Tensor split_steps(const at::Tensor& x, int64_t block_size, int64_t step) {
  constexpr int64_t line = 64 / sizeof(T);
  const int64_t M = x.size(0), K = x.size(1), half = step / 2, ld = ceil_div(K, line) * line + line;
  at::Tensor out = at::empty({M, ld}, x.options());
  const T* src = x.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
  for (int64_t m = 0; m < M; ++m, src += K, dst += ld) {
    for (int64_t k0 = 0; k0 < K; k0 += block_size) {
      const int64_t k1 = std::min(k0 + block_size, K);
      int64_t k = k0;
      for (; k + step <= k1; k += step) {
        for (int64_t i = 0; i < half; ++i) {
          dst[k + i] = src[k + 2 * i];
          dst[k + half + i] = src[k + 2 * i + 1];
        }
      }
      for (; k < k1; ++k) dst[k] = src[k];
    }
  }
  return out;
}

#if defined(__x86_64__)
// The 16 words 0, 16, .., 240 (a column of a 16 x 16 tile of 32-bit values).
QLIB_AVX512BF16_FN inline __m512i tile_column() {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(16));
}

// Row `row` (K values) of x into its place d of amx_tiles' B tiles (below): pair P of its k in
// split_steps' order (step 64) at d + 32 P.
QLIB_AVX512BF16_FN void pack_x_row_amx(const uint16_t* row, int64_t K, int64_t block_size, uint16_t* d) {
  alignas(64) uint16_t e[32], o[32];
  for (int j = 0; j < 32; ++j) e[j] = static_cast<uint16_t>(2 * j), o[j] = static_cast<uint16_t>(2 * j + 1);
  const __m512i even = _mm512_load_si512(e), odd = _mm512_load_si512(o), pairs = tile_column();
  for (int64_t k0 = 0; k0 < K; k0 += block_size) {
    const int64_t k1 = std::min(k0 + block_size, K);
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {  // a step's 32 even k, then its 32 odd k
      const __m512i a = _mm512_loadu_si512(row + k), b = _mm512_loadu_si512(row + k + 32);
      _mm512_i32scatter_epi32(d + 32 * (k / 2), pairs, _mm512_permutex2var_epi16(a, even, b), 4);
      _mm512_i32scatter_epi32(d + 32 * (k / 2 + 16), pairs, _mm512_permutex2var_epi16(a, odd, b), 4);
    }
    for (; k < k1; ++k) d[32 * (k / 2) + k % 2] = row[k];
  }
}

// x (bfloat16 [M, K], contiguous) -> amx_tiles' B tiles: [ceil(M / 16)][ceil(K / 32)] tiles of
// 16 k pairs x 16 rows of x (a pair a 32-bit word), in the decoded W_hat's k order, zero past M
// and K.
at::Tensor pack_x_amx(const at::Tensor& x, int64_t block_size) {
  const int64_t M = x.size(0), K = x.size(1), nch = ceil_div(K, 32);
  at::Tensor out = at::zeros({ceil_div(M, 16) * nch * 512}, x.options());
  const auto* src = reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>());
  auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      pack_x_row_amx(src + m * K, K, block_size, dst + (m / 16) * nch * 512 + (m % 16) * 2);
  });
  return out;
}

// amx_tiles' C tile t of 16 weight rows from n0 (valid of them) x 16 rows of x from m0, + bias:
// into y (bfloat16 [M, N], rounded as at::BFloat16).
QLIB_AVX512BF16_FN inline void store_c_tile(const float* c, int64_t m0, int64_t M, int64_t n0, int64_t N,
                                            int64_t valid, const float* bias, at::BFloat16* y) {
  const __mmask16 cols = static_cast<__mmask16>((1u << valid) - 1);
  const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(cols, bias + n0) : _mm512_setzero_ps();
  const __m512i rows = tile_column();
  for (int64_t i = 0; i < 16 && m0 + i < M; ++i) {  // row i of x: column i of c
    // (The mask form: GCC 12 warns on the plain one's undefined pass-through.)
    const __m512 v = _mm512_add_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), 0xFFFF, rows, c + i, 4), b);
    _mm512_mask_storeu_epi16(y + (m0 + i) * N + n0, cols, _mm512_castsi256_si512(bf16_round_exact(v)));
  }
}

// linear_4bit of a bfloat16 x [M, K] (kAmxMinM <= M <= kAmxMaxM, contiguous; block_size % 32
// == 0) on the AMX unit: bfloat16 [M, N], + bias (float32 or undefined) before the rounding.
at::Tensor linear_4bit_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const float* cb, int64_t block_size, const at::Tensor& bias, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor xp = pack_x_amx(x, block_size);
  const int64_t nch = ceil_div(K, 32), tiles_m = ceil_div(M, 16);
  // W_hat is decoded kb k at a time as the tiles go; up to 64 rows of x (one pass over the
  // weight) into a buffer of kb k (in L1), more into one of all K that later passes reuse.
  const bool full = tiles_m > 4;
  const int64_t kb = std::min(std::max<int64_t>(1, kAmxKBlock / block_size) * block_size, K);
  const int64_t ldb = ceil_div(full ? K : kb, 32) * 32 + 32;  // rows off multiples of 4 KB
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* ap = absmax.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const at::BFloat16* xb = xp.const_data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t ldp = packed.size(1), lda = absmax.size(1);
  using Tiles = void (*)(const uint8_t*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t,
                         const float*, const at::BFloat16*, int64_t, int64_t, at::BFloat16*, int64_t,
                         float*, bool, bool);
  static constexpr Tiles kTiles[4] = {amx_tiles<1>, amx_tiles<2>, amx_tiles<3>, amx_tiles<4>};
  at::parallel_for(0, ceil_div(N, 16), 1, [&](int64_t p0, int64_t p1) {
    std::vector<at::BFloat16> abuf(16 * ldb, at::BFloat16(0.0f));
    alignas(64) float c[4 * 256];
    amx_configure();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * 16, valid = std::min<int64_t>(16, N - n0);
      if (valid < 16) std::fill(abuf.begin() + valid * ldb, abuf.end(), at::BFloat16(0.0f));
      for (int64_t g = 0; g < tiles_m; g += 4) {
        const int64_t T = std::min<int64_t>(4, tiles_m - g);
        kTiles[T - 1](pp + n0 * ldp, ldp, ap + n0 * lda, lda, valid, K, block_size, cb,
                      xb + g * nch * 512, nch, kb, abuf.data(), ldb, c, full, g == 0);
        for (int64_t t = 0; t < T; ++t) store_c_tile(c + t * 256, (g + t) * 16, M, n0, N, valid, bp, yp);
      }
    }
    amx_release();
  });
  return y;
}
#endif

// Row of the dequantized weight, float32, into out[0, K).
void decode_row(const uint8_t* row, const float* absmax, int64_t K, int64_t block_size,
                const float* cb, float* out) {
#if defined(__x86_64__)
  if (block_size % 16 == 0 && uses(FourbitKernel::kAvx512)) {
    decode_row_avx512(row, absmax, K, block_size, cb, out);
    return;
  }
#endif
  for (int64_t k0 = 0, b = 0; k0 < K; k0 += block_size, ++b)
    decode_span_scalar(row, k0, std::min(k0 + block_size, K), absmax[b], cb, out);
}

// Rows [n0, n1) of the weight decoded into out ([n1 - n0, K]), in parallel: float32, or
// bfloat16 (decode_span_bf16's CPU and block sizes; x86 only).
template <typename T>
void decode_rows(const at::Tensor& packed, const at::Tensor& absmax, const float* cb, int64_t K,
                 int64_t block_size, int64_t n0, int64_t n1, T* out) {
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  const float* am = absmax.const_data_ptr<float>();
  const int64_t ldp = packed.size(1), lda = absmax.size(1);
  at::parallel_for(n0, n1, row_grain(K), [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      if constexpr (std::is_same_v<T, float>) {
        decode_row(p + n * ldp, am + n * lda, K, block_size, cb, out + (n - n0) * K);
      } else {
        decode_span_bf16<false>(p + n * ldp, am + n * lda, K, block_size, cb, out + (n - n0) * K);
      }
    }
  });
}


float dot(const float* a, const float* b, int64_t K) {
  Vec acc0(0.0f), acc1(0.0f);
  int64_t k = 0;
  for (; k + 2 * kVec <= K; k += 2 * kVec) {
    acc0 = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + k + kVec), Vec::loadu(b + k + kVec), acc1);
  }
  if (k + kVec <= K) {
    acc0 = at::vec::fmadd(Vec::loadu(a + k), Vec::loadu(b + k), acc0);
    k += kVec;
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc0 + acc1);
  for (; k < K; ++k) s += a[k] * b[k];
  return s;
}

#if defined(__x86_64__)
using FewRowsKernel = void (*)(const uint8_t*, int64_t, const float*, int64_t, int64_t, int64_t,
                               const float*, const float*, int64_t, float*, int64_t);
#endif

// Weight rows a dot_rows_bf16 call for M rows of x (Zen 4, 1-2 threads, against one row a call:
// 1.3x at 3-4 rows, 1.05-1.15x at 5-8; two or four rows were slower at 1-2 rows).
constexpr int kBf16MaxGroup = 4;
constexpr int bf16_group_rows(int64_t M) { return M <= 2 ? 1 : M <= 4 ? kBf16MaxGroup : 2; }
#if defined(__x86_64__)
using Bf16DotKernel = void (*)(const uint8_t*, int64_t, const float*, int64_t, int64_t, int64_t, const float*,
                               const at::BFloat16*, int64_t, float*);
struct Bf16Dots {
  Bf16DotKernel group;  // bf16_group_rows(M) weight rows a call
  Bf16DotKernel one;
};
template <int M>
constexpr Bf16Dots bf16_dots() { return {dot_rows_bf16<M, bf16_group_rows(M)>, dot_rows_bf16<M, 1>}; }
#endif
// sums[r * kDotRows + m] = x[m] . W_hat[k0, k0 + K) of R weight rows (ldp bytes, lda blocks
// apart; row and absmax start at k0) for the M <= kDotRows rows of x, ldx elements apart:
// bfloat16 when bf16 (dot_rows_bf16's CPU and block sizes; R of bf16_group_rows(M) or 1), else
// float32 (R = 1). avx512: the kernel family read once by the caller, which laid x out for it
// (set_fourbit_cpu_kernel from another thread must not part the two). scratch: K floats.
void dot_rows(const uint8_t* row, int64_t ldp, const float* absmax, int64_t lda, int64_t R, int64_t K,
              int64_t block_size, const float* cb, const void* x, int64_t ldx, int64_t M, bool bf16,
              [[maybe_unused]] bool avx512, float* sums, float* scratch) {
#if defined(__x86_64__)
  static_assert(kDotRows == 8, "one kernel a row count");
  if (bf16) {
    static constexpr Bf16Dots kernels[kDotRows] = {bf16_dots<1>(), bf16_dots<2>(), bf16_dots<3>(), bf16_dots<4>(),
                                                   bf16_dots<5>(), bf16_dots<6>(), bf16_dots<7>(), bf16_dots<8>()};
    return (R == 1 ? kernels[M - 1].one : kernels[M - 1].group)(
        row, ldp, absmax, lda, K, block_size, cb, static_cast<const at::BFloat16*>(x), ldx, sums);
  }
  const auto* xf = static_cast<const float*>(x);
  if (K % 32 == 0 && block_size % 32 == 0 && avx512) {
    static constexpr FewRowsKernel kernels[kDotRows] = {
        dot_few_rows<1, 1, false>, dot_few_rows<2, 1, false>, dot_few_rows<3, 1, false>, dot_few_rows<4, 1, false>,
        dot_few_rows<5, 1, false>, dot_few_rows<6, 1, false>, dot_few_rows<7, 1, false>, dot_few_rows<8, 1, false>};
    return kernels[M - 1](row, 0, absmax, 0, K, block_size, cb, xf, ldx, sums, 1);
  }
  if (block_size % 16 == 0 && avx512) {
    using Kernel = void (*)(const uint8_t*, const float*, int64_t, int64_t, const float*,
                            const float*, int64_t, float*);
    static constexpr Kernel kernels[kDotRows] = {
        dot_rows_avx512<1>, dot_rows_avx512<2>, dot_rows_avx512<3>, dot_rows_avx512<4>,
        dot_rows_avx512<5>, dot_rows_avx512<6>, dot_rows_avx512<7>, dot_rows_avx512<8>};
    return kernels[M - 1](row, absmax, K, block_size, cb, xf, ldx, sums);
  }
#else
  const auto* xf = static_cast<const float*>(x);
#endif
  decode_row(row, absmax, K, block_size, cb, scratch);
  for (int64_t m = 0; m < M; ++m) sums[m] = dot(xf + m * ldx, scratch, K);
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& w_in,
                                                     const at::Tensor& codebook,
                                                     int64_t block_size) {
  const char* op = "qlib::quantize_4bit";
  const auto mid = check_quantize_4bit_args(op, w_in, codebook, block_size);
  const at::Tensor w = w_in.to(at::kFloat).contiguous();
  const int64_t N = w.size(0), K = w.size(1), KB = ceil_div(K, block_size), ldp = ceil_div(K, 2);
  at::Tensor packed = at::empty({N, ldp}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({N, KB}, w.options());
  const float* wp = w.const_data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  // By rows (with an odd block_size a byte holds codes of two blocks): each block's absmax,
  // its codes (a vector of floats at a time: w / absmax against the 15 midpoints, the same
  // float ops as codebook_code), then the row's codes packed two a byte.
  std::atomic<int64_t> first_bad{N * K};  // the flat index of the first non-finite weight
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    std::vector<uint8_t> codes(K + 1, 0);
    std::array<Vec, kCodebookSize - 1> mids;
    for (int j = 0; j + 1 < kCodebookSize; ++j) mids[j] = Vec(mid[j]);
    for (int64_t n = n0; n < n1; ++n) {
      const float* row = wp + n * K;
      for (int64_t k0 = 0, b = 0; k0 < K; k0 += block_size, ++b) {
        const int64_t k1 = std::min(k0 + block_size, K);
        Vec vmax(0.0f);
        int64_t k = k0;
        for (; k + kVec <= k1; k += kVec) vmax = at::vec::maximum(vmax, Vec::loadu(row + k).abs());
        float amax = at::vec::vec_reduce_all<float>(
            [](Vec& a, Vec& c) { return at::vec::maximum(a, c); }, vmax);
        bool finite = true;  // (at::vec::maximum keeps NaN and Inf; std::max drops a NaN)
        for (; k < k1; ++k) {
          amax = std::max(amax, std::fabs(row[k]));
          finite = finite && std::isfinite(row[k]);
        }
        if (!finite || !std::isfinite(amax)) {
          int64_t i = k0;
          while (std::isfinite(row[i])) ++i;
          int64_t seen = first_bad.load();
          while (n * K + i < seen && !first_bad.compare_exchange_weak(seen, n * K + i)) {
          }
        }
        ap[n * KB + b] = amax;
        const Vec a(amax), one(1.0f);
        for (k = k0; amax > 0.0f && k + kVec <= k1; k += kVec) {
          const Vec v = Vec::loadu(row + k) / a;
          Vec code(0.0f);
          for (int j = 0; j + 1 < kCodebookSize; ++j) code = code + ((v > mids[j]) & one);
          float c[kVec];
          code.store(c);
          for (int64_t i = 0; i < kVec; ++i) codes[k + i] = static_cast<uint8_t>(c[i]);
        }
        for (; k < k1; ++k) codes[k] = static_cast<uint8_t>(codebook_code(row[k], amax, mid.data()));
      }
      uint8_t* prow = pp + n * ldp;
      for (int64_t j = 0; j < ldp; ++j)
        prow[j] = static_cast<uint8_t>(codes[2 * j] | (2 * j + 1 < K ? codes[2 * j + 1] << 4 : 0));
    }
  });
  if (first_bad.load() < N * K) {
    const int64_t i = first_bad.load();
    fail_non_finite_weight(op, wp[i], i / K, i % K);
  }
  return {packed, absmax};
}

// The whole weight as float32 [N, K].
at::Tensor decode_weight(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& cb,
                         int64_t K, int64_t block_size) {
  const int64_t N = packed.size(0);
  at::Tensor w = at::empty({N, K}, absmax.options());
  decode_rows(packed, absmax, cb.const_data_ptr<float>(), K, block_size, 0, N, w.data_ptr<float>());
  return w;
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed_in, const at::Tensor& absmax_in,
                               const at::Tensor& codebook, int64_t in_features,
                               int64_t block_size, at::ScalarType dtype) {
  const char* op = "qlib::dequantize_4bit";
  check_dequantize_4bit_args(op, packed_in, absmax_in, codebook, in_features, block_size, dtype);
  const at::Tensor packed = packed_in.contiguous(), absmax = absmax_in.contiguous();
  const at::Tensor cb = codebook.contiguous();
#if defined(__x86_64__)
  if (dtype == at::kBFloat16 && block_size % 32 == 0 && uses(FourbitKernel::kAvx512Bf16)) {
    // Straight to bfloat16 (the same bits as the float32 decode cast; linear_4bit's backward).
    at::Tensor w = at::empty({packed.size(0), in_features}, absmax.options().dtype(at::kBFloat16));
    decode_rows(packed, absmax, cb.const_data_ptr<float>(), in_features, block_size, 0, packed.size(0),
                w.data_ptr<at::BFloat16>());
    return w;
  }
#endif
  const at::Tensor w = decode_weight(packed, absmax, cb, in_features, block_size);
  return dtype == at::kFloat ? w : w.to(dtype);
}

#if defined(__x86_64__)
// dot_few_rows for M rows of x: `group` dots `rows` weight rows a call (4 up to 2 rows of x, 2
// above: the accumulators fit the 32 registers), `one` the rest.
struct FewRowsKernels {
  FewRowsKernel group;
  int64_t rows;
  FewRowsKernel one;
};
template <int M, bool kBf16W>
constexpr FewRowsKernels few_rows_kernels() {
  constexpr int R = M <= 2 ? 4 : 2;
  return {dot_few_rows<M, R, kBf16W>, R, dot_few_rows<M, 1, kBf16W>};
}

// linear_4bit of M <= kFewRows rows of x (K and block_size multiples of 32, AVX512) through
// dot_few_rows: float32 [M, N], + bias (float32 or undefined). bf16_w: W_hat rounded to
// bfloat16, as the bfloat16 kernels multiply it.
at::Tensor linear_4bit_few_rows(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& absmax,
                                const float* cb, int64_t block_size, const at::Tensor& bias, int64_t N,
                                bool bf16_w) {
  const int64_t M = x_in.size(0), K = x_in.size(1), ldp = packed.size(1), lda = absmax.size(1);
  const at::Tensor x = split_steps<float>(x_in.to(at::kFloat).contiguous(), block_size, 32);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.const_data_ptr<float>();
  const int64_t ldx = x.size(1);
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* ap = absmax.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  static_assert(kFewRows == 4, "one kernel a row count");
  static constexpr FewRowsKernels kKernels[kFewRows][2] = {
      {few_rows_kernels<1, false>(), few_rows_kernels<1, true>()},
      {few_rows_kernels<2, false>(), few_rows_kernels<2, true>()},
      {few_rows_kernels<3, false>(), few_rows_kernels<3, true>()},
      {few_rows_kernels<4, false>(), few_rows_kernels<4, true>()}};
  const FewRowsKernels& k = kKernels[M - 1][bf16_w];
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + k.rows <= n1; n += k.rows)
      k.group(pp + n * ldp, ldp, ap + n * lda, lda, K, block_size, cb, xp, ldx, yp + n, N);
    for (; n < n1; ++n) k.one(pp + n * ldp, ldp, ap + n * lda, lda, K, block_size, cb, xp, ldx, yp + n, N);
    for (int64_t m = 0; bp != nullptr && m < M; ++m)
      for (n = n0; n < n1; ++n) yp[m * N + n] += bp[n];
  });
  return y;
}
#endif

at::Tensor linear_4bit_cpu(const at::Tensor& x_in, const at::Tensor& packed_in,
                           const at::Tensor& absmax_in, const at::Tensor& codebook_in,
                           int64_t block_size, const std::optional<at::Tensor>& bias_in) {
  const char* op = "qlib::linear_4bit";
  const int64_t N =
      check_linear_4bit_args(op, x_in, packed_in, absmax_in, codebook_in, block_size, bias_in);
  const int64_t K = x_in.size(-1);
  const std::vector<int64_t> out_shape = linear_4bit_out_shape(x_in, N);
  const int64_t M = c10::multiply_integers(out_shape.begin(), out_shape.end() - 1);
  if (M == 0 || N == 0 || K == 0) return linear_4bit_empty_sum(x_in, bias_in, out_shape);
  const at::Tensor bias = bias_in.has_value() ? bias_in->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor packed = packed_in.contiguous(), absmax = absmax_in.contiguous();
  const at::Tensor cb = codebook_in.contiguous();
  const float* c = cb.const_data_ptr<float>();
  // bfloat16 x on a CPU with AVX512-BF16 (blocks of 32k): W_hat decoded straight to bfloat16,
  // for vdpbf16ps dots or for bfloat16 panels.
  bool bf16_w = false;
#if defined(__x86_64__)
  bf16_w = x_in.scalar_type() == at::kBFloat16 && block_size % 32 == 0 && uses(FourbitKernel::kAvx512Bf16);
  if (bf16_w && M >= kAmxMinM && M <= kAmxMaxM && uses(FourbitKernel::kAmxBf16)) {
    return linear_4bit_amx(x_in.reshape({M, K}).contiguous(), packed, absmax, c, block_size, bias, N)
        .view(out_shape);
  }
  // A bfloat16 x of 1-2 rows: dot_few_rows on AMX CPUs (Xeon, stop 21); elsewhere the vdpbf16ps
  // kernel, 1.7-2x faster on Zen 4 (stop 23). (3-4 rows keep the tiles or vdpbf16ps: not
  // measured against dot_few_rows.)
  const int64_t few_rows = bf16_w ? (uses(FourbitKernel::kAmxBf16) ? 2 : 0) : kFewRows;
  if (M <= few_rows && K % 32 == 0 && block_size % 32 == 0 && uses(FourbitKernel::kAvx512)) {
    return linear_4bit_few_rows(x_in.reshape({M, K}), packed, absmax, c, block_size, bias, N, bf16_w)
        .to(x_in.scalar_type())
        .view(out_shape);
  }
#endif
  if (M > (bf16_w ? kFusedMaxMBf16 : kFusedMaxM)) {
    // Panels of decoded rows, each through ATen's GEMM: in bfloat16 where the fused kernel runs
    // bfloat16 dots (W_hat and bias rounded to bfloat16: the CPU's fast GEMM), else in float32
    // as the fused kernel (so rows alone equal rows in a batch). A W_hat past L2: each thread
    // decodes its own panels, of about L2's size (at least min(M, 256) rows: each panel's GEMM
    // reads all of x), as many for every thread, and runs the GEMM single-threaded in the
    // parallel region: 1.05-1.6x one 4 MB panel at a time decoded and multiplied by all threads
    // (stop 22). A smaller W_hat is one panel, decoded and multiplied by all threads.
    const auto dt = bf16_w ? at::kBFloat16 : at::kFloat;
    at::Tensor x = x_in.reshape({M, K}).to(dt).contiguous();
    if (bf16_w && K % 32 != 0) {
      // oneDNN's bfloat16 GEMM (torch 2.14, AMX / AVX512-BF16 Xeons) reads each row of x to a
      // multiple of 32 values, times zero padding: a NaN or Inf at the start of row m made row
      // m - 1 NaN. Rows padded with zeros keep each row's NaN in it.
      at::Tensor padded = at::zeros({M, ceil_div(K, 32) * 32}, x.options());
      x = padded.narrow(1, 0, K).copy_(x);
    }
    const at::Tensor b = bias.defined() ? bias.to(dt) : at::Tensor();
    at::Tensor y = at::empty({M, N}, x.options());
    static const int64_t l2 = std::clamp<int64_t>(cache_bytes(2, int64_t{1} << 20), int64_t{1} << 18, int64_t{1} << 22);
    const int64_t threads = at::get_num_threads(), row_bytes = K * x.element_size();
    const int64_t most = std::max(l2 / row_bytes, std::min<int64_t>(M, 256));
    const int64_t panels = N * row_bytes <= l2 ? 1 : threads * ceil_div(ceil_div(N, most), threads);
    const int64_t rows = std::min(N, ceil_div(ceil_div(N, panels), 16) * 16);
    auto panel_gemms = [&](int64_t p0, int64_t p1) {
      at::Tensor panel = at::empty({rows, K}, x.options());
      for (int64_t n0 = p0 * rows; n0 < std::min(N, p1 * rows); n0 += rows) {
        const int64_t n1 = std::min(N, n0 + rows);
        at::Tensor w = panel.narrow(0, 0, n1 - n0);
#if defined(__x86_64__)
        if (bf16_w) decode_rows(packed, absmax, c, K, block_size, n0, n1, w.data_ptr<at::BFloat16>());
#endif
        if (!bf16_w) decode_rows(packed, absmax, c, K, block_size, n0, n1, w.data_ptr<float>());
        at::Tensor out = y.narrow(1, n0, n1 - n0);
        if (b.defined()) {
          at::addmm_out(out, b.narrow(0, n0, n1 - n0), x, w.t());
        } else {
          at::mm_out(out, x, w.t());
        }
      }
    };
    if (panels == 1) {
      panel_gemms(0, 1);
    } else {
      const at::ThreadLocalState state;  // inference mode and dispatch keys, for the workers' at:: calls
      at::parallel_for(0, ceil_div(N, rows), 1, [&](int64_t p0, int64_t p1) {
        const at::ThreadLocalStateGuard guard(state);
        panel_gemms(p0, p1);
      });
    }
    return y.to(x_in.scalar_type()).view(out_shape);
  }
  at::Tensor x = x_in.reshape({M, K}).to(bf16_w ? at::kBFloat16 : at::kFloat).contiguous();
  bool avx512 = false;  // (read once: x's layout and dot_rows' kernel must agree)
#if defined(__x86_64__)
  avx512 = uses(FourbitKernel::kAvx512);
  if (bf16_w) {
    x = split_steps<at::BFloat16>(x, block_size, 64);
  } else if (block_size % 16 == 0 && avx512) {
    x = split_steps<float>(x, block_size, 32);
  }
#endif
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  const int64_t esz = x.element_size(), ldx = x.size(1), ldp = packed.size(1), lda = absmax.size(1);
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const float* ap = absmax.const_data_ptr<float>();
  // Rows of x a pass over the weight (up to kDotRows), as even as the passes allow (9 rows: 5 +
  // 4, not 8 + 1, whose one-row pass costs a whole decode for few products).
  const int64_t pass = ceil_div(M, ceil_div(M, kDotRows));
  // A pass's rows of x past x_l1_bytes(): tiles of K (whole pairs of blocks) of about that many
  // bytes of them, so that a tile stays in L1 while a grain of weight rows reads it.
  const int64_t pair = 2 * block_size, x_bytes = pass * esz, l1 = x_l1_bytes();
  const int64_t tile = x_bytes * K <= std::max<int64_t>(32768, l1) ? K : std::max<int64_t>(1, l1 / x_bytes / pair) * pair;
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    std::vector<float> scratch(std::min(tile, K)), acc((n1 - n0) * M, 0.0f);
    float part[kBf16MaxGroup * kDotRows];
    for (int64_t k0 = 0; k0 < K; k0 += tile) {
      const int64_t len = std::min(tile, K - k0);
      for (int64_t m0 = 0; m0 < M; m0 += pass) {
        const int64_t rows = std::min(pass, M - m0);
        const int64_t group = bf16_w ? bf16_group_rows(rows) : 1;
        for (int64_t n = n0, r = 1; n < n1; n += r) {
          r = n + group <= n1 ? group : 1;
          for (int64_t i = n + r; len < K && i < std::min(n1, n + 2 * r); ++i) {
            // the next rows' spans: tiles of rows defeat the prefetcher
            const char* next = reinterpret_cast<const char*>(pp + i * ldp + k0 / 2);
            for (int64_t b = 0; b < (len + 1) / 2; b += 64) __builtin_prefetch(next + b);
            __builtin_prefetch(ap + i * lda + k0 / block_size);
          }
          dot_rows(pp + n * ldp + k0 / 2, ldp, ap + n * lda + k0 / block_size, lda, r, len, block_size, c,
                   xp + (m0 * ldx + k0) * esz, ldx, rows, bf16_w, avx512, part, scratch.data());
          for (int64_t i = 0; i < r; ++i)
            for (int64_t m = 0; m < rows; ++m) acc[(n + i - n0) * M + m0 + m] += part[i * kDotRows + m];
        }
      }
    }
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m = 0; m < M; ++m)
        yp[m * N + n] = acc[(n - n0) * M + m] + (bp != nullptr ? bp[n] : 0.0f);
  });
  return y.to(x_in.scalar_type()).view(out_shape);
}

constexpr std::array<const char*, 4> kFourbitKernelNames = {"scalar", "avx512", "avx512-bf16", "amx-bf16"};

bool family_supported(int k) { return fourbit_kernel_supported(static_cast<FourbitKernel>(k)); }

}  // namespace

std::string fourbit_cpu_kernel() { return kFourbitKernelNames[static_cast<int>(current_fourbit_kernel())]; }

std::vector<std::string> fourbit_cpu_kernels() { return supported_names(kFourbitKernelNames, family_supported); }

void set_fourbit_cpu_kernel(const std::string& name) {
  int best = 0;
  for (int k = 0; k < static_cast<int>(kFourbitKernelNames.size()); ++k)
    if (family_supported(k)) best = k;  // the families are ordered
  set_by_name(g_fourbit_kernel, "qlib.set_fourbit_cpu_kernel", name, kFourbitKernelNames, family_supported, best);
}

TORCH_LIBRARY_IMPL(qlib, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("linear_4bit", &linear_4bit_cpu);
}

}  // namespace qlib
