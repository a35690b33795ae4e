"""Fake (meta) implementations of the qlib ops, and typed wrappers.

The ops and their schemas are defined in C++ (csrc/schemas.cpp); importing
qlib._C registers them (and fake_quant's autograd, csrc/affine_autograd.cpp).
Everything here only adds what torch.compile and torch.export need.
"""
from __future__ import annotations

import numbers
import operator
from typing import Tuple, Union

import torch
from torch import Tensor

from ._load import _C  # (loads qlib._C, or says how to build it)
from ._fakes import register_fake

ops = torch.ops.qlib


# ---------------------------------------------------------------- fakes
# Each first runs the op's argument checks that read no values (C++, as the kernels do).
# The affine ops' outputs are laid out as torch.empty_like(x): x's strides when x is dense
# (x.t() and channels_last are read in place), else contiguous or channels_last.
@register_fake("qlib::fake_quant")
def _(x, scale, zero_point, quant_min, quant_max):
    _C.check_fake_quant_args("qlib::fake_quant", x, scale, zero_point, quant_min, quant_max)
    return torch.empty_like(x)


@register_fake("qlib::fake_quant_with_mask")
def _(x, scale, zero_point, quant_min, quant_max):
    _C.check_fake_quant_args("qlib::fake_quant_with_mask", x, scale, zero_point, quant_min, quant_max)
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


@register_fake("qlib::fake_quant_mask_backward")
def _(grad, mask):
    _C.check_fake_quant_mask_backward_args(grad, mask)
    return torch.empty_like(mask, dtype=grad.dtype)


@register_fake("qlib::lsq_fake_quant")
def _(x, scale, zero_point, quant_min, quant_max, grad_factor, eps):
    _C.check_lsq_fake_quant_args(x, scale, zero_point, quant_min, quant_max, grad_factor, eps)
    return torch.empty_like(x)


@register_fake("qlib::fake_quant_backward")
def _(grad, x, scale, zero_point, quant_min, quant_max, scale_grad, zero_point_grad):
    _C.check_fake_quant_backward_args(grad, x, scale, zero_point, quant_min, quant_max, zero_point_grad)

    def none():
        return x.new_empty((0,), dtype=torch.float32)

    return (
        torch.empty_like(x),
        scale.new_empty(scale.shape) if scale_grad else none(),
        zero_point.new_empty(zero_point.shape) if zero_point_grad else none(),
    )


@register_fake("qlib::quantize")
def _(x, scale, zero_point, quant_min, quant_max, dtype):
    _C.check_quantize_args(x, scale, zero_point, quant_min, quant_max, dtype)
    return torch.empty_like(x, dtype=dtype)


@register_fake("qlib::dequantize")
def _(q, scale, zero_point, dtype):
    _C.check_dequantize_args(q, scale, zero_point, dtype)
    return torch.empty_like(q, dtype=dtype)


@register_fake("qlib::choose_qparams")
def _(min, max, quant_min, quant_max, symmetric, eps):
    _C.check_choose_qparams_args("qlib::choose_qparams", min, max, quant_min, quant_max, eps)
    return min.new_empty(min.shape, dtype=torch.float32), min.new_empty(min.shape, dtype=torch.int32)


# ---------------------------------------------------------------- autograd
# fake_quant's autograd is C++ (csrc/affine_autograd.cpp): a Python
# torch.library.register_autograd cost about 26 us per call.


# ---------------------------------------------------------------- wrappers
def quant_range(bits: int = 8, signed: bool = True, narrow: bool = False) -> Tuple[int, int]:
    """Integer range of a `bits`-wide code: int8 (-128, 127), narrow (-127, 127), uint8 (0, 255)."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"qlib.quant_range: bits must be an int in [2, 16], got {bits!r}")
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1 - int(narrow)


def _as_qparams(op: str, x: Tensor, scale, zero_point) -> Tuple[Tensor, Tensor]:
    """Tensors of a Python scale / zero_point (an int zero point, as torch's fake quant ops)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"qlib.{op}: {'q' if op == 'dequantize' else 'x'} must be a Tensor, got {type(x).__name__}")
    if not isinstance(scale, Tensor):
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"qlib.{op}: scale must be a Tensor or a float, got {scale!r}")
        scale = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    if zero_point is None:
        zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
    elif not isinstance(zero_point, Tensor):
        try:
            value = operator.index(zero_point)
        except TypeError:
            raise TypeError(f"qlib.{op}: zero_point must be an int, a Tensor or None, got {zero_point!r} "
                            "(a floating zero point, LSQ+'s, goes in a floating tensor)") from None
        if not -(1 << 63) <= value < (1 << 63):
            raise ValueError(f"qlib.{op}: zero_point {value} is out of range")
        # int64: an out-of-range value reaches the op's range check, which names it.
        zero_point = torch.full(scale.shape, value, dtype=torch.int64, device=scale.device)
    return scale, zero_point


def fake_quant(
    x: Tensor,
    scale: Union[Tensor, float],
    zero_point: Union[Tensor, int, None] = None,
    quant_min: int = -128,
    quant_max: int = 127,
) -> Tensor:
    """dequantize(quantize(x)) with a straight-through-estimator backward.

    The shape of `scale` sets the granularity: one element is per-tensor;
    otherwise scale has x's rank and each scale covers a block of x (e.g.
    [C, 1] per-channel, [N, K // g] per-group). zero_point has scale's shape
    (integer, or floating for learnable LSQ+ zero points); None means 0.
    """
    scale, zero_point = _as_qparams("fake_quant", x, scale, zero_point)
    return ops.fake_quant(x, scale, zero_point, quant_min, quant_max)


def quantize(
    x: Tensor,
    scale: Union[Tensor, float],
    zero_point: Union[Tensor, int, None] = None,
    quant_min: int = -128,
    quant_max: int = 127,
    dtype: torch.dtype = torch.int8,
) -> Tensor:
    """Integer codes ``clamp(nearbyint(x * (1 / scale)) + zero_point, quant_min, quant_max)`` as
    `dtype` (``1 / scale`` in float32, ties to even: torch's fake quant's codes). NaN maps to
    zero_point."""
    scale, zero_point = _as_qparams("quantize", x, scale, zero_point)
    return ops.quantize(x, scale, zero_point, quant_min, quant_max, dtype)


def dequantize(
    q: Tensor,
    scale: Union[Tensor, float],
    zero_point: Union[Tensor, int, None] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """(q - zero_point) * scale as `dtype`."""
    scale, zero_point = _as_qparams("dequantize", q, scale, zero_point)
    return ops.dequantize(q, scale, zero_point, dtype)


def choose_qparams(
    min: Tensor,
    max: Tensor,
    quant_min: int = -128,
    quant_max: int = 127,
    symmetric: bool = True,
    eps: float = torch.finfo(torch.float32).eps,
) -> Tuple[Tensor, Tensor]:
    """(scale float32, zero_point int32) covering [min, max] widened to contain 0."""
    return ops.choose_qparams(min, max, quant_min, quant_max, symmetric, eps)


def set_cuda_value_checks(enabled: bool) -> None:
    """Make CUDA fake_quant raise on a bad scale or zero_point (off by default).

    A bad qparam (scale <= 0, NaN or Inf; zero_point outside [quant_min,
    quant_max]) raises on the CPU. On CUDA, raising means reading the qparams
    back, a host sync per call, so by default the CUDA fake_quant and its
    backward check each block on the device instead and give NaN for every
    element (and gradient) of a block whose qparams are bad. Turn this on while
    debugging to get the error that names the op and the value. quantize,
    dequantize and choose_qparams always check (they are not in training loops).
    The observers' histogram ops likewise check their histogram's values (a
    corrupt range or a negative count) on CUDA only when this is on; otherwise a
    corrupt range row counts as empty (observers check a loaded state_dict
    anyway). No check syncs while a CUDA graph is captured.
    """
    from . import _C

    _C.set_cuda_value_checks(bool(enabled))


def build_info() -> dict:
    """What this qlib was compiled with, and what this machine offers:

    - ``cpu_isa``: the CPU kernels' build ("avx2", or "default" for a portable build);
    - ``cuda`` / ``cuda_archs``: whether the CUDA kernels were compiled, and for which archs;
    - ``torch_built_against`` / ``torch_runtime``: torch at build time and now;
    - ``num_threads``: ATen's intra-op threads;
    - ``int8_cpu_kernel`` / ``int8_packed_copy``: the int8 CPU GEMM in use, and whether
      Int8Linear keeps its CPU weight packed for it;
    - ``fourbit_cpu_kernel``: the 4-bit CPU kernel family in use;
    - ``int8_cuda_gemm``: the CUDA int8 GEMM for more than 4 rows;
    - ``cpu_capability_runtime`` / ``cuda_available``: what torch sees on this machine.

    A kernel choice that fails (a bad environment variable) reads "error: ..."."""
    info = dict(_C.build_info())
    info["cpu_capability_runtime"] = torch.backends.cpu.get_cpu_capability()
    info["cuda_available"] = torch.cuda.is_available()
    info["torch_runtime"] = torch.__version__
    return info
