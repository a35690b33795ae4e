"""QATLinear: nn.Linear whose weight and input are fake-quantized while training."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._state import refuse_fx_proxy, untraced
from ..config import QATConfig, config_or_default
from .fake_quantize import FakeQuantize
from .smoothing import carry_smoothing, smoothed_input


def weight_fake_quant(config: QATConfig, out_features: int, in_features: int) -> FakeQuantize:
    cls = config.weight_observer_class()
    if config.weight_granularity == "per_channel":
        obs, shape = cls(bits=config.weight_bits, symmetric=config.weight_symmetric, ch_axis=0), (out_features, 1)
    elif config.weight_granularity == "per_group":
        g = config.weight_group_size
        obs = cls(bits=config.weight_bits, symmetric=config.weight_symmetric, group_size=g)
        shape = (out_features, in_features // g)
    else:
        obs, shape = cls(bits=config.weight_bits, symmetric=config.weight_symmetric), (1,)
    return FakeQuantize(obs, learnable=config.weight_learnable, qparams_shape=shape)


def activation_fake_quant(config: QATConfig) -> FakeQuantize:
    cls = config.activation_observer_class()
    obs = cls(bits=config.activation_bits, symmetric=config.activation_symmetric)
    return FakeQuantize(obs, learnable=config.activation_learnable, qparams_shape=(1,))


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_input(x, weight: Tensor) -> None:
    """F.linear's refusals of x (features, dtype), before the fake quants observe anything: a
    call that raises leaves the observers as they were (calibrate's bad batch recorded, a
    moving average stepped, a learnable scale taken from it)."""
    if not isinstance(x, Tensor) or x.is_nested:
        refuse_fx_proxy("qlib.nn.QATLinear", x)
        return  # (F.linear's error, or FakeQuantize's nested path)
    if untraced(lambda: x.dim() == 0 or x.shape[-1] != weight.shape[-1]):  # (jit.trace: plain ints)
        raise RuntimeError(f"qlib.nn.QATLinear: input of shape {tuple(x.shape)} does not have the "
                           f"{weight.shape[-1]} in_features of the weight {tuple(weight.shape)}")
    if x.dtype != weight.dtype and not (x.dtype in _AUTOCAST_DTYPES and weight.dtype in _AUTOCAST_DTYPES
                                        and torch.is_autocast_enabled(x.device.type)):
        raise RuntimeError(f"qlib.nn.QATLinear: input is {x.dtype} but the weight is {weight.dtype}; "
                           "cast one to the other (e.g. x.float())")


class QATLinear(nn.Linear):
    """Drop-in for nn.Linear: y = linear(fq_act(x), fq_weight(W), b)."""

    smoothing_in_forward = True  # (divides by qlib.smooth_quant's s: nn/smoothing.py)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 config: Optional[QATConfig] = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.config = config = config_or_default(config, "qlib.nn.QATLinear")
        config.check_linear(in_features, out_features)
        self.weight_fake_quant = weight_fake_quant(config, out_features, in_features)
        # None for weight-only QAT (activation_bits=None): activations stay float.
        self.activation_fake_quant = None if config.activation_bits is None else activation_fake_quant(config)
        # Sized now, so that a compiled forward never resizes a buffer.
        self.weight_fake_quant.observer.allocate(self.weight.shape, self.weight.device)
        self.weight_fake_quant.to(self.weight.device)
        if self.activation_fake_quant is not None:
            self.activation_fake_quant.observer.allocate((1, in_features), self.weight.device)
            self.activation_fake_quant.to(self.weight.device)

    def reset_parameters(self) -> None:
        if not self.__dict__.get("_taking_parameters", False):
            super().reset_parameters()

    @classmethod
    def from_float(cls, linear: nn.Linear, config: Optional[QATConfig] = None) -> "QATLinear":
        """A QATLinear sharing `linear`'s weight and bias Parameters."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QATLinear.from_float expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        # It takes linear's weight and bias: no random init for them (it advanced torch's global
        # RNG). A flag on this instance only (a QATLinear its __init__ builds keeps its init), not
        # an argument (subclasses with their own __init__ keep working).
        qat = cls.__new__(cls)
        object.__setattr__(qat, "_taking_parameters", True)
        try:
            qat.__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device=w.device, dtype=w.dtype, config=config)
        finally:
            qat.__dict__.pop("_taking_parameters", None)
        qat.weight = linear.weight
        if linear.bias is not None:
            qat.bias = linear.bias
        return carry_smoothing(linear, qat)

    @torch.no_grad()
    def weight_qparams(self) -> Tuple[Tensor, Tensor]:
        """The weight FakeQuantize's (scale, zero_point) for the weight as it is now: the
        FakeQuantize sees it once more first (its observer, while enabled), as torch.ao's convert
        does, since the last optimizer step moved the weight after the last forward."""
        wfq = self.weight_fake_quant
        wfq(self.weight)
        return tuple(t.detach() for t in wfq.calculate_qparams())

    def forward(self, input: Tensor) -> Tensor:  # (nn.Linear's name: callers may pass input=x)
        x = smoothed_input(self, input)
        m, p = self._modules, self._parameters  # (nn.Module.__getattr__ costs about 0.7 us a name)
        # (A parametrized weight / bias (weight_norm, pruning) lives outside _parameters.)
        weight = p["weight"] if "weight" in p else self.weight
        _check_input(x, weight)
        w = m["weight_fake_quant"](weight)
        afq = m.get("activation_fake_quant")
        if afq is not None:
            x = afq(x)
        return F.linear(x, w, p["bias"] if "bias" in p else self.bias)  # autocast, when on, casts here

    def extra_repr(self) -> str:
        c = self.config
        wg = c.weight_granularity + (f"(g={c.weight_group_size})" if c.weight_group_size else "")
        act = ("float" if c.activation_bits is None else
               f"int{c.activation_bits} {'sym' if c.activation_symmetric else 'asym'}")
        return (super().extra_repr() + f", weight=int{c.weight_bits} {wg} "
                f"{'sym' if c.weight_symmetric else 'asym'}, activation={act}")
