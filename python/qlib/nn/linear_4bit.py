"""Linear4bit: a weight-only 4-bit Linear (NF4, int4 or any 16-value codebook).

The weight is stored as 4-bit codes, two a byte, with one float32 absmax per block of
``block_size`` weights along in_features (the scheme of ``qlib._fourbit_ops``). The matmul
(``torch.ops.qlib.linear_4bit``) decodes the weight as it reads it at small batch and sums in
float32; activations are not quantized.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _fourbit_ops
from .._fourbit_ops import CodebookLike, codebook_4bit
from .._state import OP_FLOAT_DTYPES, QuantState, check_finite_weight, on_nested, untraced, weight_zeros
from .qat_linear import QATLinear
from .smoothing import carry_smoothing, smoothed_input


def _check_in_features(x: Tensor, in_features: int, out_features: int) -> None:
    """linear_4bit takes K from x and cannot tell K from K - 1 (both fill ceil(K / 2) bytes)."""
    def check():
        if x.dim() and x.shape[-1] != in_features:
            raise RuntimeError(f"Linear4bit (in_features={in_features}, out_features={out_features}): x of "
                               f"shape {tuple(x.shape)} has {x.shape[-1]} features, expected {in_features}")

    untraced(check)  # (torch.jit.trace: plain sizes, no TracerWarnings)


torch.fx.wrap("_check_in_features")  # a call in fx graphs (a Proxy's shape cannot be compared)


def _check_int(who: str, name: str, value, least: int) -> int:
    """int(value), raising where value is not an integer >= least (integral floats pass, as 32.0)."""
    try:
        ok = not isinstance(value, bool) and int(value) == value and int(value) >= least
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        kind = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ValueError(f"{who}: {name} must be {kind}, got {value!r}")
    return int(value)


class Linear4bit(QuantState):
    """``y = x @ W_hat.T + bias``, W_hat decoded from 4-bit codes; drop-in for an ``nn.Linear``
    whose weight is frozen. Build one with :meth:`from_float` (codebook "nf4", "int4", "kmeans"
    or 16 values) or :meth:`from_qat`.

    The state_dict holds ``packed`` (uint8 [N, ceil(K / 2)]), ``absmax`` (float32
    [N, ceil(K / block_size)]), ``codebook`` (float32 [16]), ``bias`` (a parameter, if any;
    from_float / from_codes keep the source bias's requires_grad) and ``_extra_state`` (int64
    [in_features, block_size], checked at load): plain tensors that load with
    ``torch.load(weights_only=True)`` and safetensors. Gradients flow to the input and the bias,
    not to the 4-bit weight.
    """

    smoothing_in_forward = True  # (divides by qlib.smooth_quant's s: nn/smoothing.py)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 codebook: CodebookLike = "nf4", block_size: int = 64, device=None, dtype=None,
                 compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        in_features = _check_int("Linear4bit", "in_features", in_features, 0)
        out_features = _check_int("Linear4bit", "out_features", out_features, 0)
        block_size = _check_int("Linear4bit", "block_size", block_size, 1)
        if compute_dtype is not None and compute_dtype not in OP_FLOAT_DTYPES:
            raise ValueError(f"Linear4bit: compute_dtype must be None, float32, float16 or bfloat16, got {compute_dtype}")
        # None: the input's dtype. torch.bfloat16 runs a float32 x through the bfloat16 kernels
        # (faster on CPUs with AVX512-BF16, as bitsandbytes' and ATen's int4 CPU kernels do)
        # and casts the output back. Under torch.autocast the autocast dtype wins (as for nn.Linear,
        # the output comes in it).
        self.compute_dtype = compute_dtype
        self.in_features, self.out_features, self.block_size = in_features, out_features, block_size
        n, k = self.out_features, self.in_features
        self.register_buffer("packed", weight_zeros((n, (k + 1) // 2), torch.uint8, device))
        self.register_buffer("absmax", torch.zeros(n, -(-k // self.block_size), dtype=torch.float32, device=device))
        self.register_buffer("codebook", codebook_4bit(codebook, device))
        self.register_parameter("bias", nn.Parameter(torch.zeros(n, device=device, dtype=dtype)) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, codebook: CodebookLike = "nf4", block_size: int = 64,
                   compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        """Quantize ``linear``'s weight (finite values) to 4 bits; the bias is copied as is (a
        frozen one stays frozen).
        ``codebook="kmeans"`` fits one to this weight (``qlib.fit_codebook_4bit``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_float: expected an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear, QATLinear):  # (its trained qparams would be dropped)
            raise TypeError(f"Linear4bit.from_float: got a QATLinear, whose trained qparams from_float would "
                            "ignore: use Linear4bit.from_qat or qlib.convert")
        w = linear.weight
        if isinstance(codebook, str) and codebook.lower() == "kmeans":
            codebook = _fourbit_ops.fit_codebook_4bit(w.detach(), block_size)
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, codebook, block_size,
                  device=w.device, dtype=None if linear.bias is None else linear.bias.dtype,
                  compute_dtype=compute_dtype)
        with torch.no_grad():
            packed, absmax = _fourbit_ops.ops.quantize_4bit(w.detach(), mod.codebook, mod.block_size)
            mod.packed.copy_(packed)
            mod.absmax.copy_(absmax)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias.detach())
        if linear.bias is not None:  # (a frozen base's bias must not come back trainable)
            mod.bias.requires_grad_(linear.bias.requires_grad)
        return carry_smoothing(linear, mod)

    @classmethod
    def from_qat(cls, qat: nn.Module, compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        """From a weight-only QATLinear (``activation_bits=None``; trained, or calibrated by
        ``qlib.prepare`` + ``calibrate``) whose weights are symmetric (zero point 0) within
        [-8, 7], per-tensor, per-channel or per-group. The codes are the weight FakeQuantize's
        integers q and the codebook is the integers -8..7 with the scales as ``absmax``, so the
        decoded weight equals the fake-quantized one bit for bit."""
        wfq = qat.weight_fake_quant
        where = f"Linear4bit.from_qat ({qat.extra_repr()})"
        if qat.activation_fake_quant is not None:
            raise ValueError(f"{where}: its activations are fake-quantized, which Linear4bit (weight-only) "
                             "would drop; use activation_bits=None for weight-only QAT, or Int8Linear.from_qat")
        if wfq.quant_min < -8 or wfq.quant_max > 7:
            raise ValueError(f"{where}: weight range [{wfq.quant_min}, {wfq.quant_max}] does not fit 4 bits "
                             "([-8, 7]); use at most 4 symmetric weight bits")
        check_finite_weight(where, qat.weight.detach())
        N, K = qat.out_features, qat.in_features
        scale, zero_point = qat.weight_qparams()
        if bool((zero_point != 0).any()):
            raise ValueError(f"{where}: weights must be symmetric (zero point 0)")
        # Per-tensor [1], per-channel [N, 1] or per-group [N, K / g]: blocks along K.
        if scale.numel() != 1 and (scale.numel() % N != 0 or K % (scale.numel() // N) != 0):
            raise ValueError(f"{where}: weight scales of shape {tuple(scale.shape)} do not block the weight by rows")
        scale = scale.float().reshape(1 if scale.numel() == 1 else N, -1).expand(N, -1).contiguous()
        with torch.no_grad():
            q = _fourbit_ops.ops.quantize(qat.weight.detach(), scale, torch.zeros_like(scale, dtype=torch.int32),
                                          wfq.quant_min, wfq.quant_max, torch.int8)
        return carry_smoothing(qat, cls.from_codes(q, scale, K // scale.shape[1], qat.bias, compute_dtype))

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, block_size: int, bias: Optional[Tensor] = None,
                   compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        """The layer whose weight is ``codes * scale``: integer codes [N, K] in [-8, 7] and float32
        scales [N, ceil(K / block_size)], one per block of ``block_size`` codes along K (the
        codebook "int-grid", the scales as ``absmax``), as from_qat and ``qlib.gptq_quantize``
        make them. ``bias`` (floating, [N]) is copied, keeping its requires_grad."""
        if not isinstance(codes, Tensor) or codes.dim() != 2 or codes.is_floating_point() or codes.is_complex() \
                or codes.dtype == torch.bool:
            got = f"{codes.dtype} of shape {tuple(codes.shape)}" if isinstance(codes, Tensor) else type(codes).__name__
            raise ValueError(f"Linear4bit.from_codes: codes must be a 2-D integer tensor, got {got}")
        block_size = _check_int("Linear4bit.from_codes", "block_size", block_size, 1)
        N, K = codes.shape
        scale32 = scale.detach().to(torch.float32)  # (absmax's dtype: checked after the rounding)
        if scale.numel() and not bool((torch.isfinite(scale32) & (scale32 >= 0)).all()):
            raise ValueError("Linear4bit.from_codes: scales must be finite and >= 0 in float32 "
                             f"(max |scale| {scale.detach().abs().max().item():g})")
        if scale.numel() and bool(((scale32 == 0) & (scale != 0)).any()):
            raise ValueError("Linear4bit.from_codes: a nonzero scale underflows to 0 in float32")
        if tuple(scale.shape) != (N, -(-K // block_size)):
            raise ValueError(f"Linear4bit.from_codes: scales of shape {tuple(scale.shape)} do not match codes of "
                             f"shape {tuple(codes.shape)} in blocks of {block_size}")
        if codes.numel():  # (min / max as Python ints: `uint8 >= -8` would compare against 248)
            lo, hi = int(codes.min()), int(codes.max())
            if lo < -8 or hi > 7:
                raise ValueError(f"Linear4bit.from_codes: codes must lie in [-8, 7], got values in [{lo}, {hi}]")
        if bias is not None and not (isinstance(bias, Tensor) and bias.is_floating_point() and tuple(bias.shape) == (N,)):
            got = f"{bias.dtype} of shape {tuple(bias.shape)}" if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"Linear4bit.from_codes: bias must be a floating tensor of shape ({N},) for codes of "
                             f"shape {tuple(codes.shape)}, got {got}")
        mod = cls(K, N, bias is not None, torch.tensor(_fourbit_ops.INT_GRID), block_size, device=codes.device,
                  dtype=None if bias is None else bias.dtype, compute_dtype=compute_dtype)
        with torch.no_grad():
            padded = torch.nn.functional.pad((codes.to(torch.int16) + 8).to(torch.uint8), (0, K % 2))
            mod.packed.copy_(padded[:, 0::2] | (padded[:, 1::2] << 4))
            mod.absmax.copy_(scale32)
            if bias is not None:
                mod.bias.copy_(bias.detach())
        if bias is not None:  # (gptq_quantize / convert of a frozen base: its bias stays frozen)
            mod.bias.requires_grad_(bias.requires_grad)
        return mod

    def __setattr__(self, name, value):
        if name == "weight":  # (nn.Module would add a `weight` that forward never reads)
            raise TypeError(
                f"Linear4bit ({self.extra_repr()}): the weight is held as 4-bit codes (packed, absmax, "
                "codebook), and forward would not read a `weight` assigned to it (a tied or trained weight, "
                "lm_head.weight = embed.weight, needs a float Linear: leave it out of the swap with "
                "filter_fn); dequantized_weight() reads the weight")
        super().__setattr__(name, value)

    def __getattr__(self, name):
        if name == "weight":  # (nn.Module's AttributeError said only that there is none; hasattr stays False)
            raise AttributeError(
                f"Linear4bit ({self.extra_repr()}) has no `weight`: it holds 4-bit codes (packed, absmax, codebook); "
                "dequantized_weight() reads the weight. Code that reads a Linear's weight (transformers' T5 family "
                "reads `wo.weight.dtype` in its forward, resize_token_embeddings the lm_head's, peft's merge) needs "
                "that Linear float or Int8Linear: leave it out of the 4-bit swap with filter_fn")
        return super().__getattr__(name)

    def forward(self, input: Tensor) -> Tensor:  # (nn.Linear's name: callers may pass input=x)
        x = input
        if isinstance(x, Tensor) and x.is_nested:  # (as nn.Linear: jagged nested tensors run on their values)
            return on_nested("Linear4bit", self.forward, x)
        x = smoothed_input(self, x)
        _check_in_features(x, self.in_features, self.out_features)
        b = self._buffers  # (nn.Module.__getattr__ costs about 0.7 us a name)
        cast = (self.compute_dtype is not None and x.is_floating_point() and x.dtype != self.compute_dtype
                and not torch.is_autocast_enabled(x.device.type))
        y = torch.ops.qlib.linear_4bit(x.to(self.compute_dtype) if cast else x, b["packed"], b["absmax"],
                                       b["codebook"], self.block_size,
                                       self._parameters["bias"] if "bias" in self._parameters else self.bias)
        return y.to(x.dtype) if cast else y

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W_hat [out_features, in_features] in ``dtype``."""
        return torch.ops.qlib.dequantize_4bit(self.packed, self.absmax, self.codebook, self.in_features,
                                              self.block_size, dtype)

    def weight_bytes(self) -> int:
        """Bytes of the 4-bit weight plus its absmax and codebook (bias excluded)."""
        return self.packed.numel() + 4 * self.absmax.numel() + 4 * self.codebook.numel()

    def codebook_name(self) -> str:
        """'nf4', 'int4' or 'int-grid' (from_qat) when the codebook holds those values, else 'custom'."""
        if self.codebook.is_meta:  # (no values: a skeleton built on the meta device)
            return "meta"
        values = self.codebook.tolist()
        if values == list(_fourbit_ops.INT_GRID):
            return "int-grid"
        return next((name for name in ("nf4", "int4") if codebook_4bit(name).tolist() == values), "custom")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=4-bit {self.codebook_name()}, block_size={self.block_size} (absmax per block), "
                f"activation=float" + (f", compute_dtype={self.compute_dtype}" if self.compute_dtype else ""))

    def get_extra_state(self):
        # The packed layout depends on both, and other values can give buffers of the same shapes.
        # A tensor: safetensors and save_pretrained take tensors only.
        return torch.tensor([self.in_features, self.block_size], dtype=torch.int64)

    def set_extra_state(self, state):
        pass  # checked in _load_from_state_dict, which knows the key

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        layout_key = prefix + "_extra_state"
        expected = [self.in_features, self.block_size]
        if layout_key in state_dict:
            got = state_dict[layout_key]
            if not isinstance(got, Tensor):
                raise RuntimeError(f"Linear4bit ({self.extra_repr()}): state_dict[{layout_key!r}] must be a tensor "
                                   f"holding (in_features, block_size) = {expected}, got a {type(got).__name__} {got!r}")
            if got.tolist() != expected:
                raise RuntimeError(f"Linear4bit ({self.extra_repr()}): state_dict[{layout_key!r}] (in_features, block_size) "
                                   f"is {got.tolist()}, expected {expected} (weights packed for another layer shape)")
        for name, key, value in self._loaded_buffers(state_dict, prefix):
            if value.is_meta:  # (a skeleton's state: no values to check)
                continue
            if name == "absmax" and not bool((torch.isfinite(value) & (value >= 0)).all()):
                raise RuntimeError(f"Linear4bit ({self.extra_repr()}): state_dict[{key!r}] holds a negative, NaN "
                                   "or Inf absmax (a corrupt state_dict?)")
            if name == "codebook" and not bool(torch.isfinite(value).all() and (value[1:] > value[:-1]).all()):
                raise RuntimeError(f"Linear4bit ({self.extra_repr()}): state_dict[{key!r}] must hold 16 finite, "
                                   f"increasing values, got {value.tolist()}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if layout_key in missing_keys:  # a state_dict saved before qlib wrote it
            missing_keys.remove(layout_key)
