// CPU kernels of the observer ops: block min/max, histogram accumulation
// (with exact re-binning when the range grows), re-binning, quantiles, and
// the MSE and entropy (KL) searches over histograms. Formulas in
// quant_math.h; at::vec for the min/max pass, at::parallel_for for threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "affine.h"
#include "cpu_output.h"
#include "cpu_vec.h"
#include "observer.h"
#include "quant_math.h"

namespace qlib {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct MinMaxCount {
  float lo = kInf, hi = -kInf;
  int64_t nonfinite = 0;
};

// Finite min, max and the count of NaN/Inf of p[0, n). A fast pass takes
// plain min/max and notes whether anything was non-finite (v - v is then
// NaN); only then does a second pass mask the NaN/Inf out and count them.
template <class T>
MinMaxCount minmax_span(const T* p, int64_t n) {
  const Vec zero(0.0f), one(1.0f);
  // Four independent accumulators hide the latency of min/max/add.
  constexpr int kU = 4;
  Vec lo4[kU], hi4[kU], probe4[kU];
  for (int u = 0; u < kU; ++u) lo4[u] = Vec(kInf), hi4[u] = Vec(-kInf), probe4[u] = zero;
  int64_t i = 0;
  for (; i + kU * kVec <= n; i += kU * kVec) {
    for (int u = 0; u < kU; ++u) {
      const Vec v = load_float(p + i + u * kVec, kVec);
      probe4[u] = probe4[u] + (v - v);
      lo4[u] = at::vec::clamp_max(lo4[u], v);  // min, NaN not propagated
      hi4[u] = at::vec::clamp_min(hi4[u], v);
    }
  }
  for (; i + kVec <= n; i += kVec) {
    const Vec v = load_float(p + i, kVec);
    probe4[0] = probe4[0] + (v - v);
    lo4[0] = at::vec::clamp_max(lo4[0], v);
    hi4[0] = at::vec::clamp_min(hi4[0], v);
  }
  Vec vlo = lo4[0], vhi = hi4[0], probe = probe4[0];
  for (int u = 1; u < kU; ++u) {
    vlo = at::vec::clamp_max(vlo, lo4[u]);
    vhi = at::vec::clamp_min(vhi, hi4[u]);
    probe = probe + probe4[u];
  }
  float probe_l[kVec];
  probe.store(probe_l);
  bool all_finite = true;
  for (int64_t k = 0; k < kVec; ++k) all_finite = all_finite && probe_l[k] == 0.0f;
  if (!all_finite) {
    vlo = Vec(kInf);
    vhi = Vec(-kInf);
  }
  // The NaN/Inf counts per lane in float32 (exact to 2^24) go to nbad every kFlush vectors:
  // a row's span (up to all of K) may hold more than 2^24 a lane.
  constexpr int64_t kFlush = int64_t{1} << 20;
  Vec bad(0.0f);
  int64_t nbad = 0;
  const auto flush = [&] {
    float bad_l[kVec];
    bad.store(bad_l);
    for (int64_t k = 0; k < kVec; ++k) nbad += static_cast<int64_t>(bad_l[k]);
    bad = Vec(0.0f);
  };
  for (int64_t j = 0, pending = 0; !all_finite && j + kVec <= n; j += kVec) {
    const Vec v = load_float(p + j, kVec);
    const Vec finite = (v - v) == zero;  // false for NaN and +-Inf
    vlo = at::vec::minimum(vlo, Vec::blendv(Vec(kInf), v, finite));
    vhi = at::vec::maximum(vhi, Vec::blendv(Vec(-kInf), v, finite));
    bad = bad + Vec::blendv(one, zero, finite);
    if (++pending == kFlush) flush(), pending = 0;
  }
  flush();
  MinMaxCount r;
  float lo_l[kVec], hi_l[kVec];
  vlo.store(lo_l);
  vhi.store(hi_l);
  for (int64_t k = 0; k < kVec; ++k) {
    r.lo = std::min(r.lo, lo_l[k]);
    r.hi = std::max(r.hi, hi_l[k]);
  }
  r.nonfinite = nbad;
  for (; i < n; ++i) {
    const float v = static_cast<float>(p[i]);
    if (std::isfinite(v)) {
      r.lo = std::min(r.lo, v);
      r.hi = std::max(r.hi, v);
    } else {
      ++r.nonfinite;
    }
  }
  return r;
}

// Per-row totals of the per-chunk results part [R * chunks] (row-major).
std::vector<MinMaxCount> fold_chunks(const std::vector<MinMaxCount>& part, int64_t R,
                                     int64_t chunks) {
  std::vector<MinMaxCount> out(R);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < chunks; ++c) {
      const MinMaxCount& m = part[r * chunks + c];
      out[r].lo = std::min(out[r].lo, m.lo);
      out[r].hi = std::max(out[r].hi, m.hi);
      out[r].nonfinite += m.nonfinite;
    }
  }
  return out;
}

// Per-row finite min/max of x [R, K]; rows without finite values give
// (+inf, -inf). Parallel over rows, or over chunks of a row when rows are few.
template <class T>
std::vector<MinMaxCount> rows_minmax(const T* x, int64_t R, int64_t K) {
  std::vector<MinMaxCount> out(R);
  if (R >= at::get_num_threads() || K < 2 * kGrain) {
    at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(K, 1)),
                     [&](int64_t b, int64_t e) {
                       for (int64_t r = b; r < e; ++r) out[r] = minmax_span(x + r * K, K);
                     });
    return out;
  }
  const int64_t chunks = (K + kGrain - 1) / kGrain;
  std::vector<MinMaxCount> part(R * chunks);
  at::parallel_for(0, R * chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const int64_t r = c / chunks, k0 = (c % chunks) * kGrain;
      part[c] = minmax_span(x + r * K + k0, std::min(kGrain, K - k0));
    }
  });
  return fold_chunks(part, R, chunks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_minmax_cpu(const at::Tensor& x_in) {
  check_observer_input("qlib::block_minmax", x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t R = x.size(0), K = x.size(1);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor lo = at::empty({R}, fopts), hi = at::empty({R}, fopts);
  int64_t nonfinite = 0;
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "block_minmax_cpu", [&] {
    const auto m = rows_minmax(x.const_data_ptr<scalar_t>(), R, K);
    float* lp = lo.data_ptr<float>();
    float* hp = hi.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r) {
      lp[r] = m[r].lo;
      hp[r] = m[r].hi;
      nonfinite += m[r].nonfinite;
    }
  });
  return {lo, hi, at::scalar_tensor(nonfinite, x.options().dtype(at::kLong))};
}

// An observer's counters after a batch of n values, bad of them NaN / Inf.
void add_to_counters(const at::Tensor& observed, const at::Tensor& nonfinite, int64_t n,
                     int64_t bad) {
  *observed.data_ptr<int64_t>() += n - bad;
  *nonfinite.data_ptr<int64_t>() += bad;
}

void minmax_observe_cpu(const at::Tensor& x_in, const at::Tensor& min_val,
                        const at::Tensor& max_val, const at::Tensor& observed,
                        const at::Tensor& nonfinite,
                        std::optional<double> averaging_constant) {
  const float c = check_minmax_observe_args("qlib::minmax_observe", x_in, min_val, max_val,
                                            observed, nonfinite, averaging_constant);
  const at::Tensor x = x_in.contiguous();
  const int64_t R = x.size(0), K = x.size(1);
  int64_t bad = 0;
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "minmax_observe_cpu", [&] {
    const auto m = rows_minmax(x.const_data_ptr<scalar_t>(), R, K);
    float* lo = min_val.data_ptr<float>();
    float* hi = max_val.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r) {
      update_minmax(lo[r], hi[r], m[r].lo, m[r].hi, c);
      bad += m[r].nonfinite;
    }
  });
  add_to_counters(observed, nonfinite, R * K, bad);
}

// Whether grid g's edges lo + j * width (j <= bins) are exact float32 values
// (integer coordinates below 2^24, width a normal float, no overflow): then
// the bins can be found in float32 SIMD, with exact results.
bool float_grid_ok(const HistGrid& g, int64_t bins) {
  const double m = std::fabs(g.lo / g.width) + static_cast<double>(bins) + 1.0;
  return m < 16777216.0 && g.width >= 1.1754943508222875e-38 &&
         (std::fabs(g.lo) + static_cast<double>(bins + 1) * g.width) < 3.0e38;
}

// Adds the counts of `old` (on the grid of old range) into `out` (on grid g).
void rebin_row(const int64_t* old, double old_lo, double old_hi, int64_t* out,
               const HistGrid& g, int64_t B) {
  const HistGrid og = histogram_grid(old_lo, old_hi, B);
  for (int64_t j = 0; j < og.used; ++j) {
    if (old[j] == 0) continue;
    const double left = og.lo + static_cast<double>(j) * og.width;
    out[histogram_bin(std::max(left, g.lo), g, B)] += old[j];
  }
}

// Elements binned per block: their bin indices are computed in SIMD first,
// then counted, so the counting loop's addresses are ready early.
constexpr int64_t kBinBlock = 256;

// Counts the m (even) bin indices idx into two histograms, alternate elements to each (halves
// the store-to-load chains of repeated bins); unrolled: the loop's control was a third of its
// instructions (stop 22: 5-10% of the observe).
inline void count_bins(const int32_t* idx, int64_t m, int64_t* lh, int64_t* lh2) {
#pragma GCC unroll 8
  for (int64_t i = 0; i < m; i += 2) {
    ++lh[idx[i]];
    ++lh2[idx[i + 1]];
  }
}

#if defined(__x86_64__)
// bin_span's index loop for float32, 16 lanes: the same float ops lane by lane (so the same
// bins). p[0, m), m a multiple of 16; lo / hi / probe: 16 lanes each, updated when track.
__attribute__((target("avx2,fma,avx512f"))) void bin_indices_avx512(
    const float* p, int64_t m, float lo_s, float w_s, float inv_w_s, float top_s, float dummy_s,
    bool absolute, bool track, int32_t* idx, float* lo16, float* hi16, float* probe16) {
  const __m512 lo = _mm512_set1_ps(lo_s), w = _mm512_set1_ps(w_s), inv_w = _mm512_set1_ps(inv_w_s),
               top = _mm512_set1_ps(top_s), dummy = _mm512_set1_ps(dummy_s), zero = _mm512_setzero_ps(),
               one = _mm512_set1_ps(1.0f);
  __m512 vlo = _mm512_loadu_ps(lo16), vhi = _mm512_loadu_ps(hi16), probe = _mm512_loadu_ps(probe16);
  for (int64_t i = 0; i < m; i += 16) {
    prefetch_ahead(p + i);
    __m512 v = _mm512_loadu_ps(p + i);
    const __m512 diff = _mm512_sub_ps(v, v);
    if (track) {
      probe = _mm512_add_ps(probe, diff);
      vlo = _mm512_min_ps(vlo, v);
      vhi = _mm512_max_ps(vhi, v);
    }
    const __mmask16 finite = _mm512_cmp_ps_mask(diff, zero, _CMP_EQ_OQ);
    if (absolute) v = _mm512_abs_ps(v);
    __m512 j = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, lo), inv_w), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    j = _mm512_mask_sub_ps(j, _mm512_cmp_ps_mask(v, _mm512_fmadd_ps(j, w, lo), _CMP_LT_OQ), j, one);
    j = _mm512_min_ps(_mm512_max_ps(j, zero), top);
    _mm512_storeu_si512(idx + i, _mm512_cvttps_epi32(_mm512_mask_blend_ps(finite, dummy, j)));
  }
  _mm512_storeu_ps(lo16, vlo);
  _mm512_storeu_ps(hi16, vhi);
  _mm512_storeu_ps(probe16, probe);
}
#endif

// Adds the bins (on grid g) of the finite values of p[0, n) into lh, two
// histograms of B + 1 counts (summed by the caller; alternate elements go to
// each, which halves the store-to-load chains of repeated bins); NaN/Inf go
// to the extra bin B. With mm set, also takes p's MinMaxCount in the same
// pass (streaming the data once while binning it).
template <class T>
void bin_span(const T* p, int64_t n, const HistGrid& g, int64_t B, bool absolute, int64_t* lh,
              MinMaxCount* mm) {
  int64_t k = 0;
  Vec vlo(kInf), vhi(-kInf), probe(0.0f);
  float lo16[16], hi16[16], probe16[16];  // the AVX512 loop's (float32 x)
  std::fill(lo16, lo16 + 16, kInf), std::fill(hi16, hi16 + 16, -kInf), std::fill(probe16, probe16 + 16, 0.0f);
  if (float_grid_ok(g, B)) {
    // SIMD, exact: the edges lo + j * width are floats and width is a power
    // of two, so (v - lo) / width only rounds in the subtraction, and rounding
    // is monotonic: the floor can only come out one too high (v just below an
    // edge), which one compare corrects. NaN/Inf go to bin B.
    const Vec lo(static_cast<float>(g.lo)), w(static_cast<float>(g.width)),
        inv_w(static_cast<float>(1.0 / g.width)), top(static_cast<float>(B - 1)),
        dummy(static_cast<float>(B)), zero(0.0f), one(1.0f);
    int64_t* lh2 = lh + B + 1;
    alignas(64) int32_t idx[kBinBlock];
#if defined(__x86_64__)
    if constexpr (std::is_same_v<T, float>) {
      static const bool avx512 = __builtin_cpu_supports("avx512f");
      for (; avx512 && k + 16 <= n;) {
        const int64_t m = std::min(kBinBlock, (n - k) / 16 * 16);
        bin_indices_avx512(p + k, m, static_cast<float>(g.lo), static_cast<float>(g.width),
                           static_cast<float>(1.0 / g.width), static_cast<float>(B - 1), static_cast<float>(B),
                           absolute, mm != nullptr, idx, lo16, hi16, probe16);
        count_bins(idx, m, lh, lh2);
        k += m;
      }
    }
#endif
    for (; k + kVec <= n;) {
      const int64_t m = std::min(kBinBlock, (n - k) / kVec * kVec);
      for (int64_t i = 0; i < m; i += kVec) {
        prefetch_ahead(p + k + i);
        Vec v = load_float(p + k + i, kVec);
        const Vec diff = v - v;  // 0, or NaN for NaN/Inf
        if (mm != nullptr) {
          probe = probe + diff;
          vlo = at::vec::clamp_max(vlo, v);
          vhi = at::vec::clamp_min(vhi, v);
        }
        const Vec finite = diff == zero;
        if (absolute) v = v.abs();
        Vec j = ((v - lo) * inv_w).floor();
        j = VecMath::clamp(j - ((v < at::vec::fmadd(j, w, lo)) & one), zero, top);
        at::vec::convert_to_int_of_same_size(Vec::blendv(dummy, j, finite)).store(idx + i);
      }
      count_bins(idx, m, lh, lh2);
      k += m;
    }
  }
  MinMaxCount tail;
  for (; k < n; ++k) {
    const float v = static_cast<float>(p[k]);
    if (!std::isfinite(v)) {
      ++tail.nonfinite;
      continue;
    }
    tail.lo = std::min(tail.lo, v);
    tail.hi = std::max(tail.hi, v);
    const double d = absolute ? std::fabs(static_cast<double>(v)) : static_cast<double>(v);
    ++lh[histogram_bin(d, g, B)];
  }
  if (mm == nullptr) return;
  float lo_l[kVec + 16], hi_l[kVec + 16], probe_l[kVec + 16];
  vlo.store(lo_l);
  vhi.store(hi_l);
  probe.store(probe_l);
  std::copy(lo16, lo16 + 16, lo_l + kVec), std::copy(hi16, hi16 + 16, hi_l + kVec);
  std::copy(probe16, probe16 + 16, probe_l + kVec);
  for (int64_t q = 0; q < kVec + 16; ++q) {
    if (probe_l[q] != 0.0f) {  // NaN/Inf in the SIMD part: count them carefully
      *mm = minmax_span(p, n);
      return;
    }
    tail.lo = std::min(tail.lo, lo_l[q]);
    tail.hi = std::max(tail.hi, hi_l[q]);
  }
  *mm = tail;
}

struct AddEveryRow {
  bool operator()(int64_t) const { return true; }
};

// Adds the histograms (on grids[r]) of the rows r of x [R, K] with active[r]
// into dst [R, B], in parallel over chunks of kGrain elements, each into a
// thread-local histogram. With chunk_mm set, also takes each chunk's finite
// min / max / NaN-Inf count in the same pass. A row of one chunk is added only
// where add_row(r) says so (called once its chunk_mm is taken).
template <class T, class AddRow = AddEveryRow>
void bin_rows(const T* xp, int64_t R, int64_t K, int64_t B, const std::vector<HistGrid>& grids,
              const std::vector<char>& active, bool absolute, int64_t* dst,
              MinMaxCount* chunk_mm, const AddRow& add_row = AddRow()) {
  const int64_t chunks_per_row = (K + kGrain - 1) / kGrain;
  const int nthreads = at::get_num_threads();
  std::vector<std::vector<int64_t>> local(nthreads);
  std::vector<int64_t> local_row(nthreads, -1);
  auto flush = [&](int t) {
    if (local_row[t] < 0) return;
    int64_t* __restrict d = dst + local_row[t] * B;
    int64_t* __restrict l = local[t].data();
    int64_t* __restrict l2 = l + B + 1;
    if (chunks_per_row > 1) {
      // Rows of different threads may coincide: add atomically.
      for (int64_t j = 0; j < B; ++j) {
        const int64_t c = l[j] + l2[j];
        if (c != 0) {
          __atomic_fetch_add(d + j, c, __ATOMIC_RELAXED);
          l[j] = l2[j] = 0;
        }
      }
    } else {
      // One chunk per row: this thread owns the row (a plain add, vectorised; atomics
      // were most of the time of short rows, e.g. per-channel weights).
      if (add_row(local_row[t])) {
        for (int64_t j = 0; j < B; ++j) d[j] += l[j] + l2[j];
      }
      std::fill(l, l + B, int64_t{0});
      std::fill(l2, l2 + B, int64_t{0});
    }
    local_row[t] = -1;
  };
  at::parallel_for(0, R * chunks_per_row, 1, [&](int64_t b, int64_t e) {
    const int t = at::get_thread_num();
    if (local[t].empty()) local[t].assign(2 * (B + 1), 0);  // bin_span's two, + NaN/Inf bins
    for (int64_t c = b; c < e; ++c) {
      const int64_t r = c / chunks_per_row, k0 = (c % chunks_per_row) * kGrain;
      if (!active[r] || grids[r].used == 0) continue;
      if (local_row[t] != r) flush(t);
      local_row[t] = r;
      const T* p = xp + r * K + k0;
      const int64_t n = std::min(kGrain, K - k0);
      bin_span(p, n, grids[r], B, absolute, local[t].data(),
               chunk_mm != nullptr ? chunk_mm + c : nullptr);
    }
    flush(t);
  });
}

// The range of the values recorded: [min, max], or [0, max |x|] when absolute.
std::pair<double, double> observed_range(const MinMaxCount& m, bool absolute) {
  double lo = m.lo, hi = m.hi;
  if (absolute && lo <= hi) {
    hi = std::max(std::fabs(lo), std::fabs(hi));
    lo = 0.0;
  }
  return {lo, hi};
}

// Records x [R, K] into hist [R, B] and range [R, 2] (contiguous) in place; returns x's
// NaN/Inf count. Optimistic one pass when every row has a grid already: bin on it while taking
// the min/max, and keep the counts of each row whose new range keeps the grid's origin and
// width (bin indices unchanged). The other rows are re-binned to their new grid and binned
// again. A row of one chunk adds its counts straight into hist (a per-channel weight's
// histogram can be several times x: no copy of it); longer rows are binned apart first.
// Negative counts raise, as a corrupt state; rows of one chunk checked as they are added may
// hold the batch by then.
template <class T>
int64_t observe_rows(const char* op, const T* xp, int64_t R, int64_t K, bool absolute,
                     int64_t* hp, double* rp, int64_t B) {
  enum : char { kRebin, kKeep, kCorrupt };
  std::vector<HistGrid> grids(R);
  bool optimistic = K > 0;
  for (int64_t r = 0; r < R; ++r) {
    grids[r] = histogram_grid(rp[2 * r], rp[2 * r + 1], B);
    optimistic = optimistic && grids[r].used > 0;
  }
  // Row r's range widened by the batch's values, and whether its grid stays.
  const auto widened = [&](int64_t r, const MinMaxCount& m) {
    const auto [blo, bhi] = observed_range(m, absolute);
    return std::pair<double, double>{std::min(rp[2 * r], blo), std::max(rp[2 * r + 1], bhi)};
  };
  const auto keeps_grid = [&](int64_t r, std::pair<double, double> range) {
    const HistGrid g = histogram_grid(range.first, range.second, B);
    return g.lo == grids[r].lo && g.width == grids[r].width;
  };
  const auto negative = [&](int64_t r) {
    int64_t any = 0;
    for (int64_t j = 0; j < B; ++j) any |= hp[r * B + j];
    return any < 0;
  };
  std::vector<char> state(R, kRebin);
  std::vector<MinMaxCount> mm;
  std::vector<int64_t> batch;  // long rows' counts of this batch
  if (optimistic) {
    const int64_t chunks_per_row = (K + kGrain - 1) / kGrain;
    std::vector<MinMaxCount> chunk_mm(R * chunks_per_row);
    const std::vector<char> all(R, 1);
    if (chunks_per_row == 1) {
      bin_rows(xp, R, K, B, grids, all, absolute, hp, chunk_mm.data(), [&](int64_t r) {
        if (!keeps_grid(r, widened(r, chunk_mm[r]))) return false;
        state[r] = negative(r) ? kCorrupt : kKeep;
        return state[r] == kKeep;
      });
      mm = std::move(chunk_mm);
    } else {
      batch.assign(R * B, 0);
      bin_rows(xp, R, K, B, grids, all, absolute, batch.data(), chunk_mm.data());
      mm = fold_chunks(chunk_mm, R, chunks_per_row);
      for (int64_t r = 0; r < R; ++r) {
        if (keeps_grid(r, widened(r, mm[r]))) state[r] = negative(r) ? kCorrupt : kKeep;
      }
    }
  } else {
    mm = rows_minmax(xp, R, K);
  }
  for (int64_t r = 0; r < R; ++r) {  // raises before the rows below change
    if (state[r] != kKeep) {
      check_histogram_row_counts(op, hp + r * B, B, r,
                                 state[r] == kRebin && !(rp[2 * r] <= rp[2 * r + 1]));
    }
  }
  int64_t nonfinite = 0;
  std::vector<char> redo(R, 0);
  std::vector<int64_t> row;
  for (int64_t r = 0; r < R; ++r) {
    nonfinite += mm[r].nonfinite;
    const auto range = widened(r, mm[r]);
    int64_t* h = hp + r * B;
    if (state[r] == kKeep && !batch.empty()) {
      for (int64_t j = 0; j < B; ++j) h[j] += batch[r * B + j];
    } else if (state[r] == kRebin) {
      const HistGrid g = histogram_grid(range.first, range.second, B);
      if (!keeps_grid(r, range)) {
        row.assign(B, 0);
        rebin_row(h, rp[2 * r], rp[2 * r + 1], row.data(), g, B);
        std::copy(row.begin(), row.end(), h);
      }
      grids[r] = g;
      redo[r] = 1;
    }
    rp[2 * r] = range.first;
    rp[2 * r + 1] = range.second;
  }
  if (std::find(redo.begin(), redo.end(), 1) != redo.end())
    bin_rows(xp, R, K, B, grids, redo, absolute, hp, nullptr);
  return nonfinite;
}

// The counts are checked by observe_rows, in the passes that read them anyway.
std::tuple<at::Tensor, at::Tensor, at::Tensor> histogram_observe_cpu(const at::Tensor& x_in,
                                                                     const at::Tensor& hist,
                                                                     const at::Tensor& range,
                                                                     bool absolute) {
  const char* op = "qlib::histogram_observe";
  check_histogram_observe_args(op, x_in, hist, range, HistogramValues::kRanges);
  const at::Tensor x = x_in.contiguous();
  at::Tensor new_hist = hist.clone(at::MemoryFormat::Contiguous);
  at::Tensor new_range = range.clone(at::MemoryFormat::Contiguous);
  int64_t nonfinite = 0;
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "histogram_observe_cpu", [&] {
    nonfinite = observe_rows(op, x.const_data_ptr<scalar_t>(), x.size(0), x.size(1), absolute,
                             new_hist.data_ptr<int64_t>(), new_range.data_ptr<double>(),
                             new_hist.size(1));
  });
  return {new_hist, new_range, at::scalar_tensor(nonfinite, x.options().dtype(at::kLong))};
}

void histogram_observe_in_place_cpu(const at::Tensor& x_in, const at::Tensor& hist,
                                    const at::Tensor& range, const at::Tensor& observed,
                                    const at::Tensor& nonfinite, bool absolute) {
  const char* op = "qlib::histogram_observe_in_place";
  check_histogram_observe_args(op, x_in, hist, range, HistogramValues::kRanges);
  check_observer_counters(op, x_in, observed, nonfinite);
  const at::Tensor x = x_in.contiguous();
  // (Strided hist / range: written through contiguous copies.)
  at::Tensor h = hist.contiguous(), rg = range.contiguous();
  int64_t bad = 0;
  QLIB_DISPATCH_FLOAT(x.scalar_type(), "histogram_observe_in_place_cpu", [&] {
    bad = observe_rows(op, x.const_data_ptr<scalar_t>(), x.size(0), x.size(1), absolute,
                       h.data_ptr<int64_t>(), rg.data_ptr<double>(), h.size(1));
  });
  if (!h.is_same(hist)) hist.copy_(h);
  if (!rg.is_same(range)) range.copy_(rg);
  add_to_counters(observed, nonfinite, x.numel(), bad);
}

at::Tensor histogram_rebin_cpu(const at::Tensor& hist_in, const at::Tensor& range_in,
                               const at::Tensor& new_range_in) {
  const char* op = "qlib::histogram_rebin";
  check_histogram(op, hist_in, range_in, HistogramValues::kAll);
  check_histogram(op, hist_in, new_range_in, HistogramValues::kAll, "new_range");
  const at::Tensor hist = hist_in.contiguous(), range = range_in.contiguous(),
                   new_range = new_range_in.contiguous();
  const int64_t R = hist.size(0), B = hist.size(1);
  at::Tensor out = at::zeros_like(hist);
  const double* rp = range.const_data_ptr<double>();
  const double* np = new_range.const_data_ptr<double>();
  for (int64_t r = 0; r < R; ++r) {
    const bool old_empty = !(rp[2 * r] <= rp[2 * r + 1]);
    TORCH_CHECK(old_empty || (np[2 * r] <= rp[2 * r] && np[2 * r + 1] >= rp[2 * r + 1]), op,
                ": new_range [", np[2 * r], ", ", np[2 * r + 1], "] of block ", r,
                " does not contain range [", rp[2 * r], ", ", rp[2 * r + 1], "]");
  }
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const HistGrid g = histogram_grid(np[2 * r], np[2 * r + 1], B);
      rebin_row(hist.const_data_ptr<int64_t>() + r * B, rp[2 * r], rp[2 * r + 1],
                out.data_ptr<int64_t>() + r * B, g, B);
    }
  });
  return out;
}

at::Tensor histogram_quantile_cpu(const at::Tensor& hist_in, const at::Tensor& range_in,
                                  double q) {
  const char* op = "qlib::histogram_quantile";
  check_histogram(op, hist_in, range_in, HistogramValues::kAll);
  check_quantile(op, q);
  const at::Tensor hist = hist_in.contiguous(), range = range_in.contiguous();
  const int64_t R = hist.size(0), B = hist.size(1);
  at::Tensor out = at::empty({R}, hist.options().dtype(at::kFloat));
  const double* rp = range.const_data_ptr<double>();
  at::parallel_for(0, R, 16, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const HistGrid g = histogram_grid(rp[2 * r], rp[2 * r + 1], B);
      out.data_ptr<float>()[r] = static_cast<float>(histogram_quantile_value(
          hist.const_data_ptr<int64_t>() + r * B, g, rp[2 * r], rp[2 * r + 1], q));
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> histogram_mse_search_cpu(const at::Tensor& hist_in,
                                                            const at::Tensor& range_in,
                                                            int64_t quant_min, int64_t quant_max,
                                                            bool symmetric,
                                                            int64_t num_candidates) {
  const char* op = "qlib::histogram_mse_search";
  check_histogram(op, hist_in, range_in, HistogramValues::kAll);
  check_mse_args(op, quant_min, quant_max, num_candidates);
  const at::Tensor hist = hist_in.contiguous(), range = range_in.contiguous();
  const int64_t R = hist.size(0), B = hist.size(1);
  const auto fopts = hist.options().dtype(at::kFloat);
  at::Tensor lo = at::empty({R}, fopts), hi = at::empty({R}, fopts);
  const double* rp = range.const_data_ptr<double>();
  // Every (row, candidate) pair is scored by one sum over the row's bins in
  // ascending order, in parallel over all pairs (a per-tensor search has
  // one row but num_candidates independent sums).
  const int64_t n = num_candidates;
  std::vector<float> clo(R * n), chi(R * n);
  std::vector<double> sse(R * n);
  // A task scores kLanes candidates of one row at once, a candidate per lane of
  // histogram_sse's double vectors (the last group repeats its last candidate).
  constexpr int64_t kLanes = VecD::size();
  const int64_t groups = (n + kLanes - 1) / kLanes;
  at::parallel_for(0, R * groups, 2, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t r = task / groups, c0 = (task % groups) * kLanes;
      const double umin = rp[2 * r], umax = rp[2 * r + 1];
      const HistGrid g = histogram_grid(umin, umax, B);
      const int64_t* h = hist.const_data_ptr<int64_t>() + r * B;
      PointMassError point[kLanes];
      double scale[kLanes], zp[kLanes], out[kLanes];
      for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t rc = r * n + std::min(c0 + l, n - 1);
        mse_candidate_range(umin, umax, symmetric, rc - r * n + 1, n, &clo[rc], &chi[rc]);
        point[l] = {mse_candidate_qparams(clo[rc], chi[rc], quant_min, quant_max, symmetric),
                    quant_min, quant_max};
        scale[l] = point[l].p.scale;
        zp[l] = point[l].p.zero_point;
      }
      const SqErrorAntiderivative<VecMath, VecD> F(VecD::loadu(scale), VecD::loadu(zp),
                                                   VecD(static_cast<double>(quant_min)),
                                                   VecD(static_cast<double>(quant_max)));
      histogram_sse(h, g, umin, umax, F, [&](double a) {
        double err[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) err[l] = point[l](a);
        return VecD::loadu(err);
      }).store(out);
      for (int64_t l = 0; l < kLanes && c0 + l < n; ++l) sse[r * n + c0 + l] = out[l];
    }
  });
  // The least error wins; ties go to the wider range; NaN (a range with no
  // float32 scale) never wins.
  for (int64_t r = 0; r < R; ++r) {
    double best = INFINITY;
    float best_lo = 0.0f, best_hi = 0.0f;
    for (int64_t c = n - 1; c >= 0; --c) {
      if (sse[r * n + c] < best) {
        best = sse[r * n + c];
        best_lo = clo[r * n + c];
        best_hi = chi[r * n + c];
      }
    }
    lo.data_ptr<float>()[r] = best_lo;
    hi.data_ptr<float>()[r] = best_hi;
  }
  return {lo, hi};
}

std::tuple<at::Tensor, at::Tensor> histogram_entropy_search_cpu(const at::Tensor& hist_in,
                                                                const at::Tensor& range_in,
                                                                int64_t num_levels) {
  const char* op = "qlib::histogram_entropy_search";
  check_histogram(op, hist_in, range_in, HistogramValues::kAll);
  check_entropy_args(op, num_levels);
  const at::Tensor hist = hist_in.contiguous(), range = range_in.contiguous();
  const int64_t R = hist.size(0), B = hist.size(1);
  const auto fopts = hist.options().dtype(at::kFloat);
  at::Tensor lo = at::empty({R}, fopts), hi = at::empty({R}, fopts);
  const double* rp = range.const_data_ptr<double>();
  // log(j) looked up, not computed, for the counts of rows of up to 8192 values (per-channel
  // weights: nearly every log of the search), else for the small counts (non-empty bins).
  const int64_t max_total = R > 0 && B > 0 ? hist.sum(1).max().item<int64_t>() : 0;
  // (A sum past int64 wraps negative: the short table then.)
  std::vector<double> log_table(max_total >= 0 && max_total <= 8192 ? max_total + 1 : 256);
  for (size_t j = 1; j < log_table.size(); ++j) log_table[j] = std::log(static_cast<double>(j));
  const WholeLog lg{log_table.data(), static_cast<int64_t>(log_table.size())};
  // One row's search: KL of every window width i, ties to the widest window
  // (TensorRT's last argmin). With fewer rows than threads the candidates of
  // a row are scored in parallel, else the rows are; same scores either way.
  const bool rows_parallel = R >= at::get_num_threads();
  auto search_row = [&](int64_t r, std::vector<double>& cnt, std::vector<double>& nz,
                        std::vector<double>& hl, std::vector<double>& kl) {
    const double umin = rp[2 * r], umax = rp[2 * r + 1];
    const HistGrid g = histogram_grid(umin, umax, B);
    const int64_t* h = hist.const_data_ptr<int64_t>() + r * B;
    float best_lo = 0.0f, best_hi = 0.0f;
    if (g.used > 0) {
      entropy_prefix(h, g.used, cnt.data(), nz.data(), hl.data(), lg);
      const int64_t z = histogram_zero_edge(g);
      const int64_t i0 = std::min(num_levels, g.used);
      auto score = [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          kl[i] = entropy_candidate_kl(h, cnt.data(), nz.data(), hl.data(), g.used,
                                       entropy_window_start(g.used, i, z), i, num_levels, lg);
        }
      };
      if (rows_parallel) score(i0, g.used + 1);
      else at::parallel_for(i0, g.used + 1, 16, score);
      double best = INFINITY;
      int64_t best_i = g.used;
      for (int64_t i = i0; i <= g.used; ++i) {
        if (kl[i] <= best) {
          best = kl[i];
          best_i = i;
        }
      }
      const int64_t best_s = entropy_window_start(g.used, best_i, z);
      best_lo = static_cast<float>(std::max(umin, g.lo + static_cast<double>(best_s) * g.width));
      best_hi = static_cast<float>(
          std::min(umax, g.lo + static_cast<double>(best_s + best_i) * g.width));
    }
    lo.data_ptr<float>()[r] = best_lo;
    hi.data_ptr<float>()[r] = best_hi;
  };
  auto search_rows = [&](int64_t b, int64_t e) {
    std::vector<double> cnt(B + 1), nz(B + 1), hl(B + 1), kl(B + 1);
    for (int64_t r = b; r < e; ++r) search_row(r, cnt, nz, hl, kl);
  };
  if (rows_parallel) at::parallel_for(0, R, 1, search_rows);
  else search_rows(0, R);
  return {lo, hi};
}

}  // namespace

TORCH_LIBRARY_IMPL(qlib, CPU, m) {
  m.impl("block_minmax", &block_minmax_cpu);
  m.impl("minmax_observe", &minmax_observe_cpu);
  m.impl("histogram_observe", &histogram_observe_cpu);
  m.impl("histogram_observe_in_place", &histogram_observe_in_place_cpu);
  m.impl("histogram_rebin", &histogram_rebin_cpu);
  m.impl("histogram_quantile", &histogram_quantile_cpu);
  m.impl("histogram_mse_search", &histogram_mse_search_cpu);
  m.impl("histogram_entropy_search", &histogram_entropy_search_cpu);
}

}  // namespace qlib
