// CPU kernels of the affine ops: fake_quant (forward and backward),
// quantize, dequantize, choose_qparams. at::vec for SIMD, at::parallel_for
// for threads; the formulas come from quant_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "affine.h"
#include "cpu_output.h"
#include "cpu_vec.h"
#include "quant_math.h"

namespace qlib {
namespace {

// Calls f(begin, end, scale_offset) for maximal runs of x (contiguous) that
// share one scale (layout.inner_steps_scale false) or step through
// consecutive scales from scale_offset (true), in parallel (chunks of at least grain).
template <class F>
void for_each_run(const BlockLayout& layout, int64_t numel, const F& f, int64_t grain = kGrain) {
  at::parallel_for(0, numel, grain, [&](int64_t begin, int64_t end) {
    int64_t pos = begin;
    while (pos < end) {
      const int64_t run_end = std::min(end, (pos / layout.inner_run + 1) * layout.inner_run);
      f(pos, run_end, layout.scale_index(pos));
      pos = run_end;
    }
  });
}

// Scale, 1/scale and zero point of up to kVec lanes.
struct LaneQParams {
  Vec scale, inv_scale, zero_point;
};

// for_each_run, calling f(begin, end, s0, qp_at) where qp_at(lane, n) gives the
// qparams of the n <= kVec elements `lane` elements into the run. A run that
// shares one scale gets a constant qp_at: no per-vector division or loads.
template <class F>
void for_each_run_qparams(const AffineArgs& a, const F& f, int64_t grain = kGrain) {
  const float* sp = a.scale.const_data_ptr<float>();
  const float* zp = a.zero_point.const_data_ptr<float>();
  const bool steps = a.layout.inner_steps_scale;
  for_each_run(a.layout, a.x.numel(), [&](int64_t b, int64_t e, int64_t s0) {
    if (!steps) {
      // Broadcast from floats at each call: a captured LaneQParams was copied through
      // the stack in 16-byte halves every vector (a store-forwarding stall) in some loops.
      f(b, e, s0, [s = sp[s0], inv = 1.0f / sp[s0], z = zp[s0]](int64_t, int64_t) {
        return LaneQParams{Vec(s), Vec(inv), Vec(z)};
      });
      return;
    }
    f(b, e, s0, [s = sp + s0, z = zp + s0](int64_t lane, int64_t n) {
      // Padding lanes get scale 1 so 1/scale stays finite.
      const Vec sv = n == kVec ? Vec::loadu(s + lane)
                               : Vec::set(Vec(1.0f), Vec::loadu(s + lane, n), n);
      return LaneQParams{sv, Vec(1.0f) / sv, Vec::loadu(z + lane, n)};
    });
  }, grain);
}

// Calls step(i, count) over [0, n) in chunks of C: the full chunks with count a
// compile-time C (so the count checks in step fold away), then the tail.
template <int64_t C, class Step>
__attribute__((always_inline)) inline void for_each_chunk(int64_t n, const Step& step) {
  int64_t i = 0;
#pragma GCC unroll 4
  for (; i + C <= n; i += C) step(i, std::integral_constant<int64_t, C>{});
  if (i < n) step(i, n - i);
}

// Writes y[0, n) (a run) as T, kChunk<T> elements per store; value_at(j, count) gives the
// floats of the count <= kVec elements from j. (__restrict: a store through y may
// otherwise alias the qparams and force a reload per vector.)
template <class T, class ValueAt>
void store_run(T* __restrict y, int64_t n, const ValueAt& value_at) {
  for_each_chunk<kChunk<T>>(n, [&](int64_t i, auto c) __attribute__((always_inline)) {
    Vec v[2] = {Vec(0.0f), Vec(0.0f)};
    for (int64_t h = 0; h * kVec < c; ++h)
      v[h] = value_at(i + h * kVec, std::min<int64_t>(kVec, c - h * kVec));
    store_chunk(y + i, v, c);
  });
}

// fake_quant of the prepared a into out, and its STE mask into mask where defined (both laid
// out as a.x).
void fake_quant_cpu_into(const AffineArgs& a, at::Tensor& out, const at::Tensor& mask) {
  const Vec qmin(a.qmin), qmax(a.qmax);
  const auto run = [&](auto with_mask) {
    QLIB_DISPATCH_FLOAT(a.x.scalar_type(), "fake_quant_cpu", [&] {
      const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
      scalar_t* yp = out.data_ptr<scalar_t>();
      bool* mp = with_mask ? mask.data_ptr<bool>() : nullptr;
      for_each_run_qparams(a, [&](int64_t b, int64_t e, int64_t, const auto& qp_at) {
        const scalar_t* __restrict x = xp + b;
        // (Locals of the run: the mask's store may alias what a capture points to, which would
        // be reloaded every vector.)
        bool* __restrict m = mp + b;
        const Vec lo = qmin, hi = qmax;
        store_run(yp + b, e - b, [&](int64_t j, int64_t n) {
          const LaneQParams p = qp_at(j, n);
          const Vec v = load_float(x + j, n);
          if constexpr (decltype(with_mask)::value) {
            const auto r =
                fake_quant_value_and_mask<VecMath>(v, p.scale, p.inv_scale, p.zero_point, lo, hi);
            store_mask(m + j, r.inside, n);
            return r.value;
          } else {
            return fake_quant_value<VecMath>(v, p.scale, p.inv_scale, p.zero_point, lo, hi);
          }
        });
      });
    });
  };
  if (mask.defined()) run(std::true_type{});
  else run(std::false_type{});
}

// fake_quant (op names it), and its mask when with_mask (else undefined).
std::tuple<at::Tensor, at::Tensor> fake_quant_cpu_outputs(
    const char* op, const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
    int64_t quant_min, int64_t quant_max, bool with_mask) {
  check_fake_quant_input(op, x);
  check_quant_range(op, quant_min, quant_max);
  const AffineArgs a = prepare_affine(op, "x", x, scale, zero_point, quant_min, quant_max);
  at::Tensor out = a.empty_like_x(a.x.options());
  at::Tensor mask = with_mask ? a.empty_like_x(a.x.options().dtype(at::kBool)) : at::Tensor();
  fake_quant_cpu_into(a, out, mask);
  return {a.in_given_order(out), with_mask ? a.in_given_order(mask) : mask};
}

at::Tensor fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale,
                          const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max) {
  return std::get<0>(fake_quant_cpu_outputs("qlib::fake_quant", x, scale, zero_point, quant_min,
                                            quant_max, false));
}

std::tuple<at::Tensor, at::Tensor> fake_quant_with_mask_cpu(const at::Tensor& x,
                                                            const at::Tensor& scale,
                                                            const at::Tensor& zero_point,
                                                            int64_t quant_min, int64_t quant_max) {
  return fake_quant_cpu_outputs("qlib::fake_quant_with_mask", x, scale, zero_point, quant_min,
                                quant_max, true);
}

// grad * mask (the mask as 0.0f / 1.0f: a NaN grad stays NaN where masked, as torch's
// *_cachemask backward), in mask's layout.
at::Tensor fake_quant_mask_backward_cpu(const at::Tensor& grad, const at::Tensor& mask) {
  const MaskBackwardArgs a = prepare_fake_quant_mask_backward(grad, mask);
  const at::Tensor &g = a.grad, &m = a.mask, &out = a.out;
  advise_huge_pages(out.data_ptr(), out.nbytes());
  QLIB_DISPATCH_FLOAT(g.scalar_type(), "fake_quant_mask_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const bool* mp = m.const_data_ptr<bool>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t b, int64_t e) {
      for_each_chunk<kChunk<scalar_t>>(e - b, [&](int64_t i, auto c) __attribute__((always_inline)) {
        Vec v[2];
        load_chunk(gp + b + i, c, v);
        for (int64_t h = 0; h * kVec < c; ++h)
          v[h] = v[h] * load_mask(mp + b + i + h * kVec, std::min<int64_t>(kVec, c - h * kVec));
        store_chunk(outp + b + i, v, c);
      });
    });
  });
  return out;
}

// The LSQ gradients' sums per block go to a thread's double rows ds and dz.
// Adds the first n lanes of gs and gz to ds[0, n) and dz[0, n) (a run that steps
// through the scales: each lane its own block).
inline void add_lanes(double* ds, double* dz, const Vec& gs, const Vec& gz, int64_t n) {
  float ts[kVec], tz[kVec];
  gs.store(ts, n);
  gz.store(tz, n);
  for (int64_t l = 0; l < n; ++l) {
    ds[l] += ts[l];
    dz[l] += tz[l];
  }
}

// Adds every lane of gs to *ds and of gz to *dz (a run with one scale: its float
// partial sums, moved to double every few vectors). Vecs by value: a Vec whose
// address is taken stays in memory, as __m256 may alias any store.
inline void add_all_lanes(double* ds, double* dz, Vec gs, Vec gz) {
  float ts[kVec], tz[kVec];
  gs.store(ts);
  gz.store(tz);
  double s = 0.0, z = 0.0;
  for (int64_t l = 0; l < kVec; ++l) {
    s += ts[l];
    z += tz[l];
  }
  *ds += s;
  *dz += z;
}

// Block `which` (0: scale, 1: zero point) of the threads' LSQ partial sums [threads, 2, S],
// added up in a plain loop into an [S] tensor of like's dtype (what sum(0), a select and a
// cast gave, without their ~10 us of op calls on a small tensor).
at::Tensor thread_totals(const double* sums, int64_t threads, int64_t S, int64_t which,
                         const at::Tensor& like) {
  at::Tensor out = at::empty({S}, like.options());
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "thread_totals", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < S; ++i) {
      double total = 0.0;
      for (int64_t t = 0; t < threads; ++t) total += sums[(t * 2 + which) * S + i];
      o[i] = static_cast<scalar_t>(total);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max, bool scale_grad,
    bool zero_point_grad) {
  const char* op = "qlib::fake_quant_backward";
  check_fake_quant_backward_args(op, grad, x, zero_point, quant_min, quant_max, zero_point_grad);
  const AffineArgs a = prepare_affine(op, "x", x, scale, zero_point, quant_min, quant_max);
  const at::Tensor g = a.arranged_like_x(grad);
  at::Tensor grad_x = a.empty_like_x(a.x.options());
  // LSQ gradients: per-thread sums over each block, [threads, 2 (scale, zero point), scales].
  // With many scales (small groups, one a value) fewer threads (larger chunks), so that these
  // rows take at most twice a float32 x (or 8 MB).
  const bool lsq = scale_grad || zero_point_grad;
  const int64_t S = a.scale.numel(), numel = a.x.numel(), most = at::get_num_threads();
  const int64_t threads =
      lsq ? std::clamp<int64_t>(std::max<int64_t>(8 * numel, 8 << 20) / (16 * S), 1, most) : most;
  const int64_t grain = threads < most ? std::max(kGrain, (numel + threads - 1) / threads) : kGrain;
  at::Tensor sums =
      lsq ? at::zeros({threads, 2, S}, a.x.options().dtype(at::kDouble)) : at::Tensor();
  double* sums_p = lsq ? sums.data_ptr<double>() : nullptr;
  const bool steps = a.layout.inner_steps_scale;
  const Vec qmin(a.qmin), qmax(a.qmax);
  // lsq as a compile-time constant: without it the LSQ terms are not computed at all.
  const auto run = [&](auto lsq_constant) {
    constexpr bool lsq = decltype(lsq_constant)::value;
    QLIB_DISPATCH_FLOAT(a.x.scalar_type(), "fake_quant_backward_cpu", [&] {
      const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      scalar_t* gxp = grad_x.data_ptr<scalar_t>();
      for_each_run_qparams(a, [&](int64_t b, int64_t e, int64_t s0, const auto& qp_at) {
        const scalar_t* __restrict x = xp + b;
        const scalar_t* __restrict gr = gp + b;
        scalar_t* __restrict gx = gxp + b;
        // A parallel_for run inline (nested in a parallel region) keeps the caller's thread
        // number, which may be past ours: one thread works then, so any row will do.
        const int64_t t = std::min<int64_t>(at::get_thread_num(), threads - 1);
        double* ds = lsq ? sums_p + t * 2 * S + s0 : nullptr;
        double* dz = lsq ? ds + S : nullptr;
        Vec acc_s(0.0f), acc_z(0.0f);  // a one-scale run's float partial sums
        int pending = 0;
        for_each_chunk<kChunk<scalar_t>>(e - b, [&](int64_t i, auto n) __attribute__((always_inline)) {
          Vec gv[2], xv[2], gxv[2] = {Vec(0.0f), Vec(0.0f)};
          load_chunk(gr + i, n, gv);
          load_chunk(x + i, n, xv);
          for (int64_t h = 0; h * kVec < n; ++h) {
            const int64_t nh = std::min<int64_t>(kVec, n - h * kVec), j = i + h * kVec;
            const LaneQParams p = qp_at(j, nh);
            const auto r = fake_quant_grads<VecMath>(gv[h], xv[h], p.scale, p.inv_scale,
                                                     p.zero_point, qmin, qmax);
            gxv[h] = r.grad_x;
            if (lsq && steps) {
              add_lanes(ds + j, dz + j, r.grad_scale, r.grad_zero_point, nh);
            } else if (lsq) {  // lanes past nh (a tail's padding) left out
              acc_s = acc_s + Vec::set(Vec(0.0f), r.grad_scale, nh);
              acc_z = acc_z + Vec::set(Vec(0.0f), r.grad_zero_point, nh);
            }
          }
          store_chunk(gx + i, gxv, n);
          if (lsq && !steps && ++pending == 32) {
            add_all_lanes(ds, dz, acc_s, acc_z);
            acc_s = acc_z = Vec(0.0f);
            pending = 0;
          }
        });
        if (lsq && !steps) add_all_lanes(ds, dz, acc_s, acc_z);
      }, grain);
    });
  };
  if (lsq) run(std::true_type{});
  else run(std::false_type{});
  return fake_quant_backward_outputs(
      a, grad_x, scale_grad ? thread_totals(sums_p, threads, S, 0, scale) : at::Tensor(),
      zero_point_grad ? thread_totals(sums_p, threads, S, 1, zero_point) : at::Tensor(), scale,
      zero_point);
}

// quantize / dequantize: the math in float SIMD (as fake_quant), the integer
// side through cpu_vec.h's code loads and stores.

// Writes the codes of elements [0, n) of a run to out; code_at(k, count) gives
// the offset codes and zero points of the count <= kVec elements from k.
// (__restrict: an int8 store may alias anything, which would reload the qparams
// every vector.)
template <class Q, class CodeAt>
void store_run_codes(Q* __restrict out, int64_t n, const CodeAt& code_at) {
  int64_t k = 0;
  for (; k + 4 * kVec <= n; k += 4 * kVec) {
    Vec v[4], zp[4];
    for (int j = 0; j < 4; ++j) std::tie(v[j], zp[j]) = code_at(k + j * kVec, kVec);
    store_offset_codes(out + k, v, zp);
  }
  for (; k < n; k += kVec) {
    const int64_t count = std::min(kVec, n - k);
    const auto [v, zp] = code_at(k, count);
    float tv[kVec], tz[kVec];
    v.store(tv, count);
    zp.store(tz, count);
    for (int64_t j = 0; j < count; ++j) out[k + j] = offset_to_code<Q>(tv[j], tz[j]);
  }
}

template <class X, class Q>
void quantize_runs(const AffineArgs& a, const X* xp, Q* qp) {
  const Vec qmin(a.qmin), qmax(a.qmax);
  for_each_run_qparams(a, [&](int64_t b, int64_t e, int64_t, const auto& qp_at) {
    const X* __restrict x = xp + b;
    store_run_codes(qp + b, e - b, [&](int64_t k, int64_t n) {
      const LaneQParams p = qp_at(k, n);
      return std::pair{offset_code<VecMath>(load_float(x + k, n), p.inv_scale,
                                            qmin - p.zero_point, qmax - p.zero_point),
                       p.zero_point};
    });
  });
}

template <class Q, class Y>
void dequantize_runs(const AffineArgs& a, const Q* qp, Y* yp) {
  for_each_run_qparams(a, [&](int64_t b, int64_t e, int64_t, const auto& qp_at) {
    const Q* __restrict q = qp + b;
    store_run(yp + b, e - b, [&](int64_t j, int64_t n) {
      const LaneQParams p = qp_at(j, n);
      if constexpr (sizeof(Q) == 4) {
        return codes_minus_zero_point(q + j, p.zero_point, n) * p.scale;
      } else {
        return dequantize_code(load_codes(q + j, n), p.scale, p.zero_point);
      }
    });
  });
}

at::Tensor quantize_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& zero_point,
                        int64_t quant_min, int64_t quant_max, at::ScalarType dtype) {
  const char* op = "qlib::quantize";
  check_quantize_args(op, x, dtype, quant_min, quant_max);
  const AffineArgs a = prepare_affine(op, "x", x, scale, zero_point, quant_min, quant_max);
  at::Tensor out = a.empty_like_x(a.x.options().dtype(dtype));
  QLIB_DISPATCH_FLOAT(a.x.scalar_type(), "quantize_cpu", [&] {
    using x_t = scalar_t;
    QLIB_DISPATCH_QINT(dtype, "quantize_cpu", [&] {
      quantize_runs(a, a.x.const_data_ptr<x_t>(), out.data_ptr<scalar_t>());
    });
  });
  return a.in_given_order(out);
}

at::Tensor dequantize_cpu(const at::Tensor& q, const at::Tensor& scale,
                          const at::Tensor& zero_point, at::ScalarType dtype) {
  const char* op = "qlib::dequantize";
  const auto [quant_min, quant_max] = check_dequantize_args(op, q, dtype);
  const AffineArgs a = prepare_affine(op, "q", q, scale, zero_point, quant_min, quant_max);
  at::Tensor out = a.empty_like_x(a.x.options().dtype(dtype));
  QLIB_DISPATCH_QINT(a.x.scalar_type(), "dequantize_cpu", [&] {
    using q_t = scalar_t;
    QLIB_DISPATCH_FLOAT(dtype, "dequantize_cpu", [&] {
      dequantize_runs(a, a.x.const_data_ptr<q_t>(), out.data_ptr<scalar_t>());
    });
  });
  return a.in_given_order(out);
}

// choose_qparams (Observed = false: min and max checked first) and observer_qparams (an
// observer's range: blocks without a finite value get [0, 0]; only a span too wide for a
// float32 scale raises).
template <bool Observed>
std::tuple<at::Tensor, at::Tensor> qparams_cpu(const at::Tensor& min, const at::Tensor& max,
                                               int64_t quant_min, int64_t quant_max,
                                               bool symmetric, double eps) {
  const char* op = Observed ? "qlib::observer_qparams" : "qlib::choose_qparams";
  check_choose_qparams_args(op, min, max, quant_min, quant_max, eps, /*check_values=*/!Observed);
  const at::Tensor lo = min.to(at::kFloat).contiguous();
  const at::Tensor hi = max.to(at::kFloat).contiguous();
  at::Tensor scale = at::empty(lo.sizes(), lo.options());
  at::Tensor zp = at::empty(lo.sizes(), lo.options().dtype(at::kInt));
  const float* lp = lo.const_data_ptr<float>();
  const float* hp = hi.const_data_ptr<float>();
  float* sp = scale.data_ptr<float>();
  int32_t* zpp = zp.data_ptr<int32_t>();
  for (int64_t i = 0; i < lo.numel(); ++i) {
    const QParams p = qparams_value<Observed>(lp[i], hp[i], quant_min, quant_max, symmetric,
                                              static_cast<float>(eps));
    TORCH_CHECK(std::isfinite(p.scale), op, ": the range [", lp[i], ", ", hp[i],
                "] at flat index ", i, " is too wide for a float32 scale over [", quant_min,
                ", ", quant_max, "]");
    sp[i] = p.scale;
    zpp[i] = p.zero_point;
  }
  return {scale, zp};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, CPU, m) {
  m.impl("fake_quant", &fake_quant_cpu);
  m.impl("fake_quant_backward", &fake_quant_backward_cpu);
  m.impl("fake_quant_with_mask", &fake_quant_with_mask_cpu);
  m.impl("fake_quant_mask_backward", &fake_quant_mask_backward_cpu);
  m.impl("quantize", &quantize_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("choose_qparams", &qparams_cpu<false>);
  m.impl("observer_qparams", &qparams_cpu<true>);
}

}  // namespace qlib
