// CUDA kernels of the 4-bit ops: quantize_4bit, dequantize_4bit, linear_4bit (block-wise
// absmax + a 16-value codebook; formulas in quant_math.h, checks in fourbit.h).
//
// quantize_4bit: one kernel for the block absmaxes (a group of lanes per block), then one
// thread per packed byte for the codes (a byte may straddle two blocks when block_size is
// odd: each kernel writes what only it writes, no races).
// dequantize_4bit: one thread per 16 weights (8-byte loads, 16-byte stores) or per byte.
// linear_4bit: M <= 4 (decode-like, memory bound on the packed weight) is one fused GEMV
// kernel, a warp per kCols<M> output columns; M > 4 dequantizes W into x's dtype and calls
// at::linear (cuBLAS).
// All launches on the current stream, 64-bit indexing; dequantize_4bit and linear_4bit do no
// host syncs (the codebook is read on the device, into shared memory).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "affine.h"
#include "fourbit.h"
#include "pack.cuh"
#include "quant_math.h"

namespace qlib {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// M <= kSmallM: the fused GEMV kernel; larger M: dequantize + cuBLAS.
constexpr int64_t kSmallM = 4;
// Output columns a warp of the GEMV kernel for M rows of x (its kCols 16-byte weight loads
// are in flight together, and each x load serves kCols columns); fewer for M > 2 to keep the
// registers at <= 80 (3 blocks an SM).
template <int M>
constexpr int kCols = M <= 2 ? 4 : 2;

// The codebook's midpoints, passed by value to the code kernel.
struct Midpoints {
  float v[kCodebookSize - 1];
};

// Blocks for `units` work items at `per_block` a block: at most 32 blocks per SM
// (grid-stride beyond). units > 0.
int64_t grid_blocks(int64_t units, int64_t per_block) {
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(units, per_block), max_blocks));
}

// The 16 codebook values into shared memory (the first 16 threads); a barrier after.
__device__ __forceinline__ void load_codebook(const float* __restrict__ codebook, float* cb) {
  if (threadIdx.x < kCodebookSize) cb[threadIdx.x] = codebook[threadIdx.x];
  __syncthreads();
}

// Element i (0..7) of a word of 8 packed codes: the even k in the low nibble.
__device__ __forceinline__ int nibble(uint32_t word, int i) {
  return static_cast<int>((word >> (4 * i)) & 0xFu);
}

// ---------------------------------------------------------------- quantize_4bit
// absmax[n, b] = max |w[n, k]| over block b of row n, G lanes a block (G = 1, 8 or 32 by
// block_size), groups grid-stride; the loop bound is the same for the whole warp, so every
// lane reaches the shuffles.
template <class T, int G>
__global__ void __launch_bounds__(kThreads)
    absmax_4bit_kernel(const T* __restrict__ w, float* __restrict__ absmax, int64_t N, int64_t K,
                       int64_t nb, int bs) {
  constexpr int kGroups = 32 / G;  // blocks a warp
  const int lane = threadIdx.x & 31;
  const int64_t total = N * nb;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t base = warp * kGroups; base < total; base += warp_stride * kGroups) {
    const int64_t g = base + lane / G;
    float amax = 0.0f;
    if (g < total) {
      const int64_t n = g / nb, b = g - n * nb;
      const int64_t k_end = std::min<int64_t>((b + 1) * bs, K);
      const T* wr = w + n * K;
      for (int64_t k = b * bs + lane % G; k < k_end; k += G)
        amax = fmaxf(amax, fabsf(static_cast<float>(wr[k])));  // w is finite (checked)
    }
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (g < total && lane % G == 0) absmax[g] = amax;
  }
}

// One thread per packed byte (n, j): the codes of k = 2j (low nibble) and 2j + 1 (high
// nibble, 0 past K), each against the absmax of its own block.
template <class T>
__global__ void __launch_bounds__(kThreads)
    codes_4bit_kernel(const T* __restrict__ w, const float* __restrict__ absmax,
                      uint8_t* __restrict__ packed, Midpoints mid, int64_t N, int64_t K,
                      int64_t P, int64_t nb, int bs) {
  const int64_t total = N * P;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t n = i / P, k = 2 * (i - n * P);
    const T* wr = w + n * K;
    const float* ar = absmax + n * nb;
    int byte = codebook_code(static_cast<float>(wr[k]), ar[k / bs], mid.v);
    if (k + 1 < K)
      byte |= codebook_code(static_cast<float>(wr[k + 1]), ar[(k + 1) / bs],
                            mid.v)
              << 4;
    packed[i] = static_cast<uint8_t>(byte);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& w_in,
                                                      const at::Tensor& codebook,
                                                      int64_t block_size) {
  const char* op = "qlib::quantize_4bit";
  TORCH_CHECK(w_in.is_cuda(), op, ": w must be a CUDA tensor, got ", w_in.device());
  // Also the codebook's values and w's finiteness (host reads: quantize runs once).
  const std::array<float, kCodebookSize - 1> mid_arr =
      check_quantize_4bit_args(op, w_in, codebook, block_size);
  const c10::cuda::OptionalCUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t P = ceil_div(K, 2), nb = ceil_div(K, block_size);
  at::Tensor packed = at::empty({N, P}, w.options().dtype(at::kByte));  // every byte written
  at::Tensor absmax = at::empty({N, nb}, w.options().dtype(at::kFloat));
  if (N == 0 || K == 0) return {packed, absmax};
  Midpoints mid;
  for (int j = 0; j < kCodebookSize - 1; ++j) mid.v[j] = mid_arr[j];
  const int bs = static_cast<int>(block_size);  // <= 2^24 (checked)
  const auto stream = at::cuda::getCurrentCUDAStream();
  QLIB_DISPATCH_FLOAT(w.scalar_type(), "qlib_quantize_4bit_cuda", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    float* ap = absmax.data_ptr<float>();
    const int64_t blocks_total = N * nb;
    if (bs >= 32) {
      absmax_4bit_kernel<scalar_t, 32><<<grid_blocks(blocks_total, kWarps), kThreads, 0, stream>>>(
          wp, ap, N, K, nb, bs);
    } else if (bs >= 8) {
      absmax_4bit_kernel<scalar_t, 8>
          <<<grid_blocks(blocks_total, kWarps * 4), kThreads, 0, stream>>>(wp, ap, N, K, nb, bs);
    } else {
      absmax_4bit_kernel<scalar_t, 1>
          <<<grid_blocks(blocks_total, kThreads), kThreads, 0, stream>>>(wp, ap, N, K, nb, bs);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    codes_4bit_kernel<scalar_t><<<grid_blocks(N * P, kThreads), kThreads, 0, stream>>>(
        wp, ap, packed.data_ptr<uint8_t>(), mid, N, K, P, nb, bs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

// ---------------------------------------------------------------- dequantize_4bit
// out [N, K] = codebook[code] * absmax of the element's block, cast to T. VEC: one thread per
// 16 weights (8 packed bytes in one load, 16-byte stores; needs K % 16 == 0, packed 8-byte
// and out 16-byte aligned); else one thread per packed byte (2 weights, 1 past K).
template <class T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                           const float* __restrict__ codebook, T* __restrict__ out, int64_t N,
                           int64_t K, int64_t P, int64_t nb, int bs) {
  __shared__ float cb[kCodebookSize];
  load_codebook(codebook, cb);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  if constexpr (VEC) {
    const int64_t U = K / 16;  // units a row
    const int64_t total = N * U;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
         i += stride) {
      const int64_t n = i / U, k0 = 16 * (i - n * U);
      const uint2 q = *reinterpret_cast<const uint2*>(packed + n * P + k0 / 2);
      const uint32_t words[2] = {q.x, q.y};
      const float* ar = absmax + n * nb;
      int64_t b = k0 / bs;  // the block of k0 + e, walked along e
      int rem = static_cast<int>(k0 - b * bs);
      float v[16];
      if (rem + 16 <= bs) {  // one block (block_size a multiple of 16)
        const float s = ar[b];
#pragma unroll
        for (int e = 0; e < 16; ++e) v[e] = codebook_value(nibble(words[e / 8], e % 8), s, cb);
      } else {
#pragma unroll
        for (int e = 0; e < 16; ++e) {
          v[e] = codebook_value(nibble(words[e / 8], e % 8), ar[b], cb);
          if (++rem == bs) rem = 0, ++b;
        }
      }
      constexpr int V = 16 / static_cast<int>(sizeof(T));
      T* o = out + n * K + k0;
#pragma unroll
      for (int p = 0; p < 16 / V; ++p) {
        Pack<T, V> pk;
#pragma unroll
        for (int j = 0; j < V; ++j) pk.v[j] = static_cast<T>(v[p * V + j]);
        *reinterpret_cast<Pack<T, V>*>(o + p * V) = pk;
      }
    }
  } else {
    const int64_t total = N * P;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
         i += stride) {
      const int64_t n = i / P, k = 2 * (i - n * P);
      const uint32_t byte = packed[i];
      const float* ar = absmax + n * nb;
      T* o = out + n * K;
      o[k] = static_cast<T>(codebook_value(nibble(byte, 0), ar[k / bs], cb));
      if (k + 1 < K) o[k + 1] = static_cast<T>(codebook_value(nibble(byte, 1), ar[(k + 1) / bs], cb));
    }
  }
}

// out [N, K] of a floating dtype; packed, absmax, codebook contiguous and checked.
void launch_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax,
                            const at::Tensor& codebook, at::Tensor& out, int64_t K,
                            int64_t block_size) {
  const int64_t N = packed.size(0), P = packed.size(1), nb = absmax.size(1);
  if (N == 0 || K == 0) return;
  const int bs = static_cast<int>(block_size);  // <= 2^24 (checked)
  const auto stream = at::cuda::getCurrentCUDAStream();
  QLIB_DISPATCH_FLOAT(out.scalar_type(), "qlib_dequantize_4bit_cuda", [&] {
    const uint8_t* pp = packed.const_data_ptr<uint8_t>();
    const float* ap = absmax.const_data_ptr<float>();
    const float* cp = codebook.const_data_ptr<float>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    if (K % 16 == 0 && aligned(pp, 8) && aligned16(op_)) {
      dequantize_4bit_kernel<scalar_t, true>
          <<<grid_blocks(N * (K / 16), kThreads), kThreads, 0, stream>>>(pp, ap, cp, op_, N, K,
                                                                         P, nb, bs);
    } else {
      dequantize_4bit_kernel<scalar_t, false>
          <<<grid_blocks(N * P, kThreads), kThreads, 0, stream>>>(pp, ap, cp, op_, N, K, P, nb,
                                                                  bs);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed_in, const at::Tensor& absmax_in,
                                const at::Tensor& codebook_in, int64_t in_features,
                                int64_t block_size, at::ScalarType dtype) {
  const char* op = "qlib::dequantize_4bit";
  const int64_t N =
      check_dequantize_4bit_args(op, packed_in, absmax_in, codebook_in, in_features, block_size,
                                 dtype);
  TORCH_CHECK(packed_in.is_cuda(), op, ": packed must be a CUDA tensor, got ",
              packed_in.device());
  const c10::cuda::OptionalCUDAGuard guard(packed_in.device());
  const at::Tensor packed = packed_in.contiguous(), absmax = absmax_in.contiguous(),
                   codebook = codebook_in.contiguous();
  at::Tensor out = at::empty({N, in_features}, packed.options().dtype(dtype));
  launch_dequantize_4bit(packed, absmax, codebook, out, in_features, block_size);
  return out;
}

// ---------------------------------------------------------------- linear_4bit, M <= 4
// x[m, k..k+7] as floats for the M rows (0 past K unless FULL). Vector loads when FULL and
// x_vec (x 16-byte aligned, K % 8 == 0; k is a multiple of 8).
template <class T, int M, bool FULL>
__device__ __forceinline__ void load_x8(const T* __restrict__ x, bool x_vec, int64_t K, int64_t k,
                                        float (&xv)[M][8]) {
  if (FULL && x_vec) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int p = 0; p < 8 / V; ++p) {
        const auto in = *reinterpret_cast<const Pack<T, V>*>(x + m * K + k + p * V);
#pragma unroll
        for (int j = 0; j < V; ++j) xv[m][p * V + j] = static_cast<float>(in.v[j]);
      }
  } else {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int e = 0; e < 8; ++e)
        xv[m][e] = FULL || k + e < K ? static_cast<float>(x[m * K + k + e]) : 0.0f;
  }
}

// acc[m][c] += x[m, k] * w_hat[n_c, k] (w_hat rounded to T) for the 32 weights k0..k0+31 of one lane step: wq[c]
// their 16 packed bytes as 4 words, ar[c] the absmax row of column c, k0 in block b0 at
// offset rem0. FULL: all 32 are inside K (else those past K are skipped). ONE: all 32 are in
// block b0 (else the block is walked along k).
template <class T, int M, int C, bool FULL, bool ONE>
__device__ __forceinline__ void dot_step(const uint32_t (&wq)[C][4], const float* const (&ar)[C],
                                         const T* __restrict__ x, bool x_vec, int64_t K,
                                         int64_t k0, int64_t b0, int rem0, int bs,
                                         const float* cb, float (&acc)[M][C]) {
  float s0[C];
  if constexpr (ONE) {
#pragma unroll
    for (int c = 0; c < C; ++c) s0[c] = ar[c][b0];
  }
  int64_t b = b0;
  int rem = rem0;
  uint32_t w[C][4];  // rotated by a word each sub-step (a rolled loop, no dynamic indexing)
#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int s = 0; s < 4; ++s) w[c][s] = wq[c][s];
#pragma unroll 1
  for (int s = 0; s < 4; ++s) {  // 8 weights a sub-step: fewer registers, smaller code
    float xv[M][8];
    load_x8<T, M, FULL>(x, x_vec, K, k0 + 8 * s, xv);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      if (!FULL && k0 + 8 * s + e >= K) continue;  // and so are all after it
#pragma unroll
      for (int c = 0; c < C; ++c) {
        float wv = codebook_value(nibble(w[c][0], e), ONE ? s0[c] : ar[c][b], cb);
        // W_hat in x's dtype, as the GEMM path at M > kSmallM multiplies it
        if constexpr (!std::is_same_v<T, float>) wv = static_cast<float>(static_cast<T>(wv));
#pragma unroll
        for (int m = 0; m < M; ++m) acc[m][c] = fmaf(xv[m][e], wv, acc[m][c]);
      }
      if (!ONE && ++rem == bs) rem = 0, ++b;
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
      w[c][0] = w[c][1];
      w[c][1] = w[c][2];
      w[c][2] = w[c][3];
    }
  }
}

// out[m, n] = sum_k x[m, k] * w_hat[n, k] (+ bias[n]) for m < M <= kSmallM. Each warp,
// grid-stride over groups of C columns (columns past N repeat N - 1, discarded): lanes
// step over the packed rows 16 bytes (32 weights) at a time, one 16-byte load a column
// (W_VEC: P % 16 == 0, packed 16-byte aligned) or 16 byte loads, then a warp reduction;
// lane 0 writes.
template <class T, int M, bool W_VEC>
__global__ void __launch_bounds__(kThreads)
    linear_4bit_small_m_kernel(const T* __restrict__ x, bool x_vec,
                               const uint8_t* __restrict__ packed,
                               const float* __restrict__ absmax,
                               const float* __restrict__ codebook, const float* __restrict__ bias,
                               T* __restrict__ out, int64_t N, int64_t K, int64_t P, int64_t nb,
                               int bs) {
  constexpr int C = kCols<M>;
  __shared__ float cb[kCodebookSize];
  load_codebook(codebook, cb);
  const int lane = threadIdx.x & 31;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t n0 = warp * C; n0 < N; n0 += warp_stride * C) {
    const uint8_t* wr[C];
    const float* ar[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t n = n0 + c < N ? n0 + c : N - 1;
      wr[c] = packed + n * P;
      ar[c] = absmax + n * nb;
    }
    float acc[M][C];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int c = 0; c < C; ++c) acc[m][c] = 0.0f;
    // The block b0 of this lane's first weight k0 = 2 * j and its offset rem0 in it, advanced
    // by 32-bit divisions (rem0 < block_size <= 2^24).
    int64_t b0 = 32 * lane / bs;
    int rem0 = 32 * lane - static_cast<int>(b0) * bs;
    for (int64_t j = static_cast<int64_t>(lane) * 16; j < P; j += 32 * 16) {
      uint32_t wq[C][4];
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if constexpr (W_VEC) {
          const uint4 q = *reinterpret_cast<const uint4*>(wr[c] + j);
          wq[c][0] = q.x;
          wq[c][1] = q.y;
          wq[c][2] = q.z;
          wq[c][3] = q.w;
        } else {
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            uint32_t word = 0;
#pragma unroll
            for (int t = 0; t < 4; ++t) {
              const int64_t jj = j + 4 * s + t;
              if (jj < P) word |= static_cast<uint32_t>(wr[c][jj]) << (8 * t);
            }
            wq[c][s] = word;
          }
        }
      }
      const int64_t k0 = 2 * j;
      if (k0 + 32 > K) {  // the row's last step
        dot_step<T, M, C, false, false>(wq, ar, x, x_vec, K, k0, b0, rem0, bs, cb, acc);
      } else if (rem0 + 32 <= bs) {  // the usual case (block_size a multiple of 32)
        dot_step<T, M, C, true, true>(wq, ar, x, x_vec, K, k0, b0, rem0, bs, cb, acc);
      } else {
        dot_step<T, M, C, true, false>(wq, ar, x, x_vec, K, k0, b0, rem0, bs, cb, acc);
      }
      rem0 += 2 * 32 * 16;
      const int q = rem0 / bs;
      b0 += q;
      rem0 -= q * bs;
    }
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int c = 0; c < C; ++c)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
          acc[m][c] += __shfl_xor_sync(0xffffffffu, acc[m][c], o);
    if (lane == 0) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int64_t n = n0 + c;
        if (n >= N) continue;
        const float b = bias != nullptr ? bias[n] : 0.0f;
#pragma unroll
        for (int m = 0; m < M; ++m) out[m * N + n] = static_cast<T>(acc[m][c] + b);
      }
    }
  }
}

template <class T, int M>
void launch_linear_small_m_t(const T* x, bool x_vec, const uint8_t* packed, bool w_vec,
                             const float* absmax, const float* codebook, const float* bias,
                             T* out, int64_t N, int64_t K, int64_t P, int64_t nb, int bs) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = grid_blocks(N, static_cast<int64_t>(kWarps) * kCols<M>);
  if (w_vec) {
    linear_4bit_small_m_kernel<T, M, true><<<blocks, kThreads, 0, stream>>>(
        x, x_vec, packed, absmax, codebook, bias, out, N, K, P, nb, bs);
  } else {
    linear_4bit_small_m_kernel<T, M, false><<<blocks, kThreads, 0, stream>>>(
        x, x_vec, packed, absmax, codebook, bias, out, N, K, P, nb, bs);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x contiguous [M, K] with 1 <= M <= kSmallM, N >= 1; packed, absmax, codebook contiguous;
// bias float32 contiguous or undefined.
void launch_linear_small_m(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const at::Tensor& codebook, const at::Tensor& bias, at::Tensor& out,
                           int64_t M, int64_t N, int64_t K, int64_t block_size) {
  const int64_t P = packed.size(1), nb = absmax.size(1);
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  const bool w_vec = P % 16 == 0 && aligned16(pp);
  const float* ap = absmax.const_data_ptr<float>();
  const float* cp = codebook.const_data_ptr<float>();
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  const int bs = static_cast<int>(block_size);  // <= 2^24 (checked)
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "qlib_linear_4bit_small_m_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool x_vec = K % 8 == 0 && aligned16(xp);
    scalar_t* op_ = out.data_ptr<scalar_t>();
    switch (M) {
      case 1:
        launch_linear_small_m_t<scalar_t, 1>(xp, x_vec, pp, w_vec, ap, cp, bp, op_, N, K, P, nb, bs);
        break;
      case 2:
        launch_linear_small_m_t<scalar_t, 2>(xp, x_vec, pp, w_vec, ap, cp, bp, op_, N, K, P, nb, bs);
        break;
      case 3:
        launch_linear_small_m_t<scalar_t, 3>(xp, x_vec, pp, w_vec, ap, cp, bp, op_, N, K, P, nb, bs);
        break;
      default:
        TORCH_INTERNAL_ASSERT(M == 4);
        launch_linear_small_m_t<scalar_t, 4>(xp, x_vec, pp, w_vec, ap, cp, bp, op_, N, K, P, nb, bs);
        break;
    }
  });
}

// ---------------------------------------------------------------- linear_4bit
at::Tensor linear_4bit_cuda(const at::Tensor& x_in, const at::Tensor& packed_in,
                            const at::Tensor& absmax_in, const at::Tensor& codebook_in,
                            int64_t block_size, const std::optional<at::Tensor>& bias_in) {
  const char* op = "qlib::linear_4bit";
  const int64_t N =
      check_linear_4bit_args(op, x_in, packed_in, absmax_in, codebook_in, block_size, bias_in);
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1);
  const std::vector<int64_t> shape = linear_4bit_out_shape(x, N);
  const int64_t M = c10::multiply_integers(shape.begin(), shape.end() - 1);
  if (M == 0 || N == 0 || K == 0) return linear_4bit_empty_sum(x, bias_in, shape);
  const at::Tensor packed = packed_in.contiguous(), absmax = absmax_in.contiguous(),
                   codebook = codebook_in.contiguous();
  if (M <= kSmallM) {
    at::Tensor out = at::empty(shape, x.options());
    const at::Tensor bias =
        bias_in.has_value() ? bias_in->to(at::kFloat).contiguous() : at::Tensor();
    launch_linear_small_m(x, packed, absmax, codebook, bias, out, M, N, K, block_size);
    return out;
  }
  // M > kSmallM: W_hat [N, K] in x's dtype, then cuBLAS. W_hat is rounded to x's dtype here
  // (exact for float32; float16 / bfloat16 round codebook * absmax once), and the sum runs
  // at cuBLAS's precision (TF32 for float32 where allowed).
  at::Tensor w_hat = at::empty({N, K}, x.options());
  launch_dequantize_4bit(packed, absmax, codebook, w_hat, K, block_size);
  const std::optional<at::Tensor> bias =
      bias_in.has_value() ? std::optional<at::Tensor>(bias_in->to(x.scalar_type()))
                          : std::nullopt;
  return at::linear(x, w_hat, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
  m.impl("linear_4bit", &linear_4bit_cuda);
}

}  // namespace qlib
