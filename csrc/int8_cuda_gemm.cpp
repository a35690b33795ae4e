// Which GEMM the CUDA int8_linear uses for M > 4 (cuda/int8_cuda.cu), by name:
//   "cublaslt":     at::_int_mm (cuBLASLt int8 tensor cores), then a dequant kernel;
//   "cutlass-sm90": cuda/int8_gemm_sm90.cu, wgmma with the dequant fused (Hopper only;
//                   present when the build had CUTLASS and 9.0a, QLIB_WITH_SM90_GEMM).
// "auto": cutlass-sm90 where it is built and the GPU is compute capability 9.0 (measured 1.2-2x
// faster than cuBLASLt's int8 kernel plus the dequant at M >= 1024 on an H200, the same bits:
// benchmarks/RESULTS.md), else cublaslt.
// Compiled in every build (a CPU-only build knows no CUDA GEMM) and in the C++ tests.
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <iterator>

#include "int8.h"

namespace qlib {
namespace {

constexpr const char* kGemmNames[] = {"cublaslt", "cutlass-sm90"};

bool gemm_built(Int8CudaGemm g) {
#ifndef QLIB_WITH_CUDA
  return false;
#elif defined(QLIB_WITH_SM90_GEMM)
  return true;
#else
  return g == Int8CudaGemm::kCublasLt;
#endif
}

std::atomic<int> g_gemm{-1};  // -1: not chosen yet

}  // namespace

Int8CudaGemm current_int8_cuda_gemm() {
  return static_cast<Int8CudaGemm>(chosen_once(g_gemm, "QLIB_INT8_CUDA_GEMM", set_int8_cuda_gemm));
}

std::string int8_cuda_gemm() {
  if (!gemm_built(Int8CudaGemm::kCublasLt)) return "none (built without CUDA)";
  const auto g = current_int8_cuda_gemm();
  return g == Int8CudaGemm::kAuto ? "auto (cutlass-sm90 on compute capability 9.0, else cublaslt)"
                                  : kGemmNames[static_cast<int>(g)];
}

std::vector<std::string> int8_cuda_gemms() {
  std::vector<std::string> names;
  for (int g = 0; g < static_cast<int>(std::size(kGemmNames)); ++g)
    if (gemm_built(static_cast<Int8CudaGemm>(g))) names.emplace_back(kGemmNames[g]);
  return names;
}

void set_int8_cuda_gemm(const std::string& name) {
  if (name == "auto") {  // (the reset: a no-op in a build without CUDA, for device-agnostic scripts)
    if (gemm_built(Int8CudaGemm::kCublasLt))
      g_gemm.store(static_cast<int>(gemm_built(Int8CudaGemm::kCutlassSm90) ? Int8CudaGemm::kAuto
                                                                          : Int8CudaGemm::kCublasLt));
    return;
  }
  for (int g = 0; g < static_cast<int>(std::size(kGemmNames)); ++g) {
    if (name != kGemmNames[g]) continue;
    TORCH_CHECK(gemm_built(static_cast<Int8CudaGemm>(g)), "qlib.set_int8_cuda_gemm: this build of qlib has no '",
                name, "' GEMM; it has: [", c10::Join(", ", int8_cuda_gemms()),
                "] (cutlass-sm90 needs CUTLASS and 9.0a in TORCH_CUDA_ARCH_LIST at build time)");
    g_gemm.store(g);
    return;
  }
  TORCH_CHECK(false, "qlib.set_int8_cuda_gemm: unknown GEMM '", name,
              "'; expected 'auto', 'cublaslt' or 'cutlass-sm90'");
}

}  // namespace qlib
