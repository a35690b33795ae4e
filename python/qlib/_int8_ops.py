"""Fakes (meta implementations) and typed wrappers of the int8 ops.

Schemas live in csrc/schemas.cpp (block `// int8`); kernels in csrc/int8_cpu.cpp
and cuda/int8_cuda.cu.

Scheme (documented contract):
- Activations (dynamic per-token and static per-tensor) use the narrow
  symmetric int8 range [-127, 127] with zero_point 0; a dynamic row's scale is
  ``max(absmax(row) / 127, torch.finfo(torch.float32).eps)`` (so an all-zero
  row gets a finite positive scale), and its codes equal
  ``qlib.quantize(x, scale, 0, -127, 127)`` bit for bit.
- Weights may use the full int8 range [-128, 127]; ``Int8Linear`` stores them
  narrow-symmetric per output channel (scale = absmax / 127).
- ``int8_gemm`` is exact (int32 accumulation) for K <= 2**17 - 1 = 131071 and
  raises past it: at K = 2**17, all -128 inputs sum to 2**31, one past INT32_MAX.
- ``w_scale`` ([N] or [N, 1], float32) multiplies its column's int32 sums as it is: the ops
  do not read its values (a 0, negative, NaN or Inf scale gives that column's product;
  ``Int8Linear`` refuses such scales when it loads a state_dict, and ``from_float`` never makes
  them). ``act_scale`` divides x, so the ops check it: positive and finite, 1 / scale finite.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._fakes import register_fake
from ._load import _C  # (loads qlib._C, or says how to build it)

ops = torch.ops.qlib

INT8_ACT_QMIN = -127
INT8_ACT_QMAX = 127
INT8_GEMM_MAX_K = 2**17 - 1


@register_fake("qlib::quantize_per_token")
def _(x):
    _C.check_int8_float_input("qlib::quantize_per_token", x)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@register_fake("qlib::int8_gemm")
def _(a, b):
    _C.check_int8_gemm_args(a, b)
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@register_fake("qlib::int8_linear")
def _(x, w_int8, w_scale, bias, act_scale=None, act_zero_point=None, act_quant_min=-127, act_quant_max=127):
    _C.check_int8_linear_args("qlib::int8_linear", x, w_int8, w_scale, bias, act_scale, act_zero_point,
                              act_quant_min, act_quant_max)
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


@register_fake("qlib::int8_pack_weight")
def _(w_int8):
    torch._check(w_int8.dim() == 2, lambda: "qlib::int8_pack_weight: w_int8 must be 2-D [N, K]")
    if w_int8.device.type != "cpu":
        return w_int8.new_empty((0,))
    # The size depends on the int8 CPU kernel of the process that runs it (amx: a tag only;
    # the others: panels), which no compile cache key holds: a data-dependent size.
    ctx = torch.library.get_ctx()
    return w_int8.new_empty((ctx.new_dynamic_size(min=32),))


@register_fake("qlib::int8_unpack_weight")
def _(w_packed, N, K):
    torch._check(w_packed.dim() == 1, lambda: "qlib::int8_unpack_weight: w_packed must be 1-D")
    return w_packed.new_empty((N, K))


@register_fake("qlib::int8_linear_packed")
def _(x, w_packed, w_int8, w_scale, bias, act_scale=None, act_zero_point=None, act_quant_min=-127,
      act_quant_max=127):
    if w_int8 is None:  # (the packing alone: N from w_scale, K from x; the kernel checks its tag)
        _C.check_int8_float_input("qlib::int8_linear_packed", x)
        n = w_scale.shape[0] if w_scale.dim() in (1, 2) else w_scale.numel()
        w_int8 = x.new_empty((n, x.shape[-1] if x.dim() else 0), dtype=torch.int8)  # (shape only)
    _C.check_int8_linear_args("qlib::int8_linear_packed", x, w_int8, w_scale, bias, act_scale, act_zero_point,
                              act_quant_min, act_quant_max)
    return x.new_empty((*x.shape[:-1], w_int8.shape[0]))


def quantize_per_token(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Dynamic symmetric int8 quantization, one scale per row (all leading dims).

    Returns (q int8 of x's shape, scale float32 of shape [..., 1]); codes in
    [-127, 127], scale = max(absmax / 127, float32 eps).
    """
    return ops.quantize_per_token(x)


def int8_gemm(a: Tensor, b: Tensor) -> Tensor:
    """Exact int8 [M, K] x int8 [N, K] -> int32 [M, N] (a @ b.T, the F.linear layout), for
    K <= 2**17 - 1 = 131071 (int32 sums: at K = 2**17 all -128 inputs give 2**31, one past
    INT32_MAX); a longer K raises."""
    return ops.int8_gemm(a, b)


def int8_linear(
    x: Tensor,
    w_int8: Tensor,
    w_scale: Tensor,
    bias: Optional[Tensor] = None,
    act_scale: Optional[Tensor] = None,
    act_zero_point: Optional[Tensor] = None,
    act_quant_min: int = -127,
    act_quant_max: int = 127,
) -> Tensor:
    """Fused int8 Linear: quantize x (per-token, or per-tensor with act_scale), int8 GEMM
    with w_int8 [N, K], dequantize with w_scale [N] or [N, 1] (per output channel), + bias, in
    x's dtype.

    Static activations (act_scale) may carry an int32/int64 act_zero_point and a code range
    [act_quant_min, act_quant_max] inside int8; the codes are then exactly
    ``quantize(x, act_scale, act_zero_point, act_quant_min, act_quant_max)`` and the zero point
    is taken out exactly: zero_point x the row sums of w_int8, subtracted from the int32 sums in
    64-bit arithmetic."""
    return ops.int8_linear(x, w_int8, w_scale, bias, act_scale, act_zero_point, act_quant_min, act_quant_max)


def int8_cpu_kernels() -> List[str]:
    """Names of the int8 CPU GEMM kernels this CPU can run ('avx2', 'vnni-emulated',
    'avx-vnni' / 'avx512-vnni' where the CPU has VNNI, and 'amx' where it has AMX-INT8 and
    the OS grants the tile state); ``build_info()["int8_cpu_kernel"]`` is the one in use
    (the best, unless set)."""
    from . import _C

    return list(_C.int8_cpu_kernels())


def set_int8_cpu_kernel(name: str) -> None:
    """Use the int8 CPU kernel ``name`` ('auto' = the best this CPU runs); for benchmarks and
    tests. All are exact. Weights packed before keep working (``Int8Linear`` re-packs them)."""
    from . import _C

    _C.set_int8_cpu_kernel(str(name))


def int8_cuda_gemms() -> List[str]:
    """Names of the GEMMs this build has for CUDA ``int8_linear`` at M > 4: 'cublaslt'
    (``torch._int_mm``, then a dequant kernel) and, when built with CUTLASS and 9.0a,
    'cutlass-sm90' (Hopper wgmma with the dequant fused). ``build_info()["int8_cuda_gemm"]``
    is the one in use, unless set (or set by ``QLIB_INT8_CUDA_GEMM``): 'auto (cutlass-sm90 on
    compute capability 9.0, else cublaslt)' where the fused GEMM is built, else 'cublaslt'."""
    from . import _C

    return list(_C.int8_cuda_gemms())


def set_int8_cuda_gemm(name: str) -> None:
    """Use the CUDA int8_linear GEMM ``name`` ('auto', 'cublaslt', 'cutlass-sm90'). Both give
    the same bits. 'auto' (the default) is 'cutlass-sm90' on compute capability 9.0 where
    built, else 'cublaslt'. 'cutlass-sm90' raises on a GPU other than compute capability 9.0;
    calls it cannot take (a static zero point, K not a multiple of 16, unaligned rows) use cuBLASLt.
    'auto' (the reset) does nothing in a build without CUDA; another name raises there."""
    from . import _C

    _C.set_int8_cuda_gemm(str(name))
