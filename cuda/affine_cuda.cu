// CUDA kernels of the affine ops: fake_quant (forward and backward),
// quantize, dequantize, choose_qparams. Formulas from quant_math.h, block
// geometry from block_layout.h; 16-byte loads, 64-bit indexing, the current
// stream and a launch check after every kernel.
#include <limits>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "affine.h"
#include "capture.cuh"
#include "pack.cuh"
#include "quant_math.h"

namespace qlib {
namespace {

constexpr int kThreads = 256;

// Which scale covers an element: one for all (per-tensor); one per row of
// `inner_run` elements (per-channel, per-token, per-group: one 32-bit division a pack);
// one per 16-byte pack found by walking the layout (the block is a multiple of the
// pack); or looked up per element.
enum class ScaleLookup { kTensor, kRow, kPack, kElement };

// How a kernel reads the zero point: as given (int32, int64) or as float32
// rounded to the nearest integer (floating LSQ+ zero points; prepare_affine's
// already-rounded float32).
enum class ZeroPointKind : int { kFloat, kInt32, kInt64 };

struct KernelQParams {
  const float* scale;
  const void* zero_point;
  ZeroPointKind zp_kind;
  BlockLayout layout;
  float qmin, qmax;
  at::cuda::detail::IntDivider<uint32_t> row_len;  // inner_run, for kRow
  __device__ float zero_point_at(int64_t s) const {
    switch (zp_kind) {
      case ZeroPointKind::kInt32:
        return static_cast<float>(static_cast<const int32_t*>(zero_point)[s]);
      case ZeroPointKind::kInt64:
        return static_cast<float>(static_cast<const int64_t*>(zero_point)[s]);
      default:
        return rintf(static_cast<const float*>(zero_point)[s]);
    }
  }
};

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// quantize / dequantize: their qparam values are always checked (a host sync),
// except while a CUDA graph is captured.
AffineArgs prepare(const char* op, const char* x_name, const at::Tensor& x,
                   const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
                   int64_t quant_max) {
  return prepare_affine(op, x_name, x, scale, zero_point, quant_min, quant_max, !capturing());
}

// fake_quant (forward, backward): no host sync and no conversion launch for
// float32 scales and int32 / int64 / float32 zero points; the kernels check
// each block's qparams (qparams_valid) and give NaN where they fail, unless
// qlib.set_cuda_value_checks(True) asks for the raising (syncing) checks.
AffineArgs prepare_fake_quant(const char* op, const at::Tensor& x, const at::Tensor& scale,
                              const at::Tensor& zero_point, int64_t quant_min,
                              int64_t quant_max) {
  if (cuda_value_checks() && !capturing()) {
    return prepare_affine(op, "x", x, scale, zero_point, quant_min, quant_max, true);
  }
  AffineArgs a = check_affine_args(op, "x", x, scale, zero_point, quant_min, quant_max);
  a.scale = a.arranged_qparam(a.scale.to(at::kFloat).contiguous());
  const auto zt = a.zero_point.scalar_type();
  a.zero_point = a.arranged_qparam(zt == at::kInt || zt == at::kLong || zt == at::kFloat
                                       ? a.zero_point.contiguous()
                                       : a.zero_point.to(at::kFloat).contiguous());
  return a;
}

// Rows of inner_run elements, one scale each (per-channel, per-token, per-group), and
// under 2^31 elements: ScaleLookup::kRow's 32-bit division applies (IntDivider's dividends
// must fit int32: past that its multiply-high sum wraps).
bool one_scale_per_row(const AffineArgs& a) {
  const BlockLayout& l = a.layout;
  return l.num_segments == 2 && l.scale_stride[0] == 1 && l.scale_stride[1] == 0 &&
         a.x.numel() <= std::numeric_limits<int32_t>::max();
}

KernelQParams kernel_qparams(const AffineArgs& a) {
  const auto zt = a.zero_point.scalar_type();
  TORCH_INTERNAL_ASSERT(zt == at::kInt || zt == at::kLong || zt == at::kFloat);
  const ZeroPointKind kind = zt == at::kInt    ? ZeroPointKind::kInt32
                             : zt == at::kLong ? ZeroPointKind::kInt64
                                               : ZeroPointKind::kFloat;
  const bool rows = one_scale_per_row(a);
  return {a.scale.const_data_ptr<float>(),
          a.zero_point.const_data_ptr(),
          kind,
          a.layout,
          a.qmin,
          a.qmax,
          at::cuda::detail::IntDivider<uint32_t>(rows ? static_cast<uint32_t>(a.layout.inner_run)
                                                      : 1u)};
}

// One block's qparams, read once per pack where the pack shares them.
struct BlockQParams {
  float scale, inv_scale, zero_point;
  bool valid;
};

__device__ __forceinline__ BlockQParams block_qparams(const KernelQParams& p, int64_t s) {
  const float sc = p.scale[s];
  const float zp = p.zero_point_at(s);
  return {sc, 1.0f / sc, zp, qparams_valid(sc, zp, p.qmin, p.qmax)};
}

// The per-tensor qparams, read once a thread before its loop (unused past kTensor).
template <ScaleLookup L>
__device__ __forceinline__ BlockQParams tensor_qparams(const KernelQParams& p) {
  if constexpr (L == ScaleLookup::kTensor) return block_qparams(p, 0);
  else return {};
}

// The qparams of element i (`tensor` for kTensor).
template <ScaleLookup L>
__device__ __forceinline__ BlockQParams element_qparams(const KernelQParams& p,
                                                        const BlockQParams& tensor, int64_t i) {
  if constexpr (L == ScaleLookup::kTensor) return tensor;
  else if constexpr (L == ScaleLookup::kRow)
    return block_qparams(p, p.row_len.div(static_cast<uint32_t>(i)));
  else return block_qparams(p, p.layout.scale_index(i));
}

// The qparams shared by the pack starting at `base` (unused for kElement).
template <ScaleLookup L>
__device__ __forceinline__ BlockQParams pack_qparams(const KernelQParams& p,
                                                     const BlockQParams& tensor, int64_t base) {
  if constexpr (L == ScaleLookup::kElement) return {};
  else return element_qparams<L>(p, tensor, base);
}

// body(k, q) for each element k of the pack starting at `base` whose qparams q are valid,
// invalid(k) for the others. Where the pack shares its qparams that is one branch a pack,
// not one an element (an element's branch kept the compiler from running them as one
// straight block).
template <ScaleLookup L, int N, class Body, class Invalid>
__device__ __forceinline__ void for_each_element(const KernelQParams& p, const BlockQParams& pack,
                                                 int64_t base, const Body& body,
                                                 const Invalid& invalid) {
  if constexpr (L == ScaleLookup::kElement) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const BlockQParams q = element_qparams<L>(p, pack, base + k);
      if (q.valid) body(k, q);
      else invalid(k);
    }
  } else if (pack.valid) {
#pragma unroll
    for (int k = 0; k < N; ++k) body(k, pack);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) invalid(k);
  }
}

template <ScaleLookup L>
using LookupTag = std::integral_constant<ScaleLookup, L>;

// Calls launch(LookupTag<L>{}) with the ScaleLookup that fits a and packs of N.
template <int N, class Launch>
void with_lookup(const AffineArgs& a, const Launch& launch) {
  if (a.per_tensor) {
    launch(LookupTag<ScaleLookup::kTensor>{});
  } else if (!a.layout.inner_steps_scale && a.layout.inner_run % N == 0) {
    if (one_scale_per_row(a)) launch(LookupTag<ScaleLookup::kRow>{});
    else launch(LookupTag<ScaleLookup::kPack>{});
  } else {
    launch(LookupTag<ScaleLookup::kElement>{});
  }
}

// Blocks for a grid-stride kernel: one per kThreads work items, at most one full wave (the
// blocks of Kernel that fit on every SM at once, registers permitting). More blocks than
// fit would run as a second, partly filled wave.
template <auto Kernel>
int64_t blocks_for(int64_t work) {
  static const int per_sm = [] {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, Kernel, kThreads, 0));
    return std::max(blocks, 1);
  }();
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * per_sm;
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
}

// The fake_quant kernels loop over 16-byte packs, U a thread per iteration, all U loaded
// before any is computed: each thread keeps U loads in flight
// (qlib._C.set_fake_quant_cuda_packs picks U).
template <class T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* __restrict__ p, int64_t base, int64_t n) {
  if (base + N <= n) return *reinterpret_cast<const Pack<T, N>*>(p + base);
  Pack<T, N> out;
  for (int k = 0; k < N; ++k) out.v[k] = base + k < n ? p[base + k] : T(0);
  return out;
}

template <class T, int N>
__device__ __forceinline__ void store_pack(T* __restrict__ p, int64_t base, int64_t n,
                                           const Pack<T, N>& v) {
  if (base + N <= n) {
    *reinterpret_cast<Pack<T, N>*>(p + base) = v;
  } else {
    for (int k = 0; k < N && base + k < n; ++k) p[base + k] = v.v[k];
  }
}

// This thread's packs of a grid-stride loop over `packs`, U an iteration: load(u, v) for
// each of the U packs v = v0 + u * S (S the grid's threads) that exist, then compute(u, v)
// for each of them.
template <int U, class Load, class Compute>
__device__ __forceinline__ void for_each_pack_group(int64_t packs, const Load& load,
                                                    const Compute& compute) {
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v0 < packs;
       v0 += threads * U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (v0 + u * threads < packs) load(u, v0 + u * threads);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (v0 + u * threads >= packs) break;
      compute(u, v0 + u * threads);
    }
  }
}

// Calls launch(std::integral_constant<int, U>{}) with U = fake_quant_cuda_packs() (U = 1 for
// the unaligned, one-element packs).
template <int N, class Launch>
void with_packs(const Launch& launch) {
  if constexpr (N == 1) {
    launch(std::integral_constant<int, 1>{});
  } else {
    switch (fake_quant_cuda_packs()) {
      case 4: return launch(std::integral_constant<int, 4>{});
      case 2: return launch(std::integral_constant<int, 2>{});
      default: return launch(std::integral_constant<int, 1>{});
    }
  }
}

// ---------------------------------------------------------------- forward
// y, and with WithMask the STE mask (true where the unclamped code is in range; false in a
// block whose qparams fail, where y is NaN).
template <class T, int N, int U, ScaleLookup L, bool WithMask>
__global__ void fake_quant_kernel(const T* __restrict__ x, T* __restrict__ y,
                                  bool* __restrict__ mask, int64_t n, KernelQParams p) {
  const BlockQParams tensor = tensor_qparams<L>(p);
  Pack<T, N> in[U];
  BlockQParams pack[U];
  for_each_pack_group<U>(
      (n + N - 1) / N,
      [&](int u, int64_t v) {
        in[u] = load_pack<T, N>(x, v * N, n);
        pack[u] = pack_qparams<L>(p, tensor, v * N);
      },
      [&](int u, int64_t v) {
        Pack<T, N> out;
        Pack<bool, N> inside;
        for_each_element<L, N>(
            p, pack[u], v * N,
            [&](int k, const BlockQParams& q) {
              const auto r = fake_quant_value_and_mask<ScalarMath>(
                  static_cast<float>(in[u].v[k]), q.scale, q.inv_scale, q.zero_point, p.qmin,
                  p.qmax);
              out.v[k] = static_cast<T>(r.value);
              inside.v[k] = r.inside != 0.0f;
            },
            [&](int k) {
              out.v[k] = static_cast<T>(kNaN);
              inside.v[k] = false;
            });
        store_pack<T, N>(y, v * N, n, out);
        if constexpr (WithMask) store_pack<bool, N>(mask, v * N, n, inside);
      });
}

template <class T, int N>
void launch_fake_quant(const AffineArgs& a, at::Tensor& out, bool* mask) {
  const int64_t n = a.x.numel();
  const auto p = kernel_qparams(a);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const T* x = a.x.const_data_ptr<T>();
  T* y = out.data_ptr<T>();
  with_packs<N>([&](auto packs) {
    constexpr int U = decltype(packs)::value;
    with_lookup<N>(a, [&](auto lookup) {
      const auto launch = [&](auto with_mask) {
        constexpr auto kernel =
            fake_quant_kernel<T, N, U, decltype(lookup)::value, decltype(with_mask)::value>;
        kernel<<<blocks_for<kernel>((n + N * U - 1) / (N * U)), kThreads, 0, stream>>>(
            x, y, mask, n, p);
      };
      if (mask != nullptr) launch(std::true_type{});
      else launch(std::false_type{});
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// fake_quant (op names it), and its mask when with_mask (else undefined).
std::tuple<at::Tensor, at::Tensor> fake_quant_cuda_outputs(
    const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, bool with_mask) {
  check_fake_quant_input(op, x);
  check_quant_range(op, quant_min, quant_max);
  // (A generic guard: for a CPU x it does nothing and the checks report the mismatch.)
  const at::OptionalDeviceGuard guard(x.device());
  const AffineArgs a = prepare_fake_quant(op, x, scale, zero_point, quant_min, quant_max);
  at::Tensor out = a.empty_like_x(a.x.options());
  at::Tensor mask = with_mask ? a.empty_like_x(a.x.options().dtype(at::kBool)) : at::Tensor();
  if (a.x.numel() > 0) {
    bool* mp = with_mask ? mask.data_ptr<bool>() : nullptr;
    QLIB_DISPATCH_FLOAT(a.x.scalar_type(), "fake_quant_cuda", [&] {
      constexpr int N = 16 / sizeof(scalar_t);
      if (aligned16(a.x.const_data_ptr()) && aligned16(out.const_data_ptr()) &&
          (mp == nullptr || aligned(mp, N))) {
        launch_fake_quant<scalar_t, N>(a, out, mp);
      } else {
        launch_fake_quant<scalar_t, 1>(a, out, mp);
      }
    });
  }
  return {a.in_given_order(out), with_mask ? a.in_given_order(mask) : mask};
}

at::Tensor fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
  return std::get<0>(fake_quant_cuda_outputs("qlib::fake_quant", x, scale, zero_point, quant_min,
                                             quant_max, false));
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_mask_cuda(const at::Tensor& x,
                                                             const at::Tensor& scale,
                                                             const at::Tensor& zero_point,
                                                             int64_t quant_min,
                                                             int64_t quant_max) {
  return fake_quant_cuda_outputs("qlib::fake_quant_with_mask", x, scale, zero_point, quant_min,
                                 quant_max, true);
}

// grad * mask (the mask as 0.0f / 1.0f: a NaN grad stays NaN where masked, as torch's
// *_cachemask backward), packs of N as the forward. (ATen's mul of a bool mask casts each
// element on the fly: 64% of copy on a bf16 grad, H100.)
template <class T, int N>
__global__ void fake_quant_mask_backward_kernel(const T* __restrict__ grad,
                                                const bool* __restrict__ mask,
                                                T* __restrict__ grad_x, int64_t n) {
  Pack<T, N> g[1];
  Pack<bool, N> m[1];
  for_each_pack_group<1>(
      (n + N - 1) / N,
      [&](int u, int64_t v) {
        g[u] = load_pack<T, N>(grad, v * N, n);
        m[u] = load_pack<bool, N>(mask, v * N, n);
      },
      [&](int u, int64_t v) {
        Pack<T, N> out;
#pragma unroll
        for (int k = 0; k < N; ++k) {
          out.v[k] = static_cast<T>(static_cast<float>(g[u].v[k]) * (m[u].v[k] ? 1.0f : 0.0f));
        }
        store_pack<T, N>(grad_x, v * N, n, out);
      });
}

at::Tensor fake_quant_mask_backward_cuda(const at::Tensor& grad, const at::Tensor& mask) {
  const at::OptionalDeviceGuard guard(grad.device());
  const MaskBackwardArgs a = prepare_fake_quant_mask_backward(grad, mask);
  const at::Tensor &g = a.grad, &m = a.mask, &out = a.out;
  const int64_t n = out.numel();
  if (n == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  QLIB_DISPATCH_FLOAT(g.scalar_type(), "fake_quant_mask_backward_cuda", [&] {
    constexpr int N = 16 / sizeof(scalar_t);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const bool* mp = m.const_data_ptr<bool>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto launch = [&](auto pack) {
      constexpr int P = decltype(pack)::value;
      constexpr auto kernel = fake_quant_mask_backward_kernel<scalar_t, P>;
      kernel<<<blocks_for<kernel>((n + P - 1) / P), kThreads, 0, stream>>>(gp, mp, op, n);
    };
    if (aligned16(gp) && aligned16(op) && aligned(mp, N)) launch(std::integral_constant<int, N>{});
    else launch(std::integral_constant<int, 1>{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------- backward
// grad_x, and with Lsq the per-element LSQ terms asked for (d_scale and/or d_zero_point, null
// when not); U packs of N elements a thread per iteration, as in the forward. Without Lsq the
// LSQ terms are neither computed nor stored.
template <class T, int N, int U, ScaleLookup L, bool Lsq>
__global__ void fake_quant_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                           T* __restrict__ grad_x, float* __restrict__ d_scale,
                                           float* __restrict__ d_zero_point, int64_t n,
                                           KernelQParams p) {
  const BlockQParams tensor = tensor_qparams<L>(p);
  Pack<T, N> g[U], xv[U];
  BlockQParams pack[U];
  for_each_pack_group<U>(
      (n + N - 1) / N,
      [&](int u, int64_t v) {
        g[u] = load_pack<T, N>(grad, v * N, n);
        xv[u] = load_pack<T, N>(x, v * N, n);
        pack[u] = pack_qparams<L>(p, tensor, v * N);
      },
      [&](int u, int64_t v) {
        Pack<T, N> gx;
        Pack<float, N> ds, dz;
        const auto set = [&](int k, const ElementGrads<float>& e) {
          gx.v[k] = static_cast<T>(e.grad_x);
          ds.v[k] = e.grad_scale;
          dz.v[k] = e.grad_zero_point;
        };
        for_each_element<L, N>(
            p, pack[u], v * N,
            [&](int k, const BlockQParams& q) {
              set(k, fake_quant_grads<ScalarMath>(static_cast<float>(g[u].v[k]),
                                                  static_cast<float>(xv[u].v[k]), q.scale,
                                                  q.inv_scale, q.zero_point, p.qmin, p.qmax));
            },
            [&](int k) { set(k, ElementGrads<float>{kNaN, kNaN, kNaN}); });
        store_pack<T, N>(grad_x, v * N, n, gx);
        if constexpr (Lsq) {
          if (d_scale != nullptr) store_pack<float, N>(d_scale, v * N, n, ds);
          if (d_zero_point != nullptr) store_pack<float, N>(d_zero_point, v * N, n, dz);
        }
      });
}

template <class T, int N>
void launch_fake_quant_backward(const AffineArgs& a, const T* g, T* gx, float* ds, float* dz) {
  const int64_t n = a.x.numel();
  const auto p = kernel_qparams(a);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const T* x = a.x.const_data_ptr<T>();
  with_packs<N>([&](auto packs) {
    constexpr int U = decltype(packs)::value;
    with_lookup<N>(a, [&](auto lookup) {
      constexpr ScaleLookup L = decltype(lookup)::value;
      const auto launch = [&](auto lsq) {
        constexpr auto kernel = fake_quant_backward_kernel<T, N, U, L, decltype(lsq)::value>;
        kernel<<<blocks_for<kernel>((n + N * U - 1) / (N * U)), kThreads, 0, stream>>>(
            g, x, gx, ds, dz, n, p);
      };
      if (ds != nullptr || dz != nullptr) launch(std::true_type{});
      else launch(std::false_type{});
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, bool scale_grad,
    bool zero_point_grad) {
  const char* op = "qlib::fake_quant_backward";
  check_fake_quant_backward_args(op, grad, x, zero_point, quant_min, quant_max, zero_point_grad);
  const at::OptionalDeviceGuard guard(x.device());
  const AffineArgs a = prepare_fake_quant(op, x, scale, zero_point, quant_min, quant_max);
  const at::Tensor g = a.arranged_like_x(grad);
  at::Tensor grad_x = a.empty_like_x(a.x.options());
  // Per-element LSQ terms (float32, x-sized), only for the gradients asked for.
  const auto fopts = a.x.options().dtype(at::kFloat);
  at::Tensor ds = scale_grad ? at::empty(a.x.sizes(), fopts) : at::Tensor();
  at::Tensor dz = zero_point_grad ? at::empty(a.x.sizes(), fopts) : at::Tensor();
  if (a.x.numel() > 0) {
    QLIB_DISPATCH_FLOAT(a.x.scalar_type(), "fake_quant_backward_cuda", [&] {
      constexpr int N = 16 / sizeof(scalar_t);
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      scalar_t* gxp = grad_x.data_ptr<scalar_t>();
      float* dsp = scale_grad ? ds.data_ptr<float>() : nullptr;
      float* dzp = zero_point_grad ? dz.data_ptr<float>() : nullptr;
      if (aligned16(gp) && aligned16(a.x.const_data_ptr()) && aligned16(gxp)) {
        launch_fake_quant_backward<scalar_t, N>(a, gp, gxp, dsp, dzp);
      } else {
        launch_fake_quant_backward<scalar_t, 1>(a, gp, gxp, dsp, dzp);
      }
    });
  }
  return fake_quant_backward_outputs(a, grad_x,
                                     scale_grad ? sum_over_blocks(ds, a.scale) : at::Tensor(),
                                     zero_point_grad ? sum_over_blocks(dz, a.scale) : at::Tensor(),
                                     scale, zero_point);
}

// ---------------------------------------------------------------- quantize / dequantize
// One element a thread per iteration; L is kTensor, kRow or kElement (the layout walk).
template <class X, class Q, ScaleLookup L>
__global__ void quantize_kernel(const X* __restrict__ x, Q* __restrict__ q, int64_t n,
                                KernelQParams p) {
  const BlockQParams tensor = tensor_qparams<L>(p);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const BlockQParams b = element_qparams<L>(p, tensor, i);
    const float code = quantize_code<ScalarMath>(static_cast<float>(x[i]), b.inv_scale,
                                                 b.zero_point, p.qmin, p.qmax);
    q[i] = static_cast<Q>(code != code ? b.zero_point : code);  // NaN -> zero_point
  }
}

template <class Q, class Y, ScaleLookup L>
__global__ void dequantize_kernel(const Q* __restrict__ q, Y* __restrict__ y, int64_t n,
                                  KernelQParams p) {
  const BlockQParams tensor = tensor_qparams<L>(p);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const BlockQParams b = element_qparams<L>(p, tensor, i);
    y[i] = static_cast<Y>(code_minus_zero_point(q[i], b.zero_point) * b.scale);
  }
}

// with_lookup for the one-element kernels, where kPack is kElement.
template <class Launch>
void with_element_lookup(const AffineArgs& a, const Launch& launch) {
  with_lookup<1>(a, [&](auto lookup) {
    constexpr ScaleLookup L = decltype(lookup)::value;
    launch(LookupTag<L == ScaleLookup::kPack ? ScaleLookup::kElement : L>{});
  });
}

at::Tensor quantize_cuda(const at::Tensor& x, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                         at::ScalarType dtype) {
  const char* op = "qlib::quantize";
  check_quantize_args(op, x, dtype, quant_min, quant_max);
  const at::OptionalDeviceGuard guard(x.device());
  const AffineArgs a = prepare(op, "x", x, scale, zero_point, quant_min, quant_max);
  at::Tensor out = a.empty_like_x(a.x.options().dtype(dtype));
  const int64_t n = a.x.numel();
  if (n == 0) return a.in_given_order(out);
  const auto p = kernel_qparams(a);
  const auto stream = at::cuda::getCurrentCUDAStream();
  QLIB_DISPATCH_FLOAT(a.x.scalar_type(), "quantize_cuda", [&] {
    using x_t = scalar_t;
    QLIB_DISPATCH_QINT(dtype, "quantize_cuda", [&] {
      with_element_lookup(a, [&](auto lookup) {
        constexpr auto kernel = quantize_kernel<x_t, scalar_t, decltype(lookup)::value>;
        kernel<<<blocks_for<kernel>(n), kThreads, 0, stream>>>(a.x.const_data_ptr<x_t>(),
                                                               out.data_ptr<scalar_t>(), n, p);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a.in_given_order(out);
}

at::Tensor dequantize_cuda(const at::Tensor& q, const at::Tensor& scale,
                           const at::Tensor& zero_point, at::ScalarType dtype) {
  const char* op = "qlib::dequantize";
  const auto [quant_min, quant_max] = check_dequantize_args(op, q, dtype);
  const at::OptionalDeviceGuard guard(q.device());
  const AffineArgs a = prepare(op, "q", q, scale, zero_point, quant_min, quant_max);
  at::Tensor out = a.empty_like_x(a.x.options().dtype(dtype));
  const int64_t n = a.x.numel();
  if (n == 0) return a.in_given_order(out);
  const auto p = kernel_qparams(a);
  const auto stream = at::cuda::getCurrentCUDAStream();
  QLIB_DISPATCH_QINT(a.x.scalar_type(), "dequantize_cuda", [&] {
    using q_t = scalar_t;
    QLIB_DISPATCH_FLOAT(dtype, "dequantize_cuda", [&] {
      with_element_lookup(a, [&](auto lookup) {
        constexpr auto kernel = dequantize_kernel<q_t, scalar_t, decltype(lookup)::value>;
        kernel<<<blocks_for<kernel>(n), kThreads, 0, stream>>>(a.x.const_data_ptr<q_t>(),
                                                               out.data_ptr<scalar_t>(), n, p);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a.in_given_order(out);
}

// ---------------------------------------------------------------- choose_qparams
// choose_qparams (Observed = false) and observer_qparams (observed_qparams_value).
template <bool Observed>
__global__ void choose_qparams_kernel(const float* __restrict__ lo, const float* __restrict__ hi,
                                      float* __restrict__ scale, int32_t* __restrict__ zp,
                                      int64_t n, int64_t qmin, int64_t qmax, bool symmetric,
                                      float eps) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const QParams p = qparams_value<Observed>(lo[i], hi[i], qmin, qmax, symmetric, eps);
    scale[i] = p.scale;
    zp[i] = p.zero_point;
  }
}

// choose_qparams checks min and max and the scales it chose (one host read) unless a graph is
// being captured. observer_qparams reads nothing back: a span too wide for a float32 scale
// gives an infinite scale (fake_quant then gives NaN for the block), or raises under
// qlib.set_cuda_value_checks(True).
template <bool Observed>
std::tuple<at::Tensor, at::Tensor> qparams_cuda(const at::Tensor& min, const at::Tensor& max,
                                                int64_t quant_min, int64_t quant_max,
                                                bool symmetric, double eps) {
  const char* op = Observed ? "qlib::observer_qparams" : "qlib::choose_qparams";
  const at::OptionalDeviceGuard guard(min.device());
  check_choose_qparams_args(op, min, max, quant_min, quant_max, eps, /*check_values=*/false);
  const at::Tensor lo = min.to(at::kFloat).contiguous();
  const at::Tensor hi = max.to(at::kFloat).contiguous();
  at::Tensor scale = at::empty(lo.sizes(), lo.options());
  at::Tensor zp = at::empty(lo.sizes(), lo.options().dtype(at::kInt));
  const int64_t n = lo.numel();
  if (n == 0) return {scale, zp};
  const auto stream = at::cuda::getCurrentCUDAStream();
  constexpr auto kernel = choose_qparams_kernel<Observed>;
  kernel<<<blocks_for<kernel>(n), kThreads, 0, stream>>>(
      lo.const_data_ptr<float>(), hi.const_data_ptr<float>(), scale.data_ptr<float>(),
      zp.data_ptr<int32_t>(), n, quant_min, quant_max, symmetric, static_cast<float>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if ((!Observed || cuda_value_checks()) && !capturing())
    check_chosen_qparams(op, lo, hi, scale, /*check_order=*/!Observed, quant_min, quant_max);
  return {scale, zp};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, CUDA, m) {
  m.impl("fake_quant", &fake_quant_cuda);
  m.impl("fake_quant_backward", &fake_quant_backward_cuda);
  m.impl("fake_quant_with_mask", &fake_quant_with_mask_cuda);
  m.impl("fake_quant_mask_backward", &fake_quant_mask_backward_cuda);
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("choose_qparams", &qparams_cuda<false>);
  m.impl("observer_qparams", &qparams_cuda<true>);
}

}  // namespace qlib
