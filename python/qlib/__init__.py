"""qlib: quantization for PyTorch (fake-quant with STE, observers, int8 and 4-bit Linear).

Importing qlib loads the compiled extension qlib._C (and fails loudly if it
is missing) and registers torch.ops.qlib.*.
"""
from ._ops import (
    build_info,
    choose_qparams,
    dequantize,
    fake_quant,
    quant_range,
    quantize,
    set_cuda_value_checks,
)

__all__ = [
    "build_info",
    "choose_qparams",
    "dequantize",
    "fake_quant",
    "quant_range",
    "quantize",
    "set_cuda_value_checks",
]
__version__ = "0.1.0"

from . import nn  # noqa: E402
from ._int8_ops import (  # noqa: E402
    int8_cpu_kernels,
    int8_cuda_gemms,
    int8_gemm,
    int8_linear,
    quantize_per_token,
    set_int8_cpu_kernel,
    set_int8_cuda_gemm,
)
from ._fourbit_ops import (  # noqa: E402
    codebook_4bit,
    dequantize_4bit,
    fit_codebook_4bit,
    fourbit_cpu_kernels,
    linear_4bit,
    quantize_4bit,
    set_fourbit_cpu_kernel,
)
from .config import QATConfig  # noqa: E402
from .workflows import calibrate, convert, prepare, prepare_qat, quantize_dynamic, quantize_weight_only  # noqa: E402
from .gptq import gptq_quantize  # noqa: E402
from .smooth_quant import smooth_quant  # noqa: E402

__all__ += ["nn", "int8_gemm", "int8_linear", "quantize_per_token", "int8_cpu_kernels", "set_int8_cpu_kernel",
            "int8_cuda_gemms", "set_int8_cuda_gemm",
            "quantize_dynamic", "codebook_4bit", "fit_codebook_4bit", "quantize_4bit", "dequantize_4bit", "linear_4bit",
            "fourbit_cpu_kernels", "set_fourbit_cpu_kernel",
            "quantize_weight_only", "gptq_quantize", "smooth_quant",
            "QATConfig", "prepare_qat", "prepare", "calibrate", "convert"]
from . import observers  # noqa: E402
from .plot import plot_calibration  # noqa: E402
from .onnx_export import export_onnx, onnx_translation_table  # noqa: E402

__all__ += ["observers", "plot_calibration", "export_onnx", "onnx_translation_table"]
