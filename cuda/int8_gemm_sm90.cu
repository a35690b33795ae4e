// Hopper (sm_90a) int8 GEMM with the dequant epilogue fused, from CUTLASS 3 collectives:
//   out[m, n] = float(sum_k a[m, k] * b[n, k]) * (a_scale[m] * w_scale[n]) + bias[n]
// in out's dtype: the same float math as int8_cuda.cu's dequant_epilogue_kernel, so the
// two paths agree bit for bit. The mainloop is TMA + wgmma (int8 in, int32 accumulate);
// the epilogue is an epilogue-visitor tree, so the int32 tile never reaches global memory.
// Compiled only when CUTLASS's headers are found and TORCH_CUDA_ARCH_LIST has 9.0a
// (setup.py defines QLIB_WITH_SM90_GEMM); the kernels run only on compute capability 9.0.
// NDEBUG: a device-side assert is a function call, and ptxas then serializes every wgmma.
#ifndef NDEBUG
#define NDEBUG
#endif
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "int8_sm90.h"
#include "pack.cuh"

namespace qlib {
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

// Tile configurations: rows of A per CTA tile (M), columns of B (N), k per stage (K).
struct TileLarge {  // M > 64: 128 x 128 tiles, two CTAs of a cluster share B's TMA loads
  using Tile = Shape<_128, _128, _128>;
  using Cluster = Shape<_2, _1, _1>;
};
struct TileSmall {  // M <= 64: half-height tiles waste less of a wgmma on padding rows
  using Tile = Shape<_64, _128, _128>;
  using Cluster = Shape<_1, _2, _1>;
};

template <class ElementD, class Config>
struct Int8LinearSm90 {
  using Tile = typename Config::Tile;
  using Cluster = typename Config::Cluster;
  static constexpr int kAlignAB = 16;                            // bytes = int8 elements
  static constexpr int kAlignD = 16 / sizeof(ElementD);          // elements per 16 bytes
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // (a_scale[m] * w_scale[n]) then acc * that + bias[n] (a null bias reads as 0).
  using RowScale = fusion::Sm90ColBroadcast<0, Tile, float>;    // one value per row m
  using ColScale = fusion::Sm90RowBroadcast<0, Tile, float>;    // one value per column n
  using Bias = fusion::Sm90RowBroadcast<0, Tile, float>;
  using ScaleProduct =
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, RowScale,
                      ColScale>;
  using Epilogue =
      fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float, kRound>,
                      fusion::Sm90AccFetch, ScaleProduct, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,
      void, cutlass::layout::RowMajor, kAlignD,  // no C operand
      ElementD, cutlass::layout::RowMajor, kAlignD, cutlass::epilogue::TmaWarpSpecialized,
      Epilogue>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor,
      kAlignAB, int8_t, cutlass::layout::ColumnMajor, kAlignAB, int32_t, Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                  const at::Tensor& w_scale, const at::Tensor& bias, at::Tensor& out) {
    const int M = static_cast<int>(a.size(0)), N = static_cast<int>(b.size(0)),
              K = static_cast<int>(a.size(1));
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    const StrideA sa = make_stride(a.stride(0), Int<1>{}, int64_t{0});
    const StrideB sb = make_stride(b.stride(0), Int<1>{}, int64_t{0});
    const StrideD sd = make_stride(out.stride(0), Int<1>{}, int64_t{0});

    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {a.const_data_ptr<int8_t>(), sa, b.const_data_ptr<int8_t>(), sb},
        {{}, nullptr, sd, reinterpret_cast<ElementD*>(out.data_ptr()), sd}};
    // Epilogue tree arguments, children first: {acc, {row scale, col scale, x}, bias, fma}.
    args.epilogue.thread = {
        {},
        {{a_scale.const_data_ptr<float>()}, {w_scale.const_data_ptr<float>()}, {}},
        {bias.defined() ? bias.const_data_ptr<float>() : nullptr},
        {}};
    args.hw_info.device_id = a.get_device();
    args.hw_info.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

    Gemm gemm;
    TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess,
                "qlib::int8_linear (sm90 GEMM): CUTLASS cannot run M = ", M, ", N = ", N,
                ", K = ", K);
    at::Tensor workspace = at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))},
                                     a.options().dtype(at::kByte));
    const auto stream = at::cuda::getCurrentCUDAStream();
    cutlass::Status st = gemm.initialize(args, workspace.data_ptr(), stream);
    TORCH_CHECK(st == cutlass::Status::kSuccess, "qlib::int8_linear (sm90 GEMM): initialize failed: ",
                cutlassGetStatusString(st));
    st = gemm.run(stream);
    TORCH_CHECK(st == cutlass::Status::kSuccess, "qlib::int8_linear (sm90 GEMM): launch failed: ",
                cutlassGetStatusString(st));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <class ElementD>
void run_for_m(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
               const at::Tensor& w_scale, const at::Tensor& bias, at::Tensor& out) {
  if (a.size(0) <= 64) {
    Int8LinearSm90<ElementD, TileSmall>::run(a, b, a_scale, w_scale, bias, out);
  } else {
    Int8LinearSm90<ElementD, TileLarge>::run(a, b, a_scale, w_scale, bias, out);
  }
}

}  // namespace

bool int8_linear_sm90_fits(const at::Tensor& b, const at::Tensor& out) {
  // Rows must not overlap (an expanded weight has row stride 0): TMA would take the
  // descriptor, or fail it only by an assert that NDEBUG removes.
  return b.size(1) > 0 && b.size(1) % 16 == 0 && b.stride(1) == 1 && b.stride(0) % 16 == 0 &&
         b.stride(0) >= b.size(1) &&
         aligned16(b.const_data_ptr()) && out.dim() == 2 && out.stride(1) == 1 &&
         (out.stride(0) * out.element_size()) % 16 == 0 && aligned16(out.const_data_ptr()) &&
         out.size(0) <= INT32_MAX && out.size(1) <= INT32_MAX;
}

void int8_linear_sm90(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale_in,
                      const at::Tensor& w_scale_in, const at::Tensor& bias_in, at::Tensor& out) {
  // The broadcast nodes read the scales and the bias 16 bytes at a time: copy a view that
  // starts off a 16-byte boundary (a misaligned load would end the CUDA context).
  const auto aligned_copy = [](const at::Tensor& t) {
    return !t.defined() || aligned16(t.const_data_ptr()) ? t : t.clone();
  };
  const at::Tensor a_scale = aligned_copy(a_scale_in), w_scale = aligned_copy(w_scale_in),
                   bias = aligned_copy(bias_in);
  switch (out.scalar_type()) {
    case at::kBFloat16: return run_for_m<cutlass::bfloat16_t>(a, b, a_scale, w_scale, bias, out);
    case at::kHalf: return run_for_m<cutlass::half_t>(a, b, a_scale, w_scale, bias, out);
    case at::kFloat: return run_for_m<float>(a, b, a_scale, w_scale, bias, out);
    default: TORCH_CHECK(false, "qlib::int8_linear (sm90 GEMM): unsupported output dtype ",
                         out.scalar_type());
  }
}

}  // namespace qlib
