// CUDA kernels of the observer ops: block min/max, histogram accumulation
// (exact re-binning when the range grows, all on device), re-binning,
// quantiles, and the MSE and entropy (KL) searches over histograms. The
// formulas are quant_math.h's; reductions use CUB. Observing a batch makes no
// host sync: ranges, grids and counts stay on the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/cub.cuh>

#include "affine.h"
#include "capture.cuh"
#include "observer.h"
#include "quant_math.h"

namespace qlib {
namespace {

// The histogram ops read their inputs' values back to check them (a host
// sync) only under qlib.set_cuda_value_checks(True) and outside graph capture;
// otherwise a corrupt range row is treated as an empty one (histogram_grid).
HistogramValues cuda_value_checks_now() {
  return cuda_value_checks() && !capturing() ? HistogramValues::kAll : HistogramValues::kNone;
}

constexpr int kThreads = 256;
constexpr int kItemsPerThread = 16;  // elements per thread per chunk
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kItemsPerThread;

// Chunks each row of K elements is split into, so that about 4 blocks per SM
// run in all. (Many short rows, e.g. small per-group blocks, get one
// 256-thread block each: correct, but not the fastest layout for them.)
int64_t chunks_per_row(int64_t R, int64_t K) {
  TORCH_CHECK(R <= std::numeric_limits<int32_t>::max(), "qlib observers: ", R,
              " blocks (rows) are more than one CUDA grid holds");
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, (sms * 4 + R - 1) / R);
  const int64_t need = std::max<int64_t>(1, (K + kChunk - 1) / kChunk);
  return std::min(want, need);
}

struct MinMaxCnt {
  float lo, hi;
  unsigned long long bad;
};

struct MinMaxCntOp {
  __device__ MinMaxCnt operator()(const MinMaxCnt& a, const MinMaxCnt& b) const {
    return {fminf(a.lo, b.lo), fmaxf(a.hi, b.hi), a.bad + b.bad};
  }
};

// Phase 1: block (c, r) reduces its part of row r to partial[r * C + c].
template <class T>
__global__ void minmax_partial_kernel(const T* __restrict__ x, int64_t K, int64_t C,
                                      MinMaxCnt* __restrict__ partial) {
  const int64_t r = blockIdx.x / C;
  const int64_t c = blockIdx.x % C;
  const T* row = x + r * K;
  MinMaxCnt m{INFINITY, -INFINITY, 0ull};
  for (int64_t k = c * kThreads + threadIdx.x; k < K; k += C * kThreads) {
    const float v = static_cast<float>(row[k]);
    if (isfinite(v)) {
      m.lo = fminf(m.lo, v);
      m.hi = fmaxf(m.hi, v);
    } else {
      ++m.bad;
    }
  }
  using Reduce = cub::BlockReduce<MinMaxCnt, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const MinMaxCnt total = Reduce(tmp).Reduce(m, MinMaxCntOp());
  if (threadIdx.x == 0) partial[r * C + c] = total;
}

// Phase 2, what happens to row r's totals m: block_minmax writes the row's
// min/max and adds its NaN/Inf count ...
struct WriteMinMax {
  float* lo;
  float* hi;
  unsigned long long* nonfinite;
  __device__ void operator()(int64_t r, const MinMaxCnt& m) const {
    lo[r] = m.lo;
    hi[r] = m.hi;
    if (m.bad) atomicAdd(nonfinite, m.bad);
  }
};

// ... minmax_observe folds them into the observer's statistics (update_minmax)
// and counters, in place.
struct UpdateObserver {
  float* min_val;
  float* max_val;
  unsigned long long* observed;
  unsigned long long* nonfinite;
  int64_t K;
  float averaging_constant;
  __device__ void operator()(int64_t r, const MinMaxCnt& m) const {
    update_minmax(min_val[r], max_val[r], m.lo, m.hi, averaging_constant);
    atomicAdd(observed, static_cast<unsigned long long>(K) - m.bad);
    if (m.bad) atomicAdd(nonfinite, m.bad);
  }
};

// Phase 2: one thread per row folds the C partials and hands them to `finish`.
template <class Finish>
__global__ void minmax_final_kernel(const MinMaxCnt* __restrict__ partial, int64_t R, int64_t C,
                                    Finish finish) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= R) return;
  MinMaxCnt m{INFINITY, -INFINITY, 0ull};
  for (int64_t c = 0; c < C; ++c) m = MinMaxCntOp()(m, partial[r * C + c]);
  finish(r, m);
}

// Per-row finite min, max and NaN/Inf count of x [R, K], handed to `finish`
// (WriteMinMax, UpdateObserver). All on the current stream.
template <class T, class Finish>
void launch_minmax(const at::Tensor& x, const Finish& finish) {
  const int64_t R = x.size(0), K = x.size(1);
  const int64_t C = chunks_per_row(R, K);
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partial =
      at::empty({R * C * static_cast<int64_t>(sizeof(MinMaxCnt))}, x.options().dtype(at::kByte));
  auto* pp = reinterpret_cast<MinMaxCnt*>(partial.data_ptr());
  minmax_partial_kernel<T><<<R * C, kThreads, 0, stream>>>(x.const_data_ptr<T>(), K, C, pp);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  minmax_final_kernel<<<(R + kThreads - 1) / kThreads, kThreads, 0, stream>>>(pp, R, C, finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned long long* as_counter(const at::Tensor& t) {
  return reinterpret_cast<unsigned long long*>(t.data_ptr<int64_t>());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_minmax_cuda(const at::Tensor& x_in) {
  check_observer_input("qlib::block_minmax", x_in);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t R = x.size(0);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor lo = at::full({R}, INFINITY, fopts), hi = at::full({R}, -INFINITY, fopts);
  at::Tensor nonfinite = at::zeros({}, x.options().dtype(at::kLong));
  if (R == 0 || x.size(1) == 0) return {lo, hi, nonfinite};
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "block_minmax_cuda", [&] {
    launch_minmax<scalar_t>(
        x, WriteMinMax{lo.data_ptr<float>(), hi.data_ptr<float>(), as_counter(nonfinite)});
  });
  return {lo, hi, nonfinite};
}

void minmax_observe_cuda(const at::Tensor& x_in, const at::Tensor& min_val,
                         const at::Tensor& max_val, const at::Tensor& observed,
                         const at::Tensor& nonfinite, std::optional<double> averaging_constant) {
  const float c = check_minmax_observe_args("qlib::minmax_observe", x_in, min_val, max_val,
                                            observed, nonfinite, averaging_constant);
  const c10::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  if (x.size(0) == 0 || x.size(1) == 0) return;
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "minmax_observe_cuda", [&] {
    launch_minmax<scalar_t>(
        x, UpdateObserver{min_val.data_ptr<float>(), max_val.data_ptr<float>(),
                          as_counter(observed), as_counter(nonfinite), x.size(1), c});
  });
}

// New range = old range united with the batch's (absolute: [0, max |x|]).
__global__ void update_range_kernel(const double* __restrict__ old_range,
                                    const float* __restrict__ blo, const float* __restrict__ bhi,
                                    int64_t R, bool absolute, double* __restrict__ new_range) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= R) return;
  double lo = blo[r], hi = bhi[r];
  if (absolute && lo <= hi) {
    hi = fmax(fabs(lo), fabs(hi));
    lo = 0.0;
  }
  new_range[2 * r] = fmin(old_range[2 * r], lo);
  new_range[2 * r + 1] = fmax(old_range[2 * r + 1], hi);
}

// Adds each non-empty old bin (grid of old_range) into its bin on the grid of
// new_range: exact, as the new grid coarsens the old one.
__global__ void rebin_kernel(const int64_t* __restrict__ old_hist,
                             const double* __restrict__ old_range,
                             const double* __restrict__ new_range, int64_t R, int64_t B,
                             int64_t* __restrict__ out) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= R * B) return;
  const int64_t r = idx / B, j = idx % B;
  const int64_t count = old_hist[idx];
  if (count == 0) return;
  const HistGrid og = histogram_grid(old_range[2 * r], old_range[2 * r + 1], B);
  if (j >= og.used) return;
  const HistGrid g = histogram_grid(new_range[2 * r], new_range[2 * r + 1], B);
  const double left = og.lo + static_cast<double>(j) * og.width;
  atomicAdd(reinterpret_cast<unsigned long long*>(out + r * B + histogram_bin(fmax(left, g.lo), g, B)),
            static_cast<unsigned long long>(count));
}

void launch_rebin(const at::Tensor& hist, const at::Tensor& range, const at::Tensor& new_range,
                  at::Tensor& out) {
  const int64_t n = hist.numel();
  if (n == 0) return;
  rebin_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      hist.const_data_ptr<int64_t>(), range.const_data_ptr<double>(),
      new_range.const_data_ptr<double>(), hist.size(0), hist.size(1), out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Block (c, r) bins its part of row r into a shared histogram (when it fits),
// then adds it into the row's global histogram.
template <class T, bool kShared>
__global__ void accumulate_kernel(const T* __restrict__ x, int64_t K, int64_t C, int64_t B,
                                  const double* __restrict__ range, bool absolute,
                                  int64_t* __restrict__ hist) {
  extern __shared__ unsigned long long smem[];
  const int64_t r = blockIdx.x / C;
  const int64_t c = blockIdx.x % C;
  const HistGrid g = histogram_grid(range[2 * r], range[2 * r + 1], B);
  if (g.used == 0) return;
  unsigned long long* gh = reinterpret_cast<unsigned long long*>(hist + r * B);
  if constexpr (kShared) {
    for (int64_t j = threadIdx.x; j < B; j += blockDim.x) smem[j] = 0ull;
    __syncthreads();
  }
  const T* row = x + r * K;
  for (int64_t k = c * kThreads + threadIdx.x; k < K; k += C * kThreads) {
    const float v = static_cast<float>(row[k]);
    if (!isfinite(v)) continue;
    const double d = absolute ? fabs(static_cast<double>(v)) : static_cast<double>(v);
    const int64_t j = histogram_bin(d, g, B);
    if constexpr (kShared) {
      atomicAdd(smem + j, 1ull);
    } else {
      atomicAdd(gh + j, 1ull);
    }
  }
  if constexpr (kShared) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
      if (smem[j]) atomicAdd(gh + j, smem[j]);
    }
  }
}

constexpr int64_t kMaxSharedBins = 6144;  // 48 KiB of 64-bit counts

// histogram_observe of op (its checks' name): new (hist, range, nonfinite count).
std::tuple<at::Tensor, at::Tensor, at::Tensor> observe_histogram(const char* op,
                                                                 const at::Tensor& x_in,
                                                                 const at::Tensor& hist_in,
                                                                 const at::Tensor& range_in,
                                                                 bool absolute) {
  const at::OptionalDeviceGuard guard(x_in.device());  // before cuda_value_checks_now()
  check_histogram_observe_args(op, x_in, hist_in, range_in, cuda_value_checks_now());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor hist = hist_in.contiguous();
  const at::Tensor range = range_in.contiguous();
  const int64_t R = x.size(0), K = x.size(1), B = hist.size(1);
  at::Tensor new_hist = at::zeros_like(hist);
  at::Tensor new_range = range.clone();
  at::Tensor nonfinite = at::zeros({}, x.options().dtype(at::kLong));
  if (R == 0 || K == 0) return {hist.clone(), new_range, nonfinite};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor blo = at::empty({R}, fopts), bhi = at::empty({R}, fopts);
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "histogram_observe_cuda", [&] {
    launch_minmax<scalar_t>(
        x, WriteMinMax{blo.data_ptr<float>(), bhi.data_ptr<float>(), as_counter(nonfinite)});
    update_range_kernel<<<(R + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        range.const_data_ptr<double>(), blo.const_data_ptr<float>(), bhi.const_data_ptr<float>(),
        R, absolute, new_range.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_rebin(hist, range, new_range, new_hist);
    const int64_t C = chunks_per_row(R, K);
    if (B <= kMaxSharedBins) {
      accumulate_kernel<scalar_t, true>
          <<<R * C, kThreads, B * sizeof(unsigned long long), stream>>>(
              x.const_data_ptr<scalar_t>(), K, C, B, new_range.const_data_ptr<double>(), absolute,
              new_hist.data_ptr<int64_t>());
    } else {
      accumulate_kernel<scalar_t, false><<<R * C, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), K, C, B, new_range.const_data_ptr<double>(), absolute,
          new_hist.data_ptr<int64_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {new_hist, new_range, nonfinite};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> histogram_observe_cuda(const at::Tensor& x,
                                                                      const at::Tensor& hist,
                                                                      const at::Tensor& range,
                                                                      bool absolute) {
  return observe_histogram("qlib::histogram_observe", x, hist, range, absolute);
}

// The functional op's results copied back (the CPU's in-place saving is its own: there a
// per-channel histogram is a new allocation and passes each step).
void histogram_observe_in_place_cuda(const at::Tensor& x, const at::Tensor& hist,
                                     const at::Tensor& range, const at::Tensor& observed,
                                     const at::Tensor& nonfinite, bool absolute) {
  const char* op = "qlib::histogram_observe_in_place";
  check_observer_counters(op, x, observed, nonfinite);
  const auto [new_hist, new_range, bad] = observe_histogram(op, x, hist, range, absolute);
  hist.copy_(new_hist);
  range.copy_(new_range);
  observed.sub_(bad).add_(x.numel());
  nonfinite.add_(bad);
}

at::Tensor histogram_rebin_cuda(const at::Tensor& hist_in, const at::Tensor& range_in,
                                const at::Tensor& new_range_in) {
  const char* op = "qlib::histogram_rebin";
  const at::OptionalDeviceGuard guard(hist_in.device());  // before cuda_value_checks_now()
  check_histogram(op, hist_in, range_in, cuda_value_checks_now());
  check_histogram(op, hist_in, new_range_in, cuda_value_checks_now(), "new_range");
  // (That new_range contains range is checked on the CPU only: reading it here
  // would sync; bins outside new_range clamp to its edge bins.)
  const at::Tensor hist = hist_in.contiguous(), range = range_in.contiguous(),
                   new_range = new_range_in.contiguous();
  at::Tensor out = at::zeros_like(hist);
  launch_rebin(hist, range, new_range, out);
  return out;
}

__global__ void quantile_kernel(const int64_t* __restrict__ hist, const double* __restrict__ range,
                                int64_t R, int64_t B, double q, float* __restrict__ out) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= R) return;
  const HistGrid g = histogram_grid(range[2 * r], range[2 * r + 1], B);
  out[r] = static_cast<float>(
      histogram_quantile_value(hist + r * B, g, range[2 * r], range[2 * r + 1], q));
}

at::Tensor histogram_quantile_cuda(const at::Tensor& hist_in, const at::Tensor& range_in,
                                   double q) {
  const char* op = "qlib::histogram_quantile";
  const at::OptionalDeviceGuard guard(hist_in.device());  // before cuda_value_checks_now()
  check_histogram(op, hist_in, range_in, cuda_value_checks_now());
  check_quantile(op, q);
  const at::Tensor hist = hist_in.contiguous(), range = range_in.contiguous();
  const int64_t R = hist.size(0), B = hist.size(1);
  at::Tensor out = at::empty({R}, hist.options().dtype(at::kFloat));
  if (R == 0) return out;
  quantile_kernel<<<(R + kThreads - 1) / kThreads, kThreads, 0,
                    at::cuda::getCurrentCUDAStream()>>>(hist.const_data_ptr<int64_t>(),
                                                        range.const_data_ptr<double>(), R, B, q,
                                                        out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// (score, index) with the smaller score winning; ties go to the larger index
// (the wider clipping range), as on the CPU.
struct Scored {
  double score;
  int64_t index;
};

struct ScoredMin {
  __device__ Scored operator()(const Scored& a, const Scored& b) const {
    if (a.score < b.score) return a;
    if (b.score < a.score) return b;
    return a.index >= b.index ? a : b;
  }
};

constexpr int kSearchThreads = 256;

// One block per row; each thread scores candidates c = tid + 1, tid + 1 +
// blockDim, ... over all the bins of the row.
__global__ void mse_search_kernel(const int64_t* __restrict__ hist,
                                  const double* __restrict__ range, int64_t B, int64_t qmin,
                                  int64_t qmax, bool symmetric, int64_t n,
                                  float* __restrict__ lo, float* __restrict__ hi) {
  const int64_t r = blockIdx.x;
  const double umin = range[2 * r], umax = range[2 * r + 1];
  const HistGrid g = histogram_grid(umin, umax, B);
  Scored best{INFINITY, -1};
  for (int64_t c = threadIdx.x + 1; c <= n; c += blockDim.x) {
    float clo, chi;
    mse_candidate_range(umin, umax, symmetric, c, n, &clo, &chi);
    const double sse = g.used == 0 ? 0.0
                                   : histogram_fake_quant_sse(hist + r * B, g, umin, umax, clo,
                                                              chi, qmin, qmax, symmetric);
    // NaN scores (no float32 scale for the range) never win.
    best = ScoredMin()(best, Scored{sse == sse ? sse : INFINITY, c});
  }
  using Reduce = cub::BlockReduce<Scored, kSearchThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const Scored top = Reduce(tmp).Reduce(best, ScoredMin());
  if (threadIdx.x == 0) {
    float clo = 0.0f, chi = 0.0f;
    if (top.index > 0 && top.score < INFINITY) {
      mse_candidate_range(umin, umax, symmetric, top.index, n, &clo, &chi);
    }
    lo[r] = clo;
    hi[r] = chi;
  }
}

std::tuple<at::Tensor, at::Tensor> histogram_mse_search_cuda(const at::Tensor& hist_in,
                                                             const at::Tensor& range_in,
                                                             int64_t quant_min,
                                                             int64_t quant_max, bool symmetric,
                                                             int64_t num_candidates) {
  const char* op = "qlib::histogram_mse_search";
  const at::OptionalDeviceGuard guard(hist_in.device());  // before cuda_value_checks_now()
  check_histogram(op, hist_in, range_in, cuda_value_checks_now());
  check_mse_args(op, quant_min, quant_max, num_candidates);
  const at::Tensor hist = hist_in.contiguous(), range = range_in.contiguous();
  const int64_t R = hist.size(0), B = hist.size(1);
  const auto fopts = hist.options().dtype(at::kFloat);
  at::Tensor lo = at::empty({R}, fopts), hi = at::empty({R}, fopts);
  if (R == 0) return {lo, hi};
  TORCH_CHECK(R <= 2147483647, op, ": too many blocks: ", R);
  mse_search_kernel<<<R, kSearchThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      hist.const_data_ptr<int64_t>(), range.const_data_ptr<double>(), B, quant_min, quant_max,
      symmetric, num_candidates, lo.data_ptr<float>(), hi.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {lo, hi};
}

// One block per row: thread 0 writes the prefix sums into scratch, then the
// threads score the windows i = start + tid, start + tid + blockDim, ...
__global__ void entropy_search_kernel(const int64_t* __restrict__ hist,
                                      const double* __restrict__ range, int64_t B,
                                      int64_t levels, double* __restrict__ scratch,
                                      float* __restrict__ lo, float* __restrict__ hi) {
  const int64_t r = blockIdx.x;
  const double umin = range[2 * r], umax = range[2 * r + 1];
  const HistGrid g = histogram_grid(umin, umax, B);
  const int64_t* h = hist + r * B;
  double* cnt = scratch + r * 3 * (B + 1);
  double* nz = cnt + (B + 1);
  double* hl = nz + (B + 1);
  if (g.used == 0) {
    if (threadIdx.x == 0) lo[r] = hi[r] = 0.0f;
    return;
  }
  if (threadIdx.x == 0) entropy_prefix(h, g.used, cnt, nz, hl);
  __syncthreads();
  const int64_t z = histogram_zero_edge(g);
  const int64_t start = levels < g.used ? levels : g.used;
  Scored best{INFINITY, -1};
  for (int64_t i = start + threadIdx.x; i <= g.used; i += blockDim.x) {
    const int64_t s = entropy_window_start(g.used, i, z);
    const double kl = entropy_candidate_kl(h, cnt, nz, hl, g.used, s, i, levels);
    // NaN scores (negative counts, unchecked without value checks) never win, as in the MSE search.
    best = ScoredMin()(best, Scored{kl == kl ? kl : INFINITY, i});
  }
  using Reduce = cub::BlockReduce<Scored, kSearchThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const Scored top = Reduce(tmp).Reduce(best, ScoredMin());
  if (threadIdx.x == 0) {
    const int64_t i = top.index > 0 ? top.index : g.used;
    const int64_t s = entropy_window_start(g.used, i, z);
    lo[r] = static_cast<float>(fmax(umin, g.lo + static_cast<double>(s) * g.width));
    hi[r] = static_cast<float>(fmin(umax, g.lo + static_cast<double>(s + i) * g.width));
  }
}

std::tuple<at::Tensor, at::Tensor> histogram_entropy_search_cuda(const at::Tensor& hist_in,
                                                                 const at::Tensor& range_in,
                                                                 int64_t num_levels) {
  const char* op = "qlib::histogram_entropy_search";
  const at::OptionalDeviceGuard guard(hist_in.device());  // before cuda_value_checks_now()
  check_histogram(op, hist_in, range_in, cuda_value_checks_now());
  check_entropy_args(op, num_levels);
  const at::Tensor hist = hist_in.contiguous(), range = range_in.contiguous();
  const int64_t R = hist.size(0), B = hist.size(1);
  const auto fopts = hist.options().dtype(at::kFloat);
  at::Tensor lo = at::empty({R}, fopts), hi = at::empty({R}, fopts);
  if (R == 0) return {lo, hi};
  TORCH_CHECK(R <= 2147483647, op, ": too many blocks: ", R);
  at::Tensor scratch = at::empty({R, 3, B + 1}, hist.options().dtype(at::kDouble));
  entropy_search_kernel<<<R, kSearchThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      hist.const_data_ptr<int64_t>(), range.const_data_ptr<double>(), B, num_levels,
      scratch.data_ptr<double>(), lo.data_ptr<float>(), hi.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {lo, hi};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, CUDA, m) {
  m.impl("block_minmax", &block_minmax_cuda);
  m.impl("minmax_observe", &minmax_observe_cuda);
  m.impl("histogram_observe", &histogram_observe_cuda);
  m.impl("histogram_observe_in_place", &histogram_observe_in_place_cuda);
  m.impl("histogram_rebin", &histogram_rebin_cuda);
  m.impl("histogram_quantile", &histogram_quantile_cuda);
  m.impl("histogram_mse_search", &histogram_mse_search_cuda);
  m.impl("histogram_entropy_search", &histogram_entropy_search_cuda);
}

}  // namespace qlib
