"""Int8Linear: a Linear with real int8 weights and int8 activations.

Weights are int8, symmetric per output channel in the narrow range
[-127, 127] (scale = absmax / 127, float32). Activations are quantized on the
fly inside the fused op ``torch.ops.qlib.int8_linear``: per token (dynamic,
one scale per row) or per tensor with a calibrated scale (static). The int32
GEMM result is dequantized with act_scale * weight_scale, plus bias, in the
input's dtype.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import _int8_ops  # noqa: F401  (registers the int8 fakes)
from .._ops import choose_qparams, quantize

_ACTIVATIONS = ("dynamic", "static")


def quantize_weight_per_channel(weight: Tensor):
    """(int8 weight [N, K], float32 scale [N]): symmetric per output channel, range [-127, 127]."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1) if w.shape[1] > 0 else w.new_zeros(w.shape[0])
    scale, _ = choose_qparams(-amax, amax, -127, 127, True)
    q = quantize(w, scale.unsqueeze(1), None, -127, 127, torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``y = dequant(int8(x) @ int8(W).T) + bias``; drop-in for an inference ``nn.Linear``.

    Build one with :meth:`from_float`. ``activation="dynamic"`` quantizes each
    token (row) with its own scale; ``"static"`` uses the calibrated per-tensor
    ``act_scale`` buffer. The state_dict holds ``weight`` (int8 [N, K]),
    ``weight_scale`` (float32 [N]), ``bias`` (float32 [N], if any) and, when
    static, ``act_scale`` (float32 scalar): plain tensors that load with
    ``torch.load(weights_only=True)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "dynamic",
        device=None,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Int8Linear: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.activation = activation
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device))
        else:
            self.bias = None
        if activation == "static":
            self.register_buffer("act_scale", torch.ones((), dtype=torch.float32, device=device))
        else:
            self.act_scale = None
        # CPU: the weight pre-packed for the large-batch int8 kernel (not in the state_dict;
        # rebuilt by repack() whenever `weight` changes). Empty until packed.
        self.register_buffer("weight_packed", torch.empty(0, dtype=torch.int8, device=device), persistent=False)
        self._packed_version = None

    @torch.no_grad()
    def repack(self) -> None:
        """Re-packs ``weight`` for the CPU kernel; called automatically after ``from_float``,
        ``load_state_dict`` and in-place edits of ``weight`` (outside ``torch.compile``)."""
        self.weight_packed = torch.ops.qlib.int8_pack_weight(self.weight)
        self._packed_version = self._weight_key()

    def _weight_key(self):
        # Inference tensors have no version counter: then only a new weight tensor is seen.
        w = self.weight
        return (None if w.is_inference() else w._version, w.data_ptr())

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        activation: str = "dynamic",
        act_scale: Union[Tensor, float, None] = None,
    ) -> "Int8Linear":
        """Quantize ``linear``'s weight per channel; ``activation="static"`` needs ``act_scale``
        (a positive float or one-element tensor, e.g. from a calibrated observer)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_float: expected an nn.Linear, got {type(linear).__name__}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"Int8Linear.from_float: activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if activation == "static":
            if act_scale is None:
                raise ValueError("Int8Linear.from_float: activation='static' needs act_scale (calibrate it first)")
            act_scale = torch.as_tensor(act_scale, dtype=torch.float32).detach().reshape(())
            if not (torch.isfinite(act_scale) and act_scale > 0):
                raise ValueError(f"Int8Linear.from_float: act_scale must be finite and > 0, got {act_scale.item()}")
        elif act_scale is not None:
            raise ValueError("Int8Linear.from_float: act_scale is only used with activation='static'")
        device = linear.weight.device
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, activation, device=device)
        q, scale = quantize_weight_per_channel(linear.weight)
        mod.weight.copy_(q)
        mod.weight_scale.copy_(scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach().float())
        if activation == "static":
            mod.act_scale.copy_(act_scale.to(device))
        mod.repack()
        return mod

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling() and self._packed_version != self._weight_key():
            self.repack()
        return torch.ops.qlib.int8_linear_packed(
            x, self.weight_packed, self.weight, self.weight_scale, self.bias, self.act_scale
        )

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight plus its scales (bias and act_scale excluded)."""
        return self.weight.numel() * self.weight.element_size() + self.weight_scale.numel() * 4

    def extra_repr(self) -> str:
        act = "dynamic per-token" if self.activation == "dynamic" else "static per-tensor"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight=int8 symmetric per-channel [-127, 127], "
            f"activation=int8 {act} [-127, 127]"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is None or key not in state_dict:
                continue
            value = state_dict[key]
            if not isinstance(value, Tensor):
                raise RuntimeError(f"Int8Linear: state_dict[{key!r}] must be a Tensor, got {type(value).__name__}")
            if value.dtype != buf.dtype or value.shape != buf.shape:
                raise RuntimeError(
                    f"Int8Linear ({self.extra_repr()}): state_dict[{key!r}] is {value.dtype} of shape "
                    f"{tuple(value.shape)}, expected {buf.dtype} of shape {tuple(buf.shape)}"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._packed_version = None  # repacked on the next forward
