// CUDA kernels of the affine ops: fake_quant (forward and backward),
// quantize, dequantize, choose_qparams. Formulas from quant_math.h, block
// geometry from block_layout.h; 16-byte loads, 64-bit indexing, the current
// stream and a launch check after every kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "affine.h"
#include "quant_math.h"

namespace qlib {
namespace {

constexpr int kThreads = 256;

// Which scale covers an element: one for all (per-tensor), one per 16-byte
// pack (the block is a multiple of the pack), or looked up per element.
enum class ScaleLookup { kTensor, kPack, kElement };

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

struct KernelQParams {
  const float* scale;
  const float* zero_point;
  BlockLayout layout;
  float qmin, qmax;

  template <ScaleLookup L>
  __device__ int64_t index(int64_t i, int64_t pack_index) const {
    if constexpr (L == ScaleLookup::kTensor) return 0;
    else if constexpr (L == ScaleLookup::kPack) return pack_index;
    else return layout.scale_index(i);
  }
};

bool capturing() {
  return at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
}

AffineArgs prepare(const char* op, const char* x_name, const at::Tensor& x,
                   const at::Tensor& scale, const at::Tensor& zero_point, int64_t quant_min,
                   int64_t quant_max) {
  return prepare_affine(op, x_name, x, scale, zero_point, quant_min, quant_max,
                        cuda_value_checks() && !capturing());
}

KernelQParams kernel_qparams(const AffineArgs& a) {
  return {a.scale.const_data_ptr<float>(), a.zero_point.const_data_ptr<float>(), a.layout,
          a.qmin, a.qmax};
}

template <int N>
ScaleLookup lookup_for(const AffineArgs& a) {
  if (a.per_tensor) return ScaleLookup::kTensor;
  if (!a.layout.inner_steps_scale && a.layout.inner_run % N == 0) return ScaleLookup::kPack;
  return ScaleLookup::kElement;
}

int64_t blocks_for(int64_t work) {
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------- forward
template <class T, int N, ScaleLookup L>
__global__ void fake_quant_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t n,
                                  KernelQParams p) {
  const int64_t packs = (n + N - 1) / N;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < packs;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = v * N;
    const int64_t pack_scale = L == ScaleLookup::kPack ? p.layout.scale_index(base) : 0;
    Pack<T, N> in, out;
    const bool full = base + N <= n;
    if (full) {
      in = *reinterpret_cast<const Pack<T, N>*>(x + base);
    } else {
      for (int k = 0; k < N; ++k) in.v[k] = base + k < n ? x[base + k] : T(0);
    }
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int64_t s = p.index<L>(base + k, pack_scale);
      const float sc = p.scale[s];
      out.v[k] = static_cast<T>(fake_quant_value<ScalarMath>(
          static_cast<float>(in.v[k]), sc, 1.0f / sc, p.zero_point[s], p.qmin, p.qmax));
    }
    if (full) {
      *reinterpret_cast<Pack<T, N>*>(y + base) = out;
    } else {
      for (int k = 0; k < N && base + k < n; ++k) y[base + k] = out.v[k];
    }
  }
}

template <class T, int N>
void launch_fake_quant(const AffineArgs& a, at::Tensor& out) {
  const int64_t n = a.x.numel();
  const auto p = kernel_qparams(a);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = blocks_for((n + N - 1) / N);
  const T* x = a.x.const_data_ptr<T>();
  T* y = out.data_ptr<T>();
  switch (lookup_for<N>(a)) {
    case ScaleLookup::kTensor:
      fake_quant_kernel<T, N, ScaleLookup::kTensor><<<blocks, kThreads, 0, stream>>>(x, y, n, p);
      break;
    case ScaleLookup::kPack:
      fake_quant_kernel<T, N, ScaleLookup::kPack><<<blocks, kThreads, 0, stream>>>(x, y, n, p);
      break;
    default:
      fake_quant_kernel<T, N, ScaleLookup::kElement><<<blocks, kThreads, 0, stream>>>(x, y, n, p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale,
                           const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
  const char* op = "qlib::fake_quant";
  check_fake_quant_input(op, x);
  check_quant_range(op, quant_min, quant_max);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const AffineArgs a = prepare(op, "x", x, scale, zero_point, quant_min, quant_max);
  at::Tensor out = at::empty_like(a.x);
  if (a.x.numel() == 0) return out;
  QLIB_DISPATCH_FLOAT(a.x.scalar_type(), "fake_quant_cuda", [&] {
    constexpr int N = 16 / sizeof(scalar_t);
    if (aligned16(a.x.const_data_ptr()) && aligned16(out.const_data_ptr())) {
      launch_fake_quant<scalar_t, N>(a, out);
    } else {
      launch_fake_quant<scalar_t, 1>(a, out);
    }
  });
  return out;
}

// ---------------------------------------------------------------- backward
template <class T, ScaleLookup L>
__global__ void fake_quant_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                           T* __restrict__ grad_x, float* __restrict__ d_scale,
                                           float* __restrict__ d_zero_point, int64_t n,
                                           KernelQParams p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = p.index<L == ScaleLookup::kTensor ? L : ScaleLookup::kElement>(i, 0);
    const float sc = p.scale[s];
    const auto g = fake_quant_grads<ScalarMath>(static_cast<float>(grad[i]),
                                                static_cast<float>(x[i]), sc, 1.0f / sc,
                                                p.zero_point[s], p.qmin, p.qmax);
    grad_x[i] = static_cast<T>(g.grad_x);
    if (d_scale != nullptr) {
      d_scale[i] = g.grad_scale;
      d_zero_point[i] = g.grad_zero_point;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, bool scale_grad,
    bool zero_point_grad) {
  const char* op = "qlib::fake_quant_backward";
  check_fake_quant_backward_args(op, grad, x, quant_min, quant_max);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const AffineArgs a = prepare(op, "x", x, scale, zero_point, quant_min, quant_max);
  const at::Tensor g = grad.contiguous();
  at::Tensor grad_x = at::empty_like(a.x);
  const bool per_element = scale_grad || zero_point_grad;
  const auto fopts = a.x.options().dtype(at::kFloat);
  at::Tensor ds = per_element ? at::empty(a.x.sizes(), fopts) : at::Tensor();
  at::Tensor dz = per_element ? at::empty(a.x.sizes(), fopts) : at::Tensor();
  const int64_t n = a.x.numel();
  if (n > 0) {
    const auto p = kernel_qparams(a);
    const auto stream = at::cuda::getCurrentCUDAStream();
    QLIB_DISPATCH_FLOAT(a.x.scalar_type(), "fake_quant_backward_cuda", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
      scalar_t* gxp = grad_x.data_ptr<scalar_t>();
      float* dsp = per_element ? ds.data_ptr<float>() : nullptr;
      float* dzp = per_element ? dz.data_ptr<float>() : nullptr;
      if (a.per_tensor) {
        fake_quant_backward_kernel<scalar_t, ScaleLookup::kTensor>
            <<<blocks_for(n), kThreads, 0, stream>>>(gp, xp, gxp, dsp, dzp, n, p);
      } else {
        fake_quant_backward_kernel<scalar_t, ScaleLookup::kElement>
            <<<blocks_for(n), kThreads, 0, stream>>>(gp, xp, gxp, dsp, dzp, n, p);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return finish_fake_quant_backward(grad_x, ds, dz, scale, zero_point, scale_grad,
                                    zero_point_grad);
}

// ---------------------------------------------------------------- quantize / dequantize
template <class X, class Q>
__global__ void quantize_kernel(const X* __restrict__ x, Q* __restrict__ q, int64_t n,
                                KernelQParams p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = p.layout.scale_index(i);
    const float code = quantize_code<ScalarMath>(static_cast<float>(x[i]), 1.0f / p.scale[s],
                                                 p.zero_point[s], p.qmin, p.qmax);
    q[i] = static_cast<Q>(code != code ? p.zero_point[s] : code);  // NaN -> zero_point
  }
}

template <class Q, class Y>
__global__ void dequantize_kernel(const Q* __restrict__ q, Y* __restrict__ y, int64_t n,
                                  KernelQParams p) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t s = p.layout.scale_index(i);
    y[i] = static_cast<Y>(dequantize_code(static_cast<float>(q[i]), p.scale[s], p.zero_point[s]));
  }
}

at::Tensor quantize_cuda(const at::Tensor& x, const at::Tensor& scale,
                         const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
                         at::ScalarType dtype) {
  const char* op = "qlib::quantize";
  check_quantize_args(op, x, dtype, quant_min, quant_max);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const AffineArgs a = prepare(op, "x", x, scale, zero_point, quant_min, quant_max);
  at::Tensor out = at::empty(a.x.sizes(), a.x.options().dtype(dtype));
  const int64_t n = a.x.numel();
  if (n == 0) return out;
  const auto p = kernel_qparams(a);
  const auto stream = at::cuda::getCurrentCUDAStream();
  QLIB_DISPATCH_FLOAT(a.x.scalar_type(), "quantize_cuda", [&] {
    using x_t = scalar_t;
    QLIB_DISPATCH_QINT(dtype, "quantize_cuda", [&] {
      quantize_kernel<<<blocks_for(n), kThreads, 0, stream>>>(a.x.const_data_ptr<x_t>(),
                                                              out.data_ptr<scalar_t>(), n, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor dequantize_cuda(const at::Tensor& q, const at::Tensor& scale,
                           const at::Tensor& zero_point, at::ScalarType dtype) {
  const char* op = "qlib::dequantize";
  const auto [quant_min, quant_max] = check_dequantize_args(op, q, dtype);
  const c10::cuda::OptionalCUDAGuard guard(q.device());
  const AffineArgs a = prepare(op, "q", q, scale, zero_point, quant_min, quant_max);
  at::Tensor out = at::empty(a.x.sizes(), a.x.options().dtype(dtype));
  const int64_t n = a.x.numel();
  if (n == 0) return out;
  const auto p = kernel_qparams(a);
  const auto stream = at::cuda::getCurrentCUDAStream();
  QLIB_DISPATCH_QINT(a.x.scalar_type(), "dequantize_cuda", [&] {
    using q_t = scalar_t;
    QLIB_DISPATCH_FLOAT(dtype, "dequantize_cuda", [&] {
      dequantize_kernel<<<blocks_for(n), kThreads, 0, stream>>>(a.x.const_data_ptr<q_t>(),
                                                                out.data_ptr<scalar_t>(), n, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// ---------------------------------------------------------------- choose_qparams
__global__ void choose_qparams_kernel(const float* __restrict__ lo, const float* __restrict__ hi,
                                      float* __restrict__ scale, int32_t* __restrict__ zp,
                                      int64_t n, int64_t qmin, int64_t qmax, bool symmetric,
                                      float eps) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const QParams p = choose_qparams_value(lo[i], hi[i], qmin, qmax, symmetric, eps);
    scale[i] = p.scale;
    zp[i] = p.zero_point;
  }
}

std::tuple<at::Tensor, at::Tensor> choose_qparams_cuda(const at::Tensor& min,
                                                       const at::Tensor& max, int64_t quant_min,
                                                       int64_t quant_max, bool symmetric,
                                                       double eps) {
  const c10::cuda::OptionalCUDAGuard guard(min.device());
  check_choose_qparams_args(min, max, quant_min, quant_max, eps,
                            cuda_value_checks() && !capturing());
  const at::Tensor lo = min.to(at::kFloat).contiguous();
  const at::Tensor hi = max.to(at::kFloat).contiguous();
  at::Tensor scale = at::empty(lo.sizes(), lo.options());
  at::Tensor zp = at::empty(lo.sizes(), lo.options().dtype(at::kInt));
  const int64_t n = lo.numel();
  if (n == 0) return {scale, zp};
  choose_qparams_kernel<<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      lo.const_data_ptr<float>(), hi.const_data_ptr<float>(), scale.data_ptr<float>(),
      zp.data_ptr<int32_t>(), n, quant_min, quant_max, symmetric, static_cast<float>(eps));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scale, zp};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, CUDA, m) {
  m.impl("fake_quant", &fake_quant_cuda);
  m.impl("fake_quant_backward", &fake_quant_backward_cuda);
  m.impl("quantize", &quantize_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("choose_qparams", &choose_qparams_cuda);
}

}  // namespace qlib
