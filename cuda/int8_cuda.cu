// CUDA kernels of the int8 ops: quantize_per_token, int8_gemm, int8_linear.
//
// GEMM: M > 4 goes to cuBLASLt through at::_int_mm (int8 tensor cores),
// whose limits (M > 16, K and N multiples of 8) are met by zero padding M, K
// and N here (zeros add nothing to a dot product); M <= 4 (decode-like shapes,
// memory bound) uses a dp4a kernel that reads each weight row once. (On an
// H100, dp4a at M = 16 took 3x cuBLASLt's time on 17 padded rows.)
// int8_linear = fused per-row quantize kernel (writes the K-padded int8
// activations and their scales) -> GEMM -> fused dequant epilogue kernel
// (act scale x per-channel weight scale, + bias, cast to x's dtype); M <= 4 runs
// all three in one kernel (linear_small_m_kernel), same bits.
// On a Hopper GPU (compute capability 9.0), builds with the fused GEMM instead run M > 4 on
// cuda/int8_gemm_sm90.cu: one wgmma kernel with the dequant epilogue fused (same bits;
// qlib.set_int8_cuda_gemm picks either).
// All launches on the current stream, 64-bit indexing, no host syncs (the
// static act_scale is read on device).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/CallOnce.h>
#include <torch/library.h>

#include <array>
#include <cfloat>
#include <cmath>
#include <limits>

#include "affine.h"
#include "capture.cuh"
#include "int8.h"
#ifdef QLIB_WITH_SM90_GEMM
#include "int8_sm90.h"
#endif
#include "pack.cuh"
#include "quant_math.h"

namespace qlib {
namespace {

constexpr int kThreads = 256;
// M <= kSmallM: the dp4a kernel; larger M: cuBLASLt through at::_int_mm, which needs
// M > 16 (so 4 < M <= 16 is zero-padded to 17 rows).
constexpr int64_t kSmallM = 4;
constexpr int64_t kIntMmMinM = 17;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---------------------------------------------------------------- quantize rows
// The whole block quantizes row xr (K elements) into q[0, ldq) (zeros in [K, ldq)), V
// elements a thread at a time (V = 8: 16- or 32-byte loads, 8-byte stores; needs K and ldq
// multiples of 8). Returns the row's scale to every thread: *fixed_scale when set (static),
// else the per-token scale; NaN for a row holding NaN (as the CPU kernel does). warp_amax:
// kThreads / 32 floats of shared scratch, free again on return.
template <class T, int V>
__device__ float quantize_row(const T* __restrict__ xr, int8_t* __restrict__ q, int64_t K,
                              int64_t ldq, const float* __restrict__ fixed_scale,
                              Int8ActCodes codes, float* warp_amax) {
  float s;
  if (fixed_scale != nullptr) {
    s = *fixed_scale;
    // A bad static scale or zero point (read back and raised on only under
    // set_cuda_value_checks): NaN rows, as fake_quant's bad qparams give.
    if (!(s >= kMinScale && s <= FLT_MAX && codes.qmin <= codes.zero_point && codes.zero_point <= codes.qmax))
      s = NAN, codes.zero_point = 0.0f;  // (NaN codes take the zero point: keep it an int8)
  } else {
    float amax = 0.0f;
    for (int64_t k = threadIdx.x * V; k < K; k += blockDim.x * V) {
      const auto in = *reinterpret_cast<const Pack<T, V>*>(xr + k);
#pragma unroll
      for (int j = 0; j < V; ++j)
        amax = fmaxf(amax, fabsf(static_cast<float>(in.v[j])));  // fmaxf ignores NaN
    }
    amax = warp_max(amax);
    if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) amax = fmaxf(amax, warp_amax[w]);
    s = int8_token_scale(amax);
  }
  const float inv = 1.0f / s;
  int nan_seen = 0;
  for (int64_t k = threadIdx.x * V; k < ldq; k += blockDim.x * V) {
    Pack<int8_t, V> out;
    if (k < K) {  // with V = 8, K % 8 == 0: the whole pack is inside the row
      const auto in = *reinterpret_cast<const Pack<T, V>*>(xr + k);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float v = static_cast<float>(in.v[j]);
        nan_seen |= v != v;
        out.v[j] = int8_act_code(v, inv, codes);
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = 0;
    }
    *reinterpret_cast<Pack<int8_t, V>*>(q + k) = out;
  }
  // Also the barrier before warp_amax is reused and before q is read.
  return __syncthreads_or(nan_seen) ? NAN : s;
}

// One block per row (grid-stride): quantize_row of rows [0, rows) into q [rows_out, ldq],
// zero rows in [rows, rows_out), scale_out[r] the row scales. Codes take *zero_point
// (static, when set) and the range [qmin, qmax].
template <class T, int V>
__global__ void quantize_rows_kernel(const T* __restrict__ x, int8_t* __restrict__ q,
                                     float* __restrict__ scale_out,
                                     const float* __restrict__ fixed_scale,
                                     const int32_t* __restrict__ zero_point, float qmin, float qmax,
                                     int64_t rows, int64_t rows_out, int64_t K, int64_t ldq) {
  const Int8ActCodes codes{zero_point != nullptr ? static_cast<float>(*zero_point) : 0.0f, qmin,
                           qmax};
  __shared__ float warp_amax[kThreads / 32];
  for (int64_t r = blockIdx.x; r < rows_out; r += gridDim.x) {
    if (r >= rows) {  // padding row (uniform across the block)
      for (int64_t k = threadIdx.x * V; k < ldq; k += blockDim.x * V)
        *reinterpret_cast<Pack<int8_t, V>*>(q + r * ldq + k) = Pack<int8_t, V>{};
      continue;
    }
    const float s = quantize_row<T, V>(x + r * K, q + r * ldq, K, ldq, fixed_scale, codes, warp_amax);
    if (threadIdx.x == 0) scale_out[r] = s;
  }
}

// x: contiguous, viewed as [rows, K]; q: [rows_out >= rows, ldq].
void launch_quantize_rows(const at::Tensor& x, int64_t rows, int64_t rows_out, int64_t K,
                          at::Tensor& q, int64_t ldq, float* scale_out, const float* fixed_scale,
                          const int32_t* zero_point = nullptr,
                          Int8ActCodes range = Int8ActCodes{}) {
  if (rows_out == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>(
      rows_out,
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16);
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "qlib_quantize_rows_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    int8_t* qp = q.data_ptr<int8_t>();
    if (K % 8 == 0 && ldq % 8 == 0 && aligned(xp, 8 * sizeof(scalar_t)) && aligned(qp, 8)) {
      quantize_rows_kernel<scalar_t, 8>
          <<<blocks, kThreads, 0, stream>>>(xp, qp, scale_out, fixed_scale, zero_point,
                                            range.qmin, range.qmax, rows, rows_out, K, ldq);
    } else {
      quantize_rows_kernel<scalar_t, 1>
          <<<blocks, kThreads, 0, stream>>>(xp, qp, scale_out, fixed_scale, zero_point,
                                            range.qmin, range.qmax, rows, rows_out, K, ldq);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------- small-M GEMM (dp4a)
// C[m * ldc + n] = sum_k A[m * lda + k] * B[n * ldb + k] for M <= kSmallM (memory bound:
// B is read once). One warp per kCols output columns, so each A pack loaded serves
// kCols B rows and kCols independent B loads are in flight; lanes walk K in
// 16-byte packs (VEC) or bytes.
constexpr int kCols = 4;

// One warp's sums acc[m][j] = sum_k a[m * lda + k] * br[j][k] for m < M (and, with ROWSUMS,
// rs[j] = sum_k br[j][k]), over the whole warp: every lane gets them. VEC: K, lda and the br
// rows in 16-byte packs.
template <bool VEC, bool ROWSUMS>
__device__ __forceinline__ void warp_dots(const int8_t* __restrict__ a, int64_t lda,
                                          const int8_t* const (&br)[kCols], int M, int64_t K,
                                          int (&acc)[kSmallM][kCols], int (&rs)[kCols]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    rs[j] = 0;
#pragma unroll
    for (int m = 0; m < kSmallM; ++m) acc[m][j] = 0;
  }
  if constexpr (VEC) {
    for (int64_t k = static_cast<int64_t>(lane) * 16; k < K; k += 32 * 16) {
      int4 bv[kCols];
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        bv[j] = *reinterpret_cast<const int4*>(br[j] + k);
        if constexpr (ROWSUMS) {
          constexpr int kOnes = 0x01010101;
          rs[j] = __dp4a(bv[j].w, kOnes, __dp4a(bv[j].z, kOnes,
                  __dp4a(bv[j].y, kOnes, __dp4a(bv[j].x, kOnes, rs[j]))));
        }
      }
#pragma unroll
      for (int m = 0; m < kSmallM; ++m) {
        if (m < M) {
          const int4 av = *reinterpret_cast<const int4*>(a + m * lda + k);
#pragma unroll
          for (int j = 0; j < kCols; ++j) {
            int s = acc[m][j];
            s = __dp4a(av.x, bv[j].x, s);
            s = __dp4a(av.y, bv[j].y, s);
            s = __dp4a(av.z, bv[j].z, s);
            s = __dp4a(av.w, bv[j].w, s);
            acc[m][j] = s;
          }
        }
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
      int bv[kCols];
#pragma unroll
      for (int j = 0; j < kCols; ++j) {
        bv[j] = br[j][k];
        if constexpr (ROWSUMS) rs[j] += bv[j];
      }
#pragma unroll
      for (int m = 0; m < kSmallM; ++m) {
        if (m < M) {
          const int av = a[m * lda + k];
#pragma unroll
          for (int j = 0; j < kCols; ++j) acc[m][j] += av * bv[j];
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kCols; ++j) {
    if constexpr (ROWSUMS) rs[j] = warp_sum(rs[j]);
#pragma unroll
    for (int m = 0; m < kSmallM; ++m)
      if (m < M) acc[m][j] = warp_sum(acc[m][j]);
  }
}

// Each warp, grid-stride over groups of kCols columns n0..: warp_dots of a's M rows with
// those rows of b (rows past N repeat row N - 1; discarded), then store(n0, acc, rs) on lane 0.
template <bool VEC, bool ROWSUMS, class Store>
__device__ __forceinline__ void small_m_columns(const int8_t* __restrict__ a, int64_t lda,
                                                const int8_t* __restrict__ b, int64_t ldb,
                                                int M, int64_t N, int64_t K, const Store& store) {
  const int64_t warps_per_block = blockDim.x >> 5;
  for (int64_t n0 = (blockIdx.x * warps_per_block + (threadIdx.x >> 5)) * kCols; n0 < N;
       n0 += static_cast<int64_t>(gridDim.x) * warps_per_block * kCols) {
    const int8_t* br[kCols];
#pragma unroll
    for (int j = 0; j < kCols; ++j) br[j] = b + (n0 + j < N ? n0 + j : N - 1) * ldb;
    int acc[kSmallM][kCols], rs[kCols];
    warp_dots<VEC, ROWSUMS>(a, lda, br, M, K, acc, rs);
    if ((threadIdx.x & 31) == 0) store(n0, acc, rs);
  }
}

template <bool VEC>
__global__ void gemm_small_m_kernel(const int8_t* __restrict__ a, int64_t lda,
                                    const int8_t* __restrict__ b, int64_t ldb,
                                    int32_t* __restrict__ c, int64_t ldc, int M, int64_t N,
                                    int64_t K) {
  small_m_columns<VEC, false>(a, lda, b, ldb, M, N, K,
                              [&](int64_t n0, const int (&acc)[kSmallM][kCols], const int (&)[kCols]) {
#pragma unroll
    for (int m = 0; m < kSmallM; ++m)
#pragma unroll
      for (int j = 0; j < kCols; ++j)
        if (m < M && n0 + j < N) c[m * ldc + n0 + j] = acc[m][j];
  });
}

// Blocks for the small-M kernels: one warp per kCols columns, at most 16 blocks per SM
// (grid-stride beyond).
int64_t small_m_blocks(int64_t N) {
  const int64_t cols_per_block = kThreads / 32 * kCols;
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return std::max<int64_t>(1, std::min<int64_t>((N + cols_per_block - 1) / cols_per_block, max_blocks));
}

void launch_gemm_small_m(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c,
                         int64_t ldc, int64_t M, int64_t N, int64_t K) {
  TORCH_INTERNAL_ASSERT(M <= kSmallM);
  if (M == 0 || N == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = small_m_blocks(N);
  const bool vec = K % 16 == 0 && lda % 16 == 0 && ldb % 16 == 0 && aligned16(a) && aligned16(b);
  if (vec) {
    gemm_small_m_kernel<true><<<blocks, kThreads, 0, stream>>>(a, lda, b, ldb, c, ldc,
                                                               static_cast<int>(M), N, K);
  } else {
    gemm_small_m_kernel<false><<<blocks, kThreads, 0, stream>>>(a, lda, b, ldb, c, ldc,
                                                                static_cast<int>(M), N, K);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Zero-pads a K-contiguous int8 [R, K] operand to [Rp, Kp] (no copy when already fine; a view
// off a 16-byte boundary, as buf[1:], is copied: cuBLASLt's int8 kernels need aligned pointers).
at::Tensor pad_operand(const at::Tensor& t, int64_t rows_to, int64_t k_to) {
  if (t.size(0) == rows_to && t.size(1) == k_to && t.is_contiguous() &&
      aligned16(t.const_data_ptr())) {
    return t;
  }
  at::Tensor p = at::zeros({rows_to, k_to}, t.options());
  p.narrow(0, 0, t.size(0)).narrow(1, 0, t.size(1)).copy_(t);
  return p;
}

// C (int32) = A [M, K] x B [N, K]^T; returns [Mc, Nc] with Mc >= M, Nc >= N (padded
// for cuBLASLt; the caller reads the first M rows and N columns). a and b K-contiguous.
at::Tensor gemm_any(const at::Tensor& a, const at::Tensor& b, int64_t M, int64_t N, int64_t K) {
  if (M <= kSmallM) {
    at::Tensor c = at::empty({M, N}, a.options().dtype(at::kInt));
    launch_gemm_small_m(a.const_data_ptr<int8_t>(), a.stride(0), b.const_data_ptr<int8_t>(),
                        b.stride(0), c.data_ptr<int32_t>(), N, M, N, K);
    return c;
  }
  const int64_t Mp = std::max(M, kIntMmMinM), Kp = round_up(K, 8), Np = round_up(N, 8);
  const at::Tensor ap = pad_operand(a, Mp, Kp);
  const at::Tensor bp = pad_operand(b, Np, Kp);
  return at::_int_mm(ap, bp.t());  // [Mp, Np]; bp.t() is column-major, cuBLASLt's TN int8 case
}

at::Tensor k_contiguous(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(t.size(1), 1) ? t : t.contiguous();
}

at::Tensor int8_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  const char* op = "qlib::int8_gemm";
  check_int8_gemm_args(op, a_in, b_in);
  TORCH_CHECK(a_in.is_cuda(), op, ": a must be a CUDA tensor, got ", a_in.device());
  const c10::cuda::OptionalCUDAGuard guard(a_in.device());
  const int64_t M = a_in.size(0), N = b_in.size(0), K = a_in.size(1);
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, a_in.options().dtype(at::kInt));
  const at::Tensor a = k_contiguous(a_in), b = k_contiguous(b_in);
  at::Tensor c = gemm_any(a, b, M, N, K);
  return c.size(0) == M && c.size(1) == N ? c : c.narrow(0, 0, M).narrow(1, 0, N).contiguous();
}

// ---------------------------------------------------------------- quantize_per_token
std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x_in) {
  const char* op = "qlib::quantize_per_token";
  check_int8_float_input(op, "x", x_in);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  std::vector<int64_t> sshape(x.sizes().begin(), x.sizes().end());
  sshape.back() = 1;
  at::Tensor scale = at::empty(sshape, x.options().dtype(at::kFloat));
  launch_quantize_rows(x, rows, rows, K, q, K, scale.data_ptr<float>(), nullptr);
  return {q, scale};
}

// ---------------------------------------------------------------- int8_linear
// One output: the int32 sum c less the zero-point term zs, times act scale s and weight scale
// ws, plus bias b (the small-M kernel and the epilogue share it: the same float ops, the
// same bits).
__device__ __forceinline__ float dequant_value(int32_t c, long long zs, float s, float ws, float b) {
  return static_cast<float>(c - zs) * (s * ws) + b;
}

// out[m, n] = (C[m, n] - z * w_rowsum[n]) * act_scale[m] * w_scale[n] (+ bias[n]),
// z = *zero_point (the term only when both are set), V columns a thread (V = 4:
// 16-byte loads of C; needs N and ldc multiples of 4); rows on grid y
// (grid-stride), column packs on grid x: no division per element.
template <class T, int V>
__global__ void dequant_epilogue_kernel(const int32_t* __restrict__ c, int64_t ldc,
                                        const float* __restrict__ act_scale,
                                        const float* __restrict__ w_scale,
                                        const float* __restrict__ bias,
                                        const int32_t* __restrict__ zero_point,
                                        const int32_t* __restrict__ w_rowsum, T* __restrict__ out,
                                        int64_t M, int64_t N) {
  const int64_t n0 = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) * V;
  if (n0 >= N) return;
  Pack<float, V> ws, bs;
  long long zs[V];  // z * w_rowsum[n]; C - zs needs int64 (|q - z| <= 255)
  const int32_t z = zero_point != nullptr && w_rowsum != nullptr ? *zero_point : 0;
  for (int j = 0; j < V; ++j) {
    ws.v[j] = n0 + j < N ? w_scale[n0 + j] : 0.0f;
    bs.v[j] = bias != nullptr && n0 + j < N ? bias[n0 + j] : 0.0f;
    zs[j] = z != 0 && n0 + j < N ? static_cast<long long>(z) * w_rowsum[n0 + j] : 0;
  }
  for (int64_t m = blockIdx.y; m < M; m += gridDim.y) {
    const float s = act_scale[m];
    Pack<T, V> o;
    if constexpr (V > 1) {
      const auto cv = *reinterpret_cast<const Pack<int32_t, V>*>(c + m * ldc + n0);
#pragma unroll
      for (int j = 0; j < V; ++j)
        o.v[j] = static_cast<T>(dequant_value(cv.v[j], zs[j], s, ws.v[j], bs.v[j]));
      *reinterpret_cast<Pack<T, V>*>(out + m * N + n0) = o;
    } else {
      out[m * N + n0] = static_cast<T>(dequant_value(c[m * ldc + n0], zs[0], s, ws.v[0], bs.v[0]));
    }
  }
}

// ---------------------------------------------------------------- small-M int8_linear
// M <= kSmallM in one launch (at these sizes the launches are the cost): every block quantizes
// the M rows of x into shared memory (the codes and row scales of quantize_rows_kernel; each
// block redoes it, M * K elements against its kThreads / 32 * kCols weight rows), then runs
// warp_dots over its columns (with the weight row sums when there is a zero point) and
// writes out with dequant_value. Same bits as the three-kernel path. W_VEC: 16-byte weight
// loads; x_packs: 8-element loads of x (chosen apart, so that an unaligned x view does not
// slow the weight stream).
template <class T, bool W_VEC, bool ZP>
__global__ void linear_small_m_kernel(const T* __restrict__ x, bool x_packs,
                                      const int8_t* __restrict__ w, int64_t ldw,
                                      const float* __restrict__ w_scale,
                                      const float* __restrict__ bias,
                                      const float* __restrict__ fixed_scale,
                                      const int32_t* __restrict__ zero_point, float qmin,
                                      float qmax, T* __restrict__ out, int M, int64_t N,
                                      int64_t K, int64_t lda) {
  extern __shared__ int4 smem[];  // M rows of lda int8 codes (K zero-padded to lda)
  int8_t* a = reinterpret_cast<int8_t*>(smem);
  __shared__ float warp_amax[kThreads / 32];
  __shared__ float row_scale[kSmallM];
  const int32_t z = ZP ? *zero_point : 0;
  const Int8ActCodes codes{static_cast<float>(z), qmin, qmax};
  for (int m = 0; m < M; ++m) {
    const float s =
        x_packs ? quantize_row<T, 8>(x + m * K, a + m * lda, K, lda, fixed_scale, codes, warp_amax)
                : quantize_row<T, 1>(x + m * K, a + m * lda, K, lda, fixed_scale, codes, warp_amax);
    if (threadIdx.x == 0) row_scale[m] = s;
  }
  __syncthreads();  // row_scale
  small_m_columns<W_VEC, ZP>(a, lda, w, ldw, M, N, K,
                             [&](int64_t n0, const int (&acc)[kSmallM][kCols], const int (&rs)[kCols]) {
#pragma unroll
    for (int j = 0; j < kCols; ++j) {
      const int64_t n = n0 + j;
      if (n >= N) continue;
      const float ws = w_scale[n], b = bias != nullptr ? bias[n] : 0.0f;
      const long long zs = static_cast<long long>(z) * rs[j];
#pragma unroll
      for (int m = 0; m < kSmallM; ++m)
        if (m < M) out[m * N + n] = static_cast<T>(dequant_value(acc[m][j], zs, row_scale[m], ws, b));
    }
  });
}

// The most dynamic shared memory Kernel may take a block on the current device: the device's
// opt-in limit (227 KiB on H100 / H200) less Kernel's static shared memory. Raises Kernel's
// limit to that, once per device, so that every caller sets the same value.
template <auto Kernel>
int64_t dynamic_smem_limit() {
  static std::array<c10::once_flag, C10_COMPILE_TIME_MAX_GPUS> once;
  static std::array<int64_t, C10_COMPILE_TIME_MAX_GPUS> limit{};
  const c10::DeviceIndex device = c10::cuda::current_device();
  c10::call_once(once[device], [device] {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, Kernel));
    const int most = static_cast<int>(at::cuda::getDeviceProperties(device)->sharedMemPerBlockOptin -
                                      attr.sharedSizeBytes);
    C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, most));
    limit[device] = most;
  });
  return limit[device];
}

// Runs linear_small_m_kernel when its M rows of codes (M * round_up(K, 16) bytes) fit a
// block's shared memory (dynamic_smem_limit); returns false (nothing launched) otherwise. w K-contiguous.
bool launch_linear_small_m(const at::Tensor& x, const at::Tensor& w, const float* w_scale,
                           const float* bias, const float* fixed_scale, const int32_t* zero_point,
                           Int8ActCodes range, at::Tensor& out, int64_t M, int64_t N, int64_t K) {
  const int64_t lda = round_up(std::max<int64_t>(K, 1), 16);
  const int64_t smem = M * lda;
  if (M > kSmallM) return false;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = small_m_blocks(N);
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const int64_t ldw = w.stride(0);
  bool launched = false;
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "int8_linear_small_m_cuda", [&] {
    const bool w_vec = K % 16 == 0 && ldw % 16 == 0 && aligned16(wp);
    const bool x_packs = K % 8 == 0 && aligned(x.const_data_ptr(), 8 * sizeof(scalar_t));
    const auto launch = [&](auto w_vec_c, auto zp_c) {
      constexpr auto kernel =
          linear_small_m_kernel<scalar_t, decltype(w_vec_c)::value, decltype(zp_c)::value>;
      if (smem > dynamic_smem_limit<kernel>()) return;
      kernel<<<blocks, kThreads, smem, stream>>>(
          x.const_data_ptr<scalar_t>(), x_packs, wp, ldw, w_scale, bias, fixed_scale, zero_point,
          range.qmin, range.qmax, out.data_ptr<scalar_t>(), static_cast<int>(M), N, K, lda);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launched = true;
    };
    if (w_vec) {
      zero_point != nullptr ? launch(std::true_type{}, std::true_type{})
                            : launch(std::true_type{}, std::false_type{});
    } else {
      zero_point != nullptr ? launch(std::false_type{}, std::true_type{})
                            : launch(std::false_type{}, std::false_type{});
    }
  });
  return launched;
}

// Whether int8_linear runs the fused Hopper GEMM: when it is chosen (set_int8_cuda_gemm; "auto"
// on compute capability 9.0) and the call fits it; a static zero point, K % 16 != 0 or
// unaligned rows stay on cuBLASLt.
bool use_sm90_gemm(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
                   int64_t M, bool zero_point) {
  const Int8CudaGemm gemm = current_int8_cuda_gemm();
  if (gemm == Int8CudaGemm::kCublasLt || M <= kSmallM || zero_point) return false;
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(x.get_device());
  const bool hopper = prop->major == 9 && prop->minor == 0;
  if (gemm == Int8CudaGemm::kAuto && !hopper) return false;
  TORCH_CHECK(hopper, op,
              ": the 'cutlass-sm90' GEMM (qlib.set_int8_cuda_gemm) runs only on compute "
              "capability 9.0 (H100, H200), but ", x.device(), " is ", prop->name, " (",
              prop->major, ".", prop->minor, "); use 'cublaslt'");
#ifdef QLIB_WITH_SM90_GEMM
  return int8_linear_sm90_fits(w, out.view({M, out.size(-1)}));
#else
  return false;
#endif
}

at::Tensor int8_linear_cuda(const at::Tensor& x_in, const at::Tensor& w_in,
                            const at::Tensor& w_scale_in, const std::optional<at::Tensor>& bias_in,
                            const std::optional<at::Tensor>& act_scale,
                            const std::optional<at::Tensor>& act_zero_point, int64_t act_quant_min,
                            int64_t act_quant_max) {
  const char* op = "qlib::int8_linear";
  check_int8_linear_args(op, x_in, w_in, w_scale_in, bias_in, act_scale, act_zero_point,
                         act_quant_min, act_quant_max);
  const int64_t N = w_in.size(0);
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t K = w_in.size(1);
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  at::Tensor out = at::empty(int8_linear_out_shape(x, N), x.options());
  if (out.numel() == 0) return out;
  const at::Tensor w_scale = w_scale_in.reshape({N}).contiguous();
  const at::Tensor bias =
      bias_in.has_value() ? bias_in->to(at::kFloat).contiguous() : at::Tensor();
  const auto fopts = x.options().dtype(at::kFloat);
  const bool fused = use_sm90_gemm(op, x, w_in, out, M, act_zero_point.has_value());
  // A static scale and zero point stay on the device (no host read; bad values give NaN
  // rows, quantize_row); under set_cuda_value_checks they are read and checked as on the CPU.
  // The GEMM's sums lose z * (row sums of w).
  const bool check_values = cuda_value_checks() && !capturing();
  const float* fixed = nullptr;
  at::Tensor static_scale;
  if (act_scale.has_value()) {
    static_scale = act_scale->reshape({1}).contiguous();
    fixed = static_scale.const_data_ptr<float>();
    if (check_values) {
      const float a = static_scale.item<float>();
      TORCH_CHECK(std::isfinite(a) && a >= kMinScale, op, ": act_scale must be positive and finite, at least ",
                  kMinScale, " (so that 1 / scale is finite), got ", a);
    }
  }
  at::Tensor zp;
  if (act_zero_point.has_value()) {
    if (check_values) {
      const int64_t z = act_zero_point->item<int64_t>();
      TORCH_CHECK(act_quant_min <= z && z <= act_quant_max, op, ": act_zero_point ", z,
                  " is outside [act_quant_min, act_quant_max] = [", act_quant_min, ", ",
                  act_quant_max, "]");
    }
    // int64 values past int32 stay outside the range (and so give NaN) once narrowed; an
    // int32 zero point goes as it is (no extra launch a call)
    const at::Tensor z32 = act_zero_point->scalar_type() == at::kInt
                               ? *act_zero_point
                               : act_zero_point->clamp(std::numeric_limits<int32_t>::min(),
                                                       std::numeric_limits<int32_t>::max())
                                     .to(at::kInt);
    zp = z32.reshape({1}).contiguous();
  }
  const int32_t* zpp = zp.defined() ? zp.const_data_ptr<int32_t>() : nullptr;
  const Int8ActCodes range{0.0f, static_cast<float>(act_quant_min),
                           static_cast<float>(act_quant_max)};
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  if (M <= kSmallM &&
      launch_linear_small_m(x, w_in.stride(1) == 1 ? w_in : w_in.contiguous(),
                            w_scale.const_data_ptr<float>(), bp, fixed, zpp, range, out, M, N, K))
    return out;

  // Activations, K padded to a multiple of 16 (zeros): _int_mm's K % 8 and dp4a's 16-byte packs.
  // Rows: M, or zero-padded to cuBLASLt's 17 for kSmallM < M < 17.
  const int64_t Kp = round_up(std::max<int64_t>(K, 1), 16);
  const int64_t Mq = M <= kSmallM || fused ? M : std::max(M, kIntMmMinM);
  at::Tensor q = at::empty({Mq, Kp}, x.options().dtype(at::kChar));
  const at::Tensor w_rowsum = zp.defined() ? w_in.sum(1, /*keepdim=*/false, at::kInt) : at::Tensor();
  at::Tensor sa = at::empty({Mq}, fopts);  // row scales (NaN: a row holding NaN)
  launch_quantize_rows(x, M, Mq, K, q, Kp, sa.data_ptr<float>(), fixed, zpp, range);
#ifdef QLIB_WITH_SM90_GEMM
  if (fused) {
    at::Tensor out2d = out.view({M, N});
    int8_linear_sm90(q, w_in, sa, w_scale, bias, out2d);
    return out;
  }
#endif

  at::Tensor c;
  if (K == 0) {
    c = at::zeros({M, N}, x.options().dtype(at::kInt));
  } else if (M <= kSmallM) {
    const at::Tensor w = (w_in.stride(1) == 1 && w_in.size(1) == Kp) ? w_in : pad_operand(w_in, N, Kp);
    c = gemm_any(q, w, M, N, Kp);
  } else {
    c = gemm_any(q, w_in.stride(1) == 1 ? w_in : w_in.contiguous(), Mq, N, Kp);
  }
  const int64_t ldc = c.size(1);
  const float* sp = sa.const_data_ptr<float>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "int8_linear_epilogue_cuda", [&] {
    const int32_t* cp = c.const_data_ptr<int32_t>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const float* wsp = w_scale.const_data_ptr<float>();
    const int32_t* rsp = w_rowsum.defined() ? w_rowsum.const_data_ptr<int32_t>() : nullptr;
    const bool vec = N % 4 == 0 && ldc % 4 == 0 && aligned16(cp) && aligned(op_, 4 * sizeof(scalar_t));
    const int V = vec ? 4 : 1;
    const dim3 grid(static_cast<unsigned>(((N + V - 1) / V + kThreads - 1) / kThreads),
                    static_cast<unsigned>(std::min<int64_t>(M, 65535)));
    if (vec) {
      dequant_epilogue_kernel<scalar_t, 4><<<grid, kThreads, 0, stream>>>(
          cp, ldc, sp, wsp, bp, zpp, rsp, op_, M, N);
    } else {
      dequant_epilogue_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(
          cp, ldc, sp, wsp, bp, zpp, rsp, op_, M, N);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The packed weight layout is a CPU kernel's; on CUDA it is empty and int8_linear_packed is
// int8_linear.
at::Tensor int8_pack_weight_cuda(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2,
              "qlib::int8_pack_weight: w must be a 2-D int8 [N, K] tensor, got ", w.scalar_type(),
              " of shape ", w.sizes());
  return at::empty({0}, w.options());
}

// A CPU packing moved onto the GPU (an exported or pickled CPU Int8Linear): unpacked on the
// CPU (its layout is a CPU kernel's) and copied back. Slow; Int8Linear.to() unpacks first.
at::Tensor int8_unpack_weight_cuda(const at::Tensor& w_packed, int64_t N, int64_t K) {
  TORCH_CHECK(w_packed.numel() > 0, "qlib::int8_unpack_weight: w_packed is empty (CUDA keeps no "
              "packing: int8_pack_weight gives an empty tensor there); use w_int8 itself");
  return int8_unpack_weight(w_packed.cpu(), N, K).to(w_packed.device());
}

at::Tensor int8_linear_packed_cuda(const at::Tensor& x, const at::Tensor& w_packed,
                                   const std::optional<at::Tensor>& w, const at::Tensor& w_scale,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& act_scale,
                                   const std::optional<at::Tensor>& act_zero_point,
                                   int64_t act_quant_min, int64_t act_quant_max) {
  if (!w.has_value()) check_int8_float_input("qlib::int8_linear_packed", "x", x);
  const at::Tensor w_int8 =
      w.has_value() ? *w : int8_unpack_weight_cuda(w_packed, w_scale.numel(), x.size(-1));
  return int8_linear_cuda(x, w_int8, w_scale, bias, act_scale, act_zero_point, act_quant_min,
                          act_quant_max);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, CUDA, m) {
  m.impl("quantize_per_token", &quantize_per_token_cuda);
  m.impl("int8_gemm", &int8_gemm_cuda);
  m.impl("int8_linear", &int8_linear_cuda);
  m.impl("int8_pack_weight", &int8_pack_weight_cuda);
  m.impl("int8_linear_packed", &int8_linear_packed_cuda);
  m.impl("int8_unpack_weight", &int8_unpack_weight_cuda);
}

}  // namespace qlib
