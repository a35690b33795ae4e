"""ONNX export of qlib models: translations of ``torch.ops.qlib`` for ``torch.onnx.export``
(``dynamo=True``) and ``export_onnx``, which exports a model as deployed.

- ``fake_quant`` / ``lsq_fake_quant`` become QuantizeLinear + DequantizeLinear (per-tensor,
  per-axis or blocked; opset 21), the form ONNX Runtime and TensorRT read as quantization.
- ``int8_linear`` / ``int8_gemm`` / ``quantize_per_token`` become the same integer math as qlib's
  kernels: codes by ``Round(x * (1 / scale))``, an exact ``MatMulInteger``, the float epilogue.
- ``quantize`` / ``dequantize`` become QuantizeLinear / DequantizeLinear with qlib's NaN rule.
- ``linear_4bit`` / ``dequantize_4bit`` decode the weight (nibbles, a codebook Gather, absmax)
  before a float MatMul.

Needs the packages ``onnx`` and ``onnxscript`` (``onnxruntime`` to run the result).
"""
import copy
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

OPSET = 21  # int4 / int16 codes and blocked QuantizeLinear arrived in opset 21

# onnx.TensorProto's element types
_FLOAT, _UINT8, _INT8, _UINT16, _INT16, _INT32, _INT64, _BOOL, _FLOAT16, _DOUBLE, _BFLOAT16 = 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 16
_UINT4, _INT4 = 21, 22
_FLOATS = (_FLOAT, _FLOAT16, _BFLOAT16, _DOUBLE)
_ONNX_TYPE = {torch.int8: _INT8, torch.uint8: _UINT8, torch.int16: _INT16, torch.int32: _INT32,
              torch.float32: _FLOAT, torch.float16: _FLOAT16, torch.bfloat16: _BFLOAT16}
# Code types whose whole range a QuantizeLinear saturates to, smallest first.
_CODE_TYPES = ((_INT4, -8, 7), (_UINT4, 0, 15), (_INT8, -128, 127), (_UINT8, 0, 255),
               (_INT16, -32768, 32767), (_UINT16, 0, 65535))


def _code_type(quant_min: int, quant_max: int) -> Tuple[int, Optional[int]]:
    """(the QuantizeLinear code type, the type a Clip to [quant_min, quant_max] runs in, or None
    where the range is the code type's whole range). int4 / uint4 only as a whole range (ONNX has
    no Clip on them); ONNX Runtime clips 16-bit codes only as int32."""
    for t, lo, hi in _CODE_TYPES:
        if (lo, hi) == (quant_min, quant_max):
            return t, None
    for t, lo, hi in _CODE_TYPES[2:]:
        if lo <= quant_min and quant_max <= hi:
            return t, (t if t in (_INT8, _UINT8) else _INT32)
    raise ValueError(f"qlib ONNX export: the code range [{quant_min}, {quant_max}] fits no ONNX code type")


def _onnxscript():
    try:
        import onnxscript  # noqa: F401
        from onnxscript import opset21
    except ImportError as e:
        raise ImportError("qlib's ONNX export needs the packages onnx and onnxscript: "
                          "pip install onnx onnxscript (onnxruntime runs the result)") from e
    return opset21


def onnx_translation_table(exact: bool = False) -> Dict[Any, Callable]:
    """``{torch.ops.qlib.<op>.default: translation}`` for
    ``torch.onnx.export(..., dynamo=True, custom_translation_table=..., opset_version=21)``.
    Translated: fake_quant, lsq_fake_quant, quantize, dequantize, quantize_per_token, int8_gemm,
    int8_linear, int8_linear_packed (with its plain weight: ``export_onnx`` arranges it),
    dequantize_4bit and linear_4bit.

    ``int8_linear`` adds its bias in float32 after the scales' product is rounded, where qlib
    rounds once (a fused multiply-add): outputs can part in the last bit. ``exact=True`` adds it in
    double, which gives qlib's outputs bit for bit, and is slower."""
    op = _onnxscript()

    def const_int(v: int, to: int):
        c = op.Constant(value_int=int(v))
        return c if to == _INT64 else op.Cast(c, to=to)

    def onnx_type(dtype) -> int:  # (the exporter hands ScalarType arguments over as ONNX types)
        return _ONNX_TYPE[dtype] if isinstance(dtype, torch.dtype) else int(dtype)

    def as_float(v):
        return v if int(v.dtype) == _FLOAT else op.Cast(v, to=_FLOAT)

    def dim(x, d: int, n=None):
        """x.size(d) (static size n, or x's shape's) as a 1-D int64 tensor."""
        n = x.shape[d] if n is None else n
        return op.Constant(value_ints=[n]) if isinstance(n, int) else op.Shape(x, start=d, end=d + 1)

    def layout(x, scale, zero_point, shape, sshape, who: str, broadcast: bool = False):
        """(scale, zero point, QuantizeLinear attributes) for qlib's granularity by scale's shape:
        per-tensor, per-axis (one dim of x's size), or blocked along one axis (the other
        blocked dims' scales repeated per element: ONNX blocks one axis). shape, sshape: the
        static shapes of x and scale (those of the op's inputs). broadcast: (scale, zero point,
        {}) that broadcast against x instead (every blocked dim repeated)."""
        shape, sshape = list(shape), list(sshape)
        if all(isinstance(n, int) and n == 1 for n in sshape):
            return (op.Squeeze(scale), op.Squeeze(zero_point), {}) if sshape else (scale, zero_point, {})
        if len(sshape) != len(shape):
            raise ValueError(f"qlib ONNX export: {who}: a scale of shape {sshape} for x of shape {shape}")
        kinds = []  # per dim: "same" (scale has x's size), "one" (1 for a size > 1), "block"
        for n, s in zip(shape, sshape):
            if s == n:
                kinds.append("same")
            elif isinstance(s, int) and s == 1:
                kinds.append("one")
            else:
                kinds.append("block")
        spread = [d for d, k in enumerate(kinds) if k == "same" and shape[d] != 1]
        if "block" not in kinds and broadcast:
            return scale, zero_point, {}
        if "block" not in kinds and len(spread) == 1:
            flat = op.Constant(value_ints=[-1])
            return op.Reshape(scale, flat), op.Reshape(zero_point, flat), {"axis": spread[0]}
        # Blocked along `axis` (the last dim not of x's size; all the same: the last dim, blocks of 1).
        axis = None if broadcast else max((d for d, k in enumerate(kinds) if k != "same"), default=len(shape) - 1)
        n, s = (1, 1) if broadcast else (shape[axis], sshape[axis])
        if not (isinstance(n, int) and isinstance(s, int)):
            raise ValueError(f"qlib ONNX export: {who}: x's dim {axis} blocked by scale's needs static sizes, "
                             f"got x {shape} and scale {sshape}")
        rank = len(shape)
        for d, k in enumerate(kinds):
            if d == axis or k == "same" or (broadcast and k == "one"):
                continue
            if k == "one":  # broadcast to x's size
                size = [op.Constant(value_ints=[1] * d)] if d else []
                size += [dim(x, d, shape[d])] + ([op.Constant(value_ints=[1] * (rank - d - 1))] if d < rank - 1 else [])
                grow = lambda t, size=size: op.Expand(t, op.Concat(*size, axis=0))  # noqa: E731
            else:  # each of scale's blocks repeated b times along d
                later = sshape[d + 1:]
                if not (isinstance(shape[d], int) and isinstance(sshape[d], int)) \
                        or not all(isinstance(v, int) for v in later):
                    raise ValueError(f"qlib ONNX export: {who}: x's dim {d} blocked by scale's needs static sizes, "
                                     f"got x {shape} and scale {sshape}")
                b = shape[d] // sshape[d]
                target = op.Constant(value_ints=[0] * d + [shape[d]] + [int(v) for v in later])

                def grow(t, d=d, b=b, target=target):  # [.., s, ..] -> [.., s, 1, ..] -> [.., s, b, ..] -> [.., s * b, ..]
                    t = op.Expand(op.Unsqueeze(t, op.Constant(value_ints=[d + 1])),
                                  op.Constant(value_ints=[1] * (d + 1) + [b] + [1] * (rank - d - 1)))
                    return op.Reshape(t, target)
            scale, zero_point = grow(scale), grow(zero_point)
            sshape[d] = shape[d]
        return scale, zero_point, {} if broadcast else {"axis": axis, "block_size": n // s}

    def codes(xf, scale, zero_point, quant_min: int, quant_max: int, shapes, who: str):
        """(QuantizeLinear codes clipped to [quant_min, quant_max], their zero point, scale, attributes)."""
        if int(zero_point.dtype) in _FLOATS:
            zero_point = op.Round(zero_point)  # (a floating zero point: rounded half to even, as qlib)
        s, z, attrs = layout(xf, as_float(scale), zero_point, *shapes, who)
        code_type, clip_type = _code_type(quant_min, quant_max)
        q = op.QuantizeLinear(xf, s, op.Cast(z, to=code_type), **attrs)
        if clip_type is None:
            return q, op.Cast(z, to=code_type), s, attrs
        if clip_type != code_type:
            q = op.Cast(q, to=clip_type)
        q = op.Clip(q, const_int(quant_min, clip_type), const_int(quant_max, clip_type))
        return q, op.Cast(z, to=clip_type), s, attrs

    def fake_quant(x, scale, zero_point, quant_min: int, quant_max: int, shapes=None):
        xf = as_float(x)
        shapes = shapes or (x.shape, scale.shape)
        q, z, s, attrs = codes(xf, scale, zero_point, quant_min, quant_max, shapes, "fake_quant")
        y = op.DequantizeLinear(q, s, z, **attrs)
        return y if int(x.dtype) == _FLOAT else op.Cast(y, to=int(x.dtype))

    def lsq_fake_quant(x, scale, zero_point, quant_min: int, quant_max: int, grad_factor=None, eps: float = 0.0):
        # The op's clamps: scale at least eps, the zero point rounded into the range.
        shapes = (x.shape, scale.shape)
        scale = op.Max(as_float(scale), op.Constant(value_float=float(eps)))
        zero_point = op.Clip(op.Round(as_float(zero_point)), op.Constant(value_float=float(quant_min)),
                             op.Constant(value_float=float(quant_max)))
        return fake_quant(x, scale, zero_point, quant_min, quant_max, shapes)

    def quantize(x, scale, zero_point, quant_min: int, quant_max: int, dtype):
        xf = as_float(x)
        xf = op.Where(op.IsNaN(xf), op.Constant(value_float=0.0), xf)  # (NaN: the zero point's code, as qlib)
        q, _, _, _ = codes(xf, scale, zero_point, quant_min, quant_max, (x.shape, scale.shape), "quantize")
        return op.Cast(q, to=onnx_type(dtype))

    def dequantize(q, scale, zero_point, dtype):
        if int(zero_point.dtype) in _FLOATS:
            zero_point = op.Round(zero_point)
        if int(q.dtype) == _INT32:  # (q - zero_point in int64, as qlib: DequantizeLinear's int32 wraps)
            s, z, _ = layout(q, as_float(scale), zero_point, q.shape, scale.shape, "dequantize", broadcast=True)
            y = op.Mul(op.Cast(op.Sub(op.Cast(q, to=_INT64), op.Cast(z, to=_INT64)), to=_FLOAT), s)
        else:
            s, z, attrs = layout(q, as_float(scale), zero_point, q.shape, scale.shape, "dequantize")
            y = op.DequantizeLinear(q, s, op.Cast(z, to=int(q.dtype)), **attrs)
        return y if onnx_type(dtype) == _FLOAT else op.Cast(y, to=onnx_type(dtype))

    def each_row():  # (a reduction's arguments: over each row of x2)
        return dict(axes=op.Constant(value_ints=[1]), keepdims=1)

    def row_scales(act_scale, absolute):
        """[M, 1] (dynamic: max(amax / 127, eps) as qlib's per-token scale, amax that of `absolute`)
        or the static act_scale [1, 1]."""
        if act_scale is not None:
            return op.Reshape(as_float(act_scale), op.Constant(value_ints=[1, 1]))
        return op.Max(op.Div(op.ReduceMax(absolute, **each_row()), op.Constant(value_float=127.0)),
                      op.Constant(value_float=torch.finfo(torch.float32).eps))

    def nan_where_rows_have_nan(nan, s):
        """s [M, 1], NaN in the rows where the mask `nan` [M, K] has a NaN."""
        row = op.Cast(op.ReduceMax(op.Cast(nan, to=_UINT8), **each_row()), to=_BOOL)
        return op.Where(row, op.Constant(value_float=float("nan")), s)

    def token_codes(x2):
        """(int8 codes of the rows of a 2-D float32 x, row scales [M, 1]) as qlib's
        quantize_per_token: scale max(amax / 127, eps) (amax of the row's non-NaN values); codes
        clamp(round(x * (1 / scale)), -127, 127), 0 for NaN; a row with NaN gets scale NaN."""
        nan = op.IsNaN(x2)
        zero = op.Constant(value_float=0.0)
        s = row_scales(None, op.Where(nan, zero, op.Abs(x2)))
        c = op.Clip(op.Round(op.Mul(x2, op.Reciprocal(s))), op.Constant(value_float=-127.0),
                    op.Constant(value_float=127.0))
        return op.Cast(op.Where(op.IsNaN(c), zero, c), to=_INT8), nan_where_rows_have_nan(nan, s)

    def gemm_codes(x2, act_scale, act_zero_point, lo: int, hi: int):
        """token_codes for int8_linear, in fewer passes over x: (codes + 128 as uint8, their zero point
        + 128, row scales). ONNX Runtime's fast MatMulInteger is uint8 x int8 (11x int8 x int8). A row
        whose outputs are NaN whatever its codes (NaN, or per-token +-Inf: scale Inf) gets scale NaN
        and any codes."""
        s = row_scales(act_scale, op.Abs(x2))
        m = op.Mul(x2, op.Reciprocal(s))
        zp = op.Constant(value_int=128)
        if act_zero_point is not None:
            zp = op.Add(op.Cast(op.Reshape(act_zero_point, op.Constant(value_ints=[])), to=_INT64), zp)
        zp = op.Cast(zp, to=_UINT8)
        # round(m) + zero point, saturated to [-128, 127] (+ 128): QuantizeLinear with scale 1.
        c = op.QuantizeLinear(m, op.Constant(value_float=1.0), zp)
        # (Dynamic rows need no Clip: |x| <= amax gives |m| <= 127 (1 + 3 * 2^-24), whose round is in
        # [-127, 127].)
        if act_scale is not None and (lo, hi) != (-128, 127):
            c = op.Clip(c, const_int(lo + 128, _UINT8), const_int(hi + 128, _UINT8))
        if act_scale is None:  # (|m| <= 127.5 in a finite row: its sum is finite, else NaN)
            s = op.Add(s, op.Mul(op.ReduceSum(m, **each_row()), op.Constant(value_float=0.0)))
        else:
            s = nan_where_rows_have_nan(op.IsNaN(x2), s)
        return c, zp, s

    def rows(x):
        """x as [M, K] float32."""
        return op.Reshape(as_float(x), op.Concat(op.Constant(value_ints=[-1]), dim(x, len(x.shape) - 1), axis=0))

    def quantize_per_token(x):
        c, s = token_codes(rows(x))
        out_shape = op.Shape(x)
        s_shape = op.Concat(op.Shape(x, start=0, end=len(x.shape) - 1), op.Constant(value_ints=[1]), axis=0)
        return op.Reshape(c, out_shape), op.Reshape(s, s_shape)

    def int8_gemm(a, b):  # (a + 128 as uint8, zero point 128: the fast uint8 x int8 kernel)
        a = op.Cast(op.Add(op.Cast(a, to=_INT64), op.Constant(value_int=128)), to=_UINT8)
        return op.MatMulInteger(a, op.Transpose(b, perm=[1, 0]), const_int(128, _UINT8))

    def int8_linear(x, w_int8, w_scale, bias=None, act_scale=None, act_zero_point=None,
                    act_quant_min: int = -127, act_quant_max: int = 127):
        c, zp, s = gemm_codes(rows(x), act_scale, act_zero_point, act_quant_min, act_quant_max)
        acc = op.MatMulInteger(c, op.Transpose(w_int8, perm=[1, 0]), zp)
        # qlib's epilogue: float(acc) * (row scale * w_scale) (+ bias: one fused multiply-add).
        # float(acc) as DequantizeLinear(acc, 1), not a Cast: ONNX Runtime fuses MatMulInteger-Cast-Mul
        # into its MatMulIntegerToFloat, which gave outputs 0.2 off here with per-row scales (a zero
        # point, or a bias: 1.32). The product in float32 is qlib's; the bias is added after its
        # rounding (last bits), or with `exact` in double: one rounding, as qlib's, and slower.
        lead = op.Shape(x, start=0, end=len(x.shape) - 1)
        out_shape = op.Concat(lead, dim(w_int8, 0), axis=0)
        scales = op.Mul(s, op.Reshape(as_float(w_scale), op.Constant(value_ints=[1, -1])))
        acc = op.DequantizeLinear(acc, op.Constant(value_float=1.0))
        if bias is not None and exact:  # (a product of two floats is exact in double)
            y = op.Add(op.Mul(op.Cast(acc, to=_DOUBLE), op.Cast(scales, to=_DOUBLE)), op.Cast(bias, to=_DOUBLE))
            y = op.Cast(y, to=_FLOAT)
        else:
            y = op.Mul(acc, scales)
            if bias is not None:
                y = op.Add(y, as_float(bias))
        y = op.Reshape(y, out_shape)
        return y if int(x.dtype) == _FLOAT else op.Cast(y, to=int(x.dtype))

    def int8_linear_packed(x, w_packed, w_int8, w_scale, bias=None, act_scale=None, act_zero_point=None,
                           act_quant_min: int = -127, act_quant_max: int = 127):
        if w_int8 is None:
            raise ValueError("qlib ONNX export: int8_linear_packed holds only the CPU kernel's packing of its "
                             "weight; export with qlib.export_onnx, which exports the plain int8 weight")
        return int8_linear(x, w_int8, w_scale, bias, act_scale, act_zero_point, act_quant_min, act_quant_max)

    def dequantize_4bit(packed, absmax, codebook, in_features: int, block_size: int, dtype=torch.float32):
        # codebook[code] * absmax (float32), the even k's code in a byte's low nibble.
        n, k = packed.shape[0], int(in_features)
        low = op.BitwiseAnd(packed, op.Cast(op.Constant(value_int=15), to=_UINT8))
        high = op.BitShift(packed, op.Cast(op.Constant(value_int=4), to=_UINT8), direction="RIGHT")
        codes = op.Concat(op.Unsqueeze(low, op.Constant(value_ints=[2])), op.Unsqueeze(high, op.Constant(value_ints=[2])),
                          axis=2)
        codes = op.Slice(op.Reshape(codes, op.Constant(value_ints=[n, -1])), op.Constant(value_ints=[0]),
                         op.Constant(value_ints=[k]), op.Constant(value_ints=[1]))
        values = op.Gather(as_float(codebook), op.Cast(codes, to=_INT64), axis=0)
        # Times each block's absmax by broadcasting ([N, blocks, block_size] * [N, blocks, 1]): no
        # absmax expanded to the weight's size, which the exporter could store folded.
        blocks = absmax.shape[1]
        padded = blocks * int(block_size)
        if padded != k:
            values = op.Pad(values, op.Constant(value_ints=[0, 0, 0, padded - k]))
        w = op.Mul(op.Reshape(values, op.Constant(value_ints=[n, blocks, int(block_size)])),
                   op.Unsqueeze(as_float(absmax), op.Constant(value_ints=[2])))
        w = op.Reshape(w, op.Constant(value_ints=[n, padded]))
        if padded != k:
            w = op.Slice(w, op.Constant(value_ints=[0]), op.Constant(value_ints=[k]), op.Constant(value_ints=[1]))
        return w if onnx_type(dtype) == _FLOAT else op.Cast(w, to=onnx_type(dtype))

    def linear_4bit(x, packed, absmax, codebook, block_size: int, bias=None):
        # x @ W_hat.T (+ bias) in float32 (qlib's CPU math; its sums run in another order).
        w = dequantize_4bit(packed, absmax, codebook, x.shape[-1], block_size)
        y = op.MatMul(as_float(x), op.Transpose(w, perm=[1, 0]))
        if bias is not None:
            y = op.Add(y, as_float(bias))
        return y if int(x.dtype) == _FLOAT else op.Cast(y, to=int(x.dtype))

    q = torch.ops.qlib
    return {q.dequantize_4bit.default: dequantize_4bit, q.linear_4bit.default: linear_4bit,
            q.fake_quant.default: fake_quant, q.lsq_fake_quant.default: lsq_fake_quant,
            q.quantize.default: quantize, q.dequantize.default: dequantize,
            q.quantize_per_token.default: quantize_per_token, q.int8_gemm.default: int8_gemm,
            q.int8_linear.default: int8_linear, q.int8_linear_packed.default: int8_linear_packed}


class FrozenFakeQuant(nn.Module):
    """A FakeQuantize's qparams as they are: ``fake_quant`` with constant scale and zero point
    (what ``export_onnx`` exports in its place)."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int):
        super().__init__()
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().clone())
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.qlib.fake_quant(x, self.scale, self.zero_point, self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        return f"quant_range=({self.quant_min}, {self.quant_max}), qparams_shape={tuple(self.scale.shape)}"


def frozen_for_export(model: nn.Module) -> nn.Module:
    """A copy of model as deployed: each FakeQuantize fixed at its current qparams (one with fake
    quant off, and each observer outside one, becomes nn.Identity: observers stop), each
    Int8Linear with its plain int8 weight."""
    from .nn import FakeQuantize, Int8Linear
    from .observers import ObserverBase

    def frozen(module: nn.Module, fqn: str) -> Optional[nn.Module]:
        """module's stand-in, or None: module stays."""
        if isinstance(module, ObserverBase) or (isinstance(module, FakeQuantize) and not module.fake_quant_enabled):
            return nn.Identity()
        if not isinstance(module, FakeQuantize):
            return None
        try:
            scale, zero_point = module.calculate_qparams()
        except RuntimeError as e:
            raise RuntimeError(f"qlib.export_onnx: {fqn or 'the model'}: {e}") from None
        return FrozenFakeQuant(scale, zero_point, module.quant_min, module.quant_max)

    copied = copy.deepcopy(model)
    root = frozen(copied, "")
    if root is not None:
        return root
    for name, module in list(copied.named_modules()):
        if isinstance(module, Int8Linear):
            module.hold_plain_weight_only()
        for child_name, child in list(module.named_children()):
            stand_in = frozen(child, f"{name}.{child_name}" if name else child_name)
            if stand_in is not None:
                setattr(module, child_name, stand_in)
    return copied


def export_onnx(model: nn.Module, args: Tuple = (), f=None, *, kwargs: Optional[dict] = None,
                opset_version: int = OPSET, exact: bool = False, **export_kwargs):
    """``torch.onnx.export(dynamo=True)`` of a qlib model as deployed (see ``frozen_for_export``;
    ``model`` itself is not changed), with qlib's translations (``exact``: see
    ``onnx_translation_table``). Returns the ``ONNXProgram`` (and saves it to ``f`` when given).
    Other keyword arguments go to ``torch.onnx.export`` (``dynamic_shapes``, ``input_names``,
    ``verbose``, ...)."""
    if opset_version < OPSET:
        raise ValueError(f"qlib.export_onnx: opset_version must be at least {OPSET} (int4 / int16 codes and "
                         f"blocked QuantizeLinear), got {opset_version}")
    table = onnx_translation_table(exact)
    table.update(export_kwargs.pop("custom_translation_table", None) or {})
    args = args if isinstance(args, tuple) else (args,)
    program = torch.onnx.export(frozen_for_export(model), args, kwargs=kwargs, dynamo=True,
                                custom_translation_table=table, opset_version=opset_version, **export_kwargs)
    store_int8_weights_transposed(program.model)
    if f is not None:
        program.save(f)
    return program


def store_int8_weights_transposed(model) -> None:
    """Each Transpose of an int8 initializer (int8_linear's weight [N, K] for MatMulInteger's [K, N])
    done once, here: the exporter folds only small ones, and ONNX Runtime ran the rest every call
    (17% of MiniLM's time)."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.domain in ("", "ai.onnx") else None
        if source is None or not source.is_initializer() or source.const_value is None \
                or source.dtype != ir.DataType.INT8:
            continue
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else None
        values = np.transpose(source.const_value.numpy(), perm)
        stored = ir.Value(name=f"{source.name}.T", shape=ir.Shape(values.shape), type=ir.TensorType(ir.DataType.INT8),
                          const_value=ir.tensor(np.ascontiguousarray(values), name=f"{source.name}.T"))
        graph.register_initializer(stored)
        node.outputs[0].replace_all_uses_with(stored)
        graph.remove(node, safe=True)
        if not source.uses() and not source.is_graph_input():
            del graph.initializers[source.name]
