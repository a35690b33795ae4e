// The Python module qlib._C: loading it registers the ops (schemas.cpp and
// the TORCH_LIBRARY_IMPL blocks). It also reports what was compiled.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "affine.h"
#include "cpu_output.h"
#include "fourbit.h"
#include "int8.h"
#include "observer.h"
#include "warnings.h"

namespace {

// qlib::warn in Python: warnings.warn(message) at the caller of the op; where a filter makes it
// an error, the op raises it.
void python_warn(const std::string& message) {
  if (!Py_IsInitialized()) return;
  pybind11::gil_scoped_acquire gil;
  if (PyErr_WarnEx(PyExc_UserWarning, message.c_str(), 2) == 0) return;  // (the caller of torch.ops)
  PyErr_Clear();
  TORCH_CHECK(false, message, " (a UserWarning that a warnings filter turned into an error)");
}

#ifndef QLIB_CPU_ISA
#define QLIB_CPU_ISA "unknown"
#endif
#ifndef QLIB_TORCH_VERSION
#define QLIB_TORCH_VERSION "unknown"
#endif
#ifndef QLIB_CUDA_ARCHS
#define QLIB_CUDA_ARCHS ""
#endif

pybind11::dict build_info() {
  pybind11::dict d;
  d["cpu_isa"] = QLIB_CPU_ISA;
#ifdef QLIB_WITH_CUDA
  d["cuda"] = true;
  d["cuda_archs"] = QLIB_CUDA_ARCHS;
#else
  d["cuda"] = false;
  d["cuda_archs"] = "";
#endif
  d["torch_built_against"] = QLIB_TORCH_VERSION;
  d["num_threads"] = at::get_num_threads();
  try {  // a bad QLIB_INT8_CPU_KERNEL must not hide the rest of the report
    d["int8_cpu_kernel"] = qlib::int8_cpu_kernel();
  } catch (const c10::Error& e) {
    d["int8_cpu_kernel"] = std::string("error: ") + e.what_without_backtrace();
  }
  try {
    d["int8_packed_copy"] = qlib::int8_packed_copy();
  } catch (const c10::Error& e) {
    d["int8_packed_copy"] = std::string("error: ") + e.what_without_backtrace();
  }
  try {
    d["fourbit_cpu_kernel"] = qlib::fourbit_cpu_kernel();
  } catch (const c10::Error& e) {
    d["fourbit_cpu_kernel"] = std::string("error: ") + e.what_without_backtrace();
  }
  try {
    d["int8_cuda_gemm"] = qlib::int8_cuda_gemm();
  } catch (const c10::Error& e) {
    d["int8_cuda_gemm"] = std::string("error: ") + e.what_without_backtrace();
  }
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  qlib::set_warn_handler(&python_warn);
  m.def("build_info", &build_info, "What this qlib._C was compiled with.");
  m.def("set_cuda_value_checks", &qlib::set_cuda_value_checks,
        "Turn the host-syncing value checks of scale/zero_point on CUDA on or off.");
  m.def("cuda_value_checks", &qlib::cuda_value_checks);
  m.def("set_fake_quant_cuda_packs", &qlib::set_fake_quant_cuda_packs,
        "16-byte packs per thread and iteration of the CUDA fake_quant kernels (1, 2 or 4).");
  m.def("fake_quant_cuda_packs", &qlib::fake_quant_cuda_packs);
  m.def("int8_cpu_kernel", &qlib::int8_cpu_kernel, "The int8 CPU GEMM kernel in use.");
  m.def("int8_packed_copy", &qlib::int8_packed_copy,
        "Whether Int8Linear keeps its CPU weight packed for the int8 kernel in use.");
  m.def("int8_cpu_kernels", &qlib::int8_cpu_kernels, "The int8 CPU GEMM kernels this CPU runs.");
  m.def("set_int8_cpu_kernel", &qlib::set_int8_cpu_kernel,
        "Pick the int8 CPU GEMM kernel by name ('auto' = the best); weights packed before "
        "still run exactly, slower until re-packed.");
  m.def("fourbit_cpu_kernel", &qlib::fourbit_cpu_kernel, "The 4-bit CPU kernel family in use.");
  m.def("fourbit_cpu_kernels", &qlib::fourbit_cpu_kernels, "The 4-bit CPU kernel families this CPU runs.");
  m.def("set_fourbit_cpu_kernel", &qlib::set_fourbit_cpu_kernel,
        "Pick the 4-bit CPU kernel family by name ('auto' = the best).");
  m.def("int8_cuda_gemm", &qlib::int8_cuda_gemm, "The CUDA int8_linear GEMM in use (M > 4).");
  m.def("int8_cuda_gemms", &qlib::int8_cuda_gemms, "The CUDA int8_linear GEMMs this build has.");
  m.def("set_int8_cuda_gemm", &qlib::set_int8_cuda_gemm,
        "Pick the CUDA int8_linear GEMM by name ('auto', 'cublaslt', 'cutlass-sm90').");
  m.def(
      "zeros_on_huge_pages",
      [](std::vector<int64_t> sizes, at::ScalarType dtype) {
        return qlib::empty_output(sizes, at::TensorOptions().dtype(dtype)).zero_();
      },
      "torch.zeros on the CPU, on 2 MiB pages where the kernel allows (from 8 MiB; a weight that "
      "kernels stream every call then crosses 2 MiB pages, not 4 KiB ones).");
  // The argument checks of the ops that read no values: their fakes run them (python/qlib/
  // _ops.py, _int8_ops.py, _observer_ops.py), so a meta or traced call fails as the kernels would.
  m.def("check_eps", [](const std::string& who, double eps) { qlib::check_eps(who.c_str(), eps); });
  m.def("check_fake_quant_args", [](const std::string& op_name, const at::Tensor& x,
                                    const at::Tensor& scale, const at::Tensor& zero_point,
                                    int64_t quant_min, int64_t quant_max) {
    const char* op = op_name.c_str();  // (fake_quant, fake_quant_with_mask)
    qlib::check_fake_quant_input(op, x);
    qlib::check_quant_range(op, quant_min, quant_max);
    qlib::check_affine_meta(op, "x", x, scale, zero_point);
  });
  m.def("check_lsq_fake_quant_args", [](const at::Tensor& x, const at::Tensor& scale,
                                        const at::Tensor& zero_point, int64_t quant_min,
                                        int64_t quant_max, std::optional<double> grad_factor,
                                        double eps) {
    qlib::check_lsq_args(x, scale, zero_point, quant_min, quant_max, grad_factor, eps);
  });
  m.def("check_fake_quant_backward_args",
        [](const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
           const at::Tensor& zero_point, int64_t quant_min, int64_t quant_max,
           bool zero_point_grad) {
          constexpr const char* op = "qlib::fake_quant_backward";
          qlib::check_fake_quant_backward_args(op, grad, x, zero_point, quant_min, quant_max,
                                               zero_point_grad);
          qlib::check_affine_meta(op, "x", x, scale, zero_point);
        });
  m.def("check_fake_quant_mask_backward_args", &qlib::check_fake_quant_mask_backward_args);
  m.def("check_quantize_args", [](const at::Tensor& x, const at::Tensor& scale,
                                  const at::Tensor& zero_point, int64_t quant_min,
                                  int64_t quant_max, at::ScalarType dtype) {
    constexpr const char* op = "qlib::quantize";
    qlib::check_quantize_args(op, x, dtype, quant_min, quant_max);
    qlib::check_affine_meta(op, "x", x, scale, zero_point);
  });
  m.def("check_dequantize_args", [](const at::Tensor& q, const at::Tensor& scale,
                                    const at::Tensor& zero_point, at::ScalarType dtype) {
    constexpr const char* op = "qlib::dequantize";
    qlib::check_dequantize_args(op, q, dtype);
    qlib::check_affine_meta(op, "q", q, scale, zero_point);
  });
  m.def("check_choose_qparams_args",
        [](const std::string& op, const at::Tensor& min, const at::Tensor& max,
           int64_t quant_min, int64_t quant_max, double eps) {
          qlib::check_choose_qparams_args(op.c_str(), min, max, quant_min, quant_max, eps,
                                          /*check_values=*/false);
        });
  m.def("check_int8_float_input", [](const std::string& op, const at::Tensor& x) {
    qlib::check_int8_float_input(op.c_str(), "x", x);
  });
  m.def("check_int8_gemm_args", [](const at::Tensor& a, const at::Tensor& b) {
    qlib::check_int8_gemm_args("qlib::int8_gemm", a, b);
  });
  m.def("check_int8_linear_args",
        [](const std::string& op, const at::Tensor& x, const at::Tensor& w,
           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
           const std::optional<at::Tensor>& act_scale,
           const std::optional<at::Tensor>& act_zero_point, int64_t act_quant_min,
           int64_t act_quant_max) {
          qlib::check_int8_linear_args(op.c_str(), x, w, w_scale, bias, act_scale, act_zero_point,
                                       act_quant_min, act_quant_max);
        });
  m.def("check_linear_4bit_args",
        [](const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
           const at::Tensor& codebook, int64_t block_size, const std::optional<at::Tensor>& bias) {
          qlib::check_linear_4bit_meta("qlib::linear_4bit", x, packed, absmax, codebook,
                                       block_size, bias);
        });
  m.def("check_dequantize_4bit_args",
        [](const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& codebook,
           c10::SymInt in_features, int64_t block_size, at::ScalarType dtype) {
          qlib::check_dequantize_4bit_meta("qlib::dequantize_4bit", packed, absmax, codebook,
                                           in_features, block_size, dtype);
        });
  m.def("check_quantize_4bit_args",
        [](const at::Tensor& w, const at::Tensor& codebook, int64_t block_size) {
          qlib::check_quantize_4bit_meta("qlib::quantize_4bit", w, codebook, block_size);
        });
  m.def("check_block_minmax_args",
        [](const at::Tensor& x) { qlib::check_observer_input("qlib::block_minmax", x); });
  m.def("check_minmax_observe_args",
        [](const at::Tensor& x, const at::Tensor& min_val, const at::Tensor& max_val,
           const at::Tensor& observed, const at::Tensor& nonfinite,
           std::optional<double> averaging_constant) {
          qlib::check_minmax_observe_args("qlib::minmax_observe", x, min_val, max_val, observed,
                                          nonfinite, averaging_constant);
        });
  m.def("check_histogram_observe_args",
        [](const at::Tensor& x, const at::Tensor& hist, const at::Tensor& range) {
          qlib::check_histogram_observe_args("qlib::histogram_observe", x, hist, range,
                                             qlib::HistogramValues::kNone);
        });
  m.def("check_histogram_observe_in_place_args",
        [](const at::Tensor& x, const at::Tensor& hist, const at::Tensor& range,
           const at::Tensor& observed, const at::Tensor& nonfinite) {
          const char* op = "qlib::histogram_observe_in_place";
          qlib::check_histogram_observe_args(op, x, hist, range, qlib::HistogramValues::kNone);
          qlib::check_observer_counters(op, x, observed, nonfinite);
        });
  // The histogram ops on (hist, range): op names the op; the op's own arguments are checked
  // where given (new_range: rebin; q: quantile; quant range: MSE; num_levels: entropy).
  m.def("check_histogram_op_args",
        [](const std::string& op, const at::Tensor& hist, const at::Tensor& range,
           const std::optional<at::Tensor>& new_range, std::optional<double> q,
           std::optional<std::tuple<int64_t, int64_t, int64_t>> mse,
           std::optional<int64_t> num_levels) {
          const auto none = qlib::HistogramValues::kNone;
          qlib::check_histogram(op.c_str(), hist, range, none);
          if (new_range) qlib::check_histogram(op.c_str(), hist, *new_range, none, "new_range");
          if (q) qlib::check_quantile(op.c_str(), *q);
          if (mse) {
            const auto [quant_min, quant_max, num_candidates] = *mse;
            qlib::check_mse_args(op.c_str(), quant_min, quant_max, num_candidates);
          }
          if (num_levels) qlib::check_entropy_args(op.c_str(), *num_levels);
        });
  m.def(
      "check_histogram",
      [](const std::string& who, const at::Tensor& hist, const at::Tensor& range) {
        qlib::check_histogram(who.c_str(), hist, range, qlib::HistogramValues::kAll);
      },
      "Raise unless (hist, range) is a valid observer histogram (shapes, dtypes, values).");
}
